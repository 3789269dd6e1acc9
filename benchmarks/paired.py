"""Paired differences between weights-table records: is one model's figure really lower?

The held-out tables (``benchmarks/weights_table.py``) measure every model on the same images with
the same seeds and forward fields (generation i: image i mod n, seed i), so two records can be
compared generation by generation.  The spread of a figure across generations is large (the 2D
brain maximum displacement varies by 3-4 points of the side), but most of it is the image and the
forward draw, which both records share; the paired difference has a much smaller standard error.

    python benchmarks/paired.py benchmarks/results/weights_table_t45_general2d_bundled_16gen.json \\
        benchmarks/results/weights_table_t45_teacherw4_s2518_bg8_fit16_16gen.json

prints, per set, T' and figure, each model's mean and the mean paired difference (other - base)
with its standard error (SD of the differences / sqrt(n)) over the generations both records hold.
Records saved before generations were kept cannot be paired (one line says so).

``--plot PNG`` draws one figure of one set (``--plot-set``, ``--plot-figure``) for every model
compared: its mean over the generations it shares with the base, with the paired standard error as
the bar, and the base's mean and a ``--target`` as lines (docs/heldout_brain_states.png).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

DEFAULT_FIGURES = ("max_disp_pct", "folding_pct", "fg_out_of_view_pct", "anatomy_max_disp_pct")

Key = Tuple[str, int]


def generations(rec: dict) -> Dict[Tuple[str, str, int], Dict[Key, dict]]:
    """(model, set, T') -> {(image, seed): generation record} of a weights-table record."""
    out: Dict[Tuple[str, str, int], Dict[Key, dict]] = {}
    for row in rec.get("rows", []):
        for res in row.get("results", []):
            gens = res.get("generations")
            if gens:
                out[row["model"], row["set"], int(res["t_prime"])] = {(g["image"], int(g["seed"])): g for g in gens}
    return out


def paired(base: Dict[Key, dict], other: Dict[Key, dict], figure: str) -> Optional[dict]:
    """The paired comparison of one figure over the generations both hold (None: fewer than 2)."""
    keys = sorted(k for k in set(base) & set(other) if figure in base[k] and figure in other[k])
    if len(keys) < 2:
        return None
    a = [float(base[k][figure]) for k in keys]
    b = [float(other[k][figure]) for k in keys]
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    return {"n": n, "base": sum(a) / n, "other": sum(b) / n, "diff": mean, "se": sd / math.sqrt(n)}


def table(base_rec: dict, other_recs: List[dict], figures=DEFAULT_FIGURES) -> List[dict]:
    """One row per (base model, other model, set, T', figure) that both records measured."""
    base_g = generations(base_rec)
    rows = []
    for i, rec in enumerate(other_recs):
        for (model, set_, tp), gens in generations(rec).items():
            for (bmodel, bset, btp), bgens in base_g.items():
                if (bset, btp) != (set_, tp) or (bmodel == model and rec is base_rec):
                    continue
                for fig in figures:
                    p = paired(bgens, gens, fig)
                    if p is not None:
                        rows.append(dict(p, base_model=bmodel, model=model, set=set_, t_prime=tp, figure=fig,
                                         record=i))
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| set | T' | figure | base | mean | other | mean | other - base (paired) | n |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['t_prime']} | {r['figure']} | {r['base_model']} | {r['base']:.2f} | "
                     f"{r['model']} | {r['other']:.2f} | {r['diff']:+.2f} ± {r['se']:.2f} | {r['n']} |")
    return "\n".join(lines)


def plot(rows: List[dict], labels: Dict[int, str], out: str, set_: str, figure: str, target=None,
         t_prime: Optional[int] = None) -> None:
    """Each compared model's mean of ``figure`` on ``set_`` at ``t_prime`` (over the generations it
    shares with the base) with its paired standard error, best at the top, the base's mean and
    ``target`` as lines.  ``t_prime`` may be left out when the rows hold one T' only."""
    sel = [r for r in rows if r["set"] == set_ and r["figure"] == figure]
    t_primes = sorted({int(r["t_prime"]) for r in sel})
    if t_prime is None and len(t_primes) > 1:
        raise SystemExit(f"--plot: the records pair at T' = {', '.join(map(str, t_primes))}; choose one with --plot-t-prime")
    sel = sorted((r for r in sel if t_prime is None or int(r["t_prime"]) == t_prime), key=lambda r: -r["other"])
    if not sel:
        raise SystemExit(f"--plot: no paired {figure} on the {set_} set"
                         + (f" at T' = {t_prime}" if t_prime is not None else ""))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.0, 0.42 * len(sel) + 1.4))
    y = list(range(len(sel)))
    ax.errorbar([r["other"] for r in sel], y, xerr=[r["se"] for r in sel], fmt="o", color="tab:blue", capsize=3,
                label="mean ± paired standard error")
    ax.set_yticks(y, [f"{labels[id(r)]} (n={r['n']})" for r in sel], fontsize=8)
    base = max(sel, key=lambda r: r["n"])          # the base's mean over the most generations paired
    ax.axvline(base["base"], color="tab:gray", ls="--", label=f"{base['base_model']}: {base['base']:.2f}")
    if target is not None:
        ax.axvline(target, color="tab:red", label=f"target {target:g}")
    ax.set_xlabel(f"{figure} on the {set_} set, T' = {sel[0]['t_prime']}")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _load(path: str) -> dict:
    p = Path(path)
    try:
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file (expected a weights_table.py --json record)") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: not a readable JSON record ({e.__class__.__name__})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("rows"), list):
        raise SystemExit(f"{path}: not a weights_table.py record (no 'rows')")
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", help="the record compared against (weights_table.py --json)")
    ap.add_argument("others", nargs="+", help="records of the models compared with it")
    ap.add_argument("--figures", nargs="+", default=list(DEFAULT_FIGURES),
                    help=f"per-generation figures (default: {' '.join(DEFAULT_FIGURES)})")
    ap.add_argument("--plot", default=None, metavar="PNG", help="draw one set's figure for every model compared")
    ap.add_argument("--plot-set", default="brain", help="the set drawn (default brain)")
    ap.add_argument("--plot-figure", default="max_disp_pct", help="the figure drawn (default max_disp_pct)")
    ap.add_argument("--plot-t-prime", type=int, default=None,
                    help="the T' drawn (needed only when the records pair at several)")
    ap.add_argument("--target", type=float, default=None, help="a target line on the plot")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.plot)
    base = _load(a.base)
    others = [_load(p) for p in a.others]
    if not generations(base):
        raise SystemExit(f"{a.base}: keeps no generations (saved before weights_table.py kept them); cannot pair")
    rows = table(base, others, a.figures)
    if not rows:
        print("no generation in common (different sets, T', images or seeds)", file=sys.stderr)
        return 1
    print(markdown(rows))
    if a.plot:
        labels = _labels(rows, others, a.others)
        plot(rows, labels, a.plot, a.plot_set, a.plot_figure, a.target, a.plot_t_prime)
        print(f"wrote {a.plot}", file=sys.stderr)
    return 0


def _labels(rows: List[dict], others: List[dict], paths: List[str]) -> Dict[int, str]:
    """A label per row: the model's name, with its record's file name where the name alone is
    ambiguous (the base's model measured another way, or one name in several records)."""
    records_of: Dict[str, set] = {}
    for r in rows:
        records_of.setdefault(r["model"], set()).add(r["record"])
    out = {}
    for r in rows:
        ambiguous = r["model"] == r["base_model"] or len(records_of[r["model"]]) > 1
        stem = Path(paths[r["record"]]).stem.replace("weights_table_", "")
        out[id(r)] = f"{r['model']} [{stem}]" if ambiguous else r["model"]
    return out


if __name__ == "__main__":
    sys.exit(main())
