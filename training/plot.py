"""Learning curves of a training run as a PNG (``python -m training plot``).

    python -m training plot --run runs/general2d [--out runs/general2d/learning_curves.png]

Left: the training cosine loss ``ang`` per logged interval (faint) and its moving average against
the step (-1 = the predicted step fields point exactly along the true ones, 0 = uninformed).
Middle and right: the held-out validation that the run logged (``"event": "validation"`` rows):
the recovered field's folding and maximum displacement (% of the side) at each validated T' and
schedule, with the forward field's for reference, against the step (a model that recovers keeps
folding low while its deformation stays large; the folding axis is logarithmic unless
``--linear-folding``, and ``--folding-target PCT`` draws the target as a dotted line); with ``train.ema_decay`` also the weight
average's (``val_ema/`` rows, training/ema.py).  A change of the learning rate after its warm-up
(a resume with ``--set optim.lr=...``) is a grey vertical line on every panel, labelled on the
left one.  A validation added afterwards with other settings (``python -m training validate --set
... --append``) is its own series, labelled with those settings.  Reads ``train_log.jsonl`` of the run
folder (or ``--log``).
"""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["read_log", "plot_run", "lr_changes", "batch_changes"]


def read_log(path) -> List[Dict[str, Any]]:
    """The JSON records of a ``train_log.jsonl``; a torn last line (a killed run) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _moving(values, n):
    import numpy as np
    v = np.asarray(values, dtype=float)
    if v.size < n or n < 2:
        return v
    c = np.convolve(v, np.ones(n) / n, mode="valid")
    return np.concatenate([np.full(n - 1, np.nan), c])


def _plateau_changes(pts) -> List[tuple]:
    """``(step, old, new)`` where a sorted ``(step, value)`` series settles at a new value: a value
    counts once two consecutive points hold it, so a ramp marks nothing and the first plateau is
    the starting value."""
    out: List[tuple] = []
    current = None
    for (s0, a), (_, b) in zip(pts, pts[1:]):
        if a == b and a != current:
            if current is not None:
                out.append((s0, current, a))
            current = a
    return out


def lr_changes(rows: Sequence[Dict[str, Any]]) -> List[tuple]:
    """``(step, old_lr, new_lr)`` where the learning rate of the training rows settles at a new value.

    A value counts once two consecutive logged rows hold it (a plateau), so the warm-up, whose
    rate rises at every row, marks nothing; the first plateau is the starting rate.
    """
    return _plateau_changes(sorted((int(r["step"]), float(r["lr"])) for r in rows
                                   if "lr" in r and "step" in r and "event" not in r))


def batch_changes(rows: Sequence[Dict[str, Any]]) -> List[tuple]:
    """``(step, old, new)`` where the global batch (images per optimiser step, over all ranks) of
    the training rows changes, e.g. a run resumed on a GPU with a larger batch.

    The batch is read off each row as ``samples_s / it_s``; the plateau rule of :func:`lr_changes`
    applies.
    """
    return _plateau_changes(sorted((int(r["step"]), int(round(float(r["samples_s"]) / float(r["it_s"]))))
                                   for r in rows if "step" in r and "event" not in r
                                   and float(r.get("it_s") or 0) > 0 and "samples_s" in r))


def plot_run(log_path, out, title: Optional[str] = None, window: int = 10,
             folding_target: Optional[float] = None, log_folding: bool = True,
             displacement_target: Optional[Sequence[float]] = None) -> Path:
    """Write the three-panel learning-curve PNG of a run's log; returns the output path.

    Args:
        log_path: the run's ``train_log.jsonl``.
        out: the PNG to write (its folder is created).
        title: figure title (default: the run folder's name).
        window: moving-average length, in logged intervals.
        folding_target: draw this folding percentage as a dotted "target" line (e.g. 0.5 for the
            3D target of the weights issue); None draws none.
        log_folding: draw the folding axis on a logarithmic scale (the folding falls by orders of
            magnitude from a fresh start to the target; a zero value switches to a scale that is
            linear below 0.1 %).
        displacement_target: ``(low,)`` or ``(low, high)``, the wanted maximum displacement in % of
            the side (e.g. ``(8, 16)`` for 2D, ``(6,)`` for 3D), drawn as dotted lines.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = read_log(log_path)
    steps = [r for r in rows if "ang" in r and "step" in r and "event" not in r]
    vals = [r for r in rows if r.get("event") == "validation"]
    if not steps:
        raise ValueError(f"{log_path}: no training rows with 'ang' to plot")
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 5.6), dpi=110)
    x = [r["step"] for r in steps]
    y = [r["ang"] for r in steps]
    a1.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="per log interval")
    a1.plot(x, _moving(y, window), color="tab:blue", lw=1.8, label=f"moving average ({window})")
    a1.set_xlabel("step")
    a1.set_ylabel("cosine loss 'ang' (lower is better)")
    a1.set_title("training")
    a1.grid(alpha=0.3)
    labels: Dict[int, List[str]] = {}
    for at, old, new in lr_changes(steps):
        labels.setdefault(at, []).append(f"lr {old:g} -> {new:g}")
    for at, old, new in batch_changes(steps):
        labels.setdefault(at, []).append(f"batch {old} -> {new}")
    changes = sorted(labels.items())
    span = max(x[-1] - x[0], 1)
    drop, prev = 0, None
    for at, text in changes:
        for ax in (a1, a2, a3):
            ax.axvline(at, color="0.45", ls=":", lw=1.0)
        right = at > x[0] + 0.75 * span                  # near the right edge: the label goes left of the line
        # a label close to the previous one goes below it rather than over it (a label drawn to the
        # left of its line reaches back about twice as far)
        near = (0.6 if right else 0.3) * span
        drop = drop + 9 * len(labels[prev]) if prev is not None and at - prev < near else 0
        a1.annotate("\n".join(text), (at, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(-3 if right else 3, -3 - drop), textcoords="offset points", va="top",
                    ha="right" if right else "left", fontsize=7, color="0.3")
        prev = at
    a1.legend(loc="lower left" if changes else "upper right", fontsize=8)   # the labels sit at the top
    legend_lines = 0
    for ax, metric, ylabel, what in (
            (a2, "folding_pct", "folding, % of pixels with det <= 0", "folding"),
            (a3, "max_disp_pct", "maximum displacement, % of the side", "maximum displacement")):
        series: Dict[str, List] = {}
        for r in vals:
            for k, v in r.items():
                if k.startswith(("val/T", "val_ema/T")) and k.endswith("/" + metric):
                    avg = k.startswith("val_ema/")
                    name = k.split("/", 1)[1][:-len("/" + metric)]
                    if avg and "/forward/" in k:
                        # the forward field does not depend on the weights: one series, whichever
                        # weights were validated at that step
                        if ("val/" + k[len("val_ema/"):]) in r:
                            continue
                        avg = False
                    series.setdefault(name + (" (weight average)" if avg else "") + _settings_tag(r),
                                      []).append((r["step"], v))
        for name, pts in sorted(series.items()):
            xs, ys = zip(*sorted(pts))
            forward = "/forward" in name
            ax.plot(xs, ys, "o--" if forward else "o-", ms=3, lw=1.2, alpha=0.6 if forward else 1.0,
                    label=name.replace("/", " "))
        if metric == "max_disp_pct" and displacement_target:
            for i, bound in enumerate(displacement_target):
                ax.axhline(float(bound), color="tab:red", ls=":", lw=1.2,
                           label="target range" if i == 0 and len(displacement_target) > 1
                           else (f"target >= {float(bound):g} %" if i == 0 else None))
        if metric == "folding_pct":
            if folding_target is not None:
                ax.axhline(float(folding_target), color="tab:red", ls=":", lw=1.2,
                           label=f"target {float(folding_target):g} %")
            values = [v for pts in series.values() for _, v in pts]
            if log_folding and values:
                if min(values) > 0:
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                else:
                    ax.set_yscale("symlog", linthresh=0.1)
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlim(a1.get_xlim())                    # one step axis for the three panels
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"held-out validation: {what}")
        ax.grid(alpha=0.3)
        handles, texts = ax.get_legend_handles_labels()
        if handles:                                   # validation series or target lines, below the panel
            texts = [textwrap.fill(t, 58, subsequent_indent="  ") for t in texts]
            ax.legend(handles, texts, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1,
                      frameon=False)
            legend_lines = max(legend_lines, sum(t.count("\n") + 1 for t in texts))
        if not series:
            ax.text(0.5, 0.5, "no validation logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.set_size_inches(15, 4.6 + 0.15 * legend_lines)   # room for the legends below the panels
    fig.suptitle(title or Path(log_path).parent.name)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _settings_tag(row: Dict) -> str:
    """A validation row added afterwards with other settings (``validate --set``, recorded as
    ``overrides``) is its own series: " [n_images=8 anatomy_fit=16 ...]"; "" for the run's own."""
    sets = [str(o).split("validation.", 1)[-1] for o in row.get("overrides") or []]
    return f" [{' '.join(sets)}]" if sets else ""


def add_arguments(p) -> None:
    p.add_argument("--run", default=None, help="run folder (reads its train_log.jsonl)")
    p.add_argument("--log", default=None, help="a train_log.jsonl (instead of --run)")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/learning_curves.png)")
    p.add_argument("--title", default=None)
    p.add_argument("--window", type=int, default=10, help="moving average over this many log rows")
    p.add_argument("--folding-target", type=float, default=None, metavar="PCT",
                   help="draw this folding percentage as a dotted target line")
    p.add_argument("--displacement-target", default=None, metavar="LOW[,HIGH]",
                   help="draw the wanted maximum displacement (%% of the side) as dotted lines")
    p.add_argument("--linear-folding", action="store_true",
                   help="a linear folding axis (default: logarithmic)")


def run(args) -> int:
    if not (args.run or args.log):
        print("error: give --run RUN_FOLDER or --log TRAIN_LOG.jsonl", file=sys.stderr)
        return 2
    log = Path(args.log) if args.log else Path(args.run) / "train_log.jsonl"
    if not log.exists():
        print(f"error: training log not found: {log}", file=sys.stderr)
        return 2
    disp = None
    if args.displacement_target:
        try:
            disp = [float(v) for v in args.displacement_target.split(",")]
        except ValueError:
            disp = []
        if not 1 <= len(disp) <= 2:
            print(f"error: --displacement-target {args.displacement_target!r}: expected LOW or LOW,HIGH "
                  "(percent of the side)", file=sys.stderr)
            return 2
    try:
        out = plot_run(log, args.out or log.parent / "learning_curves.png", args.title, args.window,
                       folding_target=args.folding_target, log_folding=not args.linear_folding,
                       displacement_target=disp)
    except ImportError:
        print("error: plotting needs matplotlib (pip install 'napari-drdm[plots]')", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
