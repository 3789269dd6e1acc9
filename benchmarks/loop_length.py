"""How long the reverse loop runs, between the paper's and the authors' (issue 12, session 24).

The paper's Algorithm 2 runs T' network steps (t = T'-1 .. 0); the authors' code, the engine's
default (``Schedule.REFERENCE``), runs all T = 80 whatever T' is.  This diagnostic runs a training
run's validation (``training.export.validate_run``, what ``python -m training validate`` runs)
with the loop started ``k`` steps above the paper's first time, t = min(T-1, T'-1+k) .. 0, for each
``k`` given (``k = 0``: the paper loop), and once with the reference loop.  The engine has no such
setting the validator could take (a model's ``loop_extra``, set by ``python -m training
set-inference --loop-extra``, came after this diagnostic): the validator's paper loop is lengthened
here, in this process only, by replacing ``napari_drdm.core.recovery.reverse_timesteps``.

Usage (the session-24 figures, docs/weights.md; 6-14 min per loop on one thread)::

    python benchmarks/loop_length.py --run runs/general2d_s256_teacher_self2 --weights-file general2d \\
        --k 0 12 24 --threads 1 --set validation.n_images=8 --set validation.anatomy_fit=16 \\
        --set validation.background_margin=8 --set "validation.t_primes=[45]" --set "validation.loss_t=[40]" \\
        --json benchmarks/results/loop_length_general2d_validation.json --plot docs/loop_length_general2d.png
    python benchmarks/loop_length.py --from-json benchmarks/results/loop_length_general2d_validation.json \\
        --plot docs/loop_length_general2d.png       # redraw, and print the table, from a saved record

``--tail R ...`` runs the reference loop once per R, each followed by its last R times again
(t = R-1 .. 0), a second pass over the smallest times (session 25, 3D; ``--k`` with no value runs
no paper loop; 3D validations have no cued copy, shown as "-")::

    python benchmarks/loop_length.py --run runs/general3d --weights-file general3d --k --tail 0 10 20 \\
        --threads 1 --set validation.anatomy_fit=4 --set validation.background_margin=2 \\
        --set "validation.t_primes=[45]" --set "validation.loss_t=[40]" \\
        --json benchmarks/results/loop_tail_general3d_validation.json

``--step-sigma S ...`` runs the reference loop once per S with every step's estimate smoothed by a
Gaussian of S pixels before it is composed (session 25; ``--tail`` with no value then runs no plain
loop): the same command with ``--tail --step-sigma 0.5 1.0 --json
benchmarks/results/step_sigma_general3d_validation.json``.

With ``--weights-table`` it runs ``benchmarks/weights_table.py`` instead, on the held-out sets, with
the one ``k`` given and ``--schedule paper`` (everything after ``--`` goes to that script; its
record's rows carry ``loop_extra`` = k, the engine's key; records before session 25 said
``loop_extra_steps``)::

    python benchmarks/loop_length.py --k 12 --weights-table -- --models general2d --t-prime 45 --samples 16 \\
        --threads 1 --background-margin 8 --anatomy-fit 16 \\
        --json benchmarks/results/weights_table_t45_general2d_loop57_bg8_fit16_16gen.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import napari_drdm.core.recovery as recovery  # noqa: E402
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402
from napari_drdm.core.config import Schedule, T  # noqa: E402

_AS_SHIPPED = recovery.reverse_timesteps
_TO_PX = recovery.frac_to_px
FIGURES = ("max_disp_pct", "folding_pct")


def lengthened(k: int, tail: int = 0):
    """``reverse_timesteps`` whose paper loop starts ``k`` steps above T' whatever the model's own
    ``loop_extra``, and whose every loop is followed by its last ``tail`` times again
    (t = tail-1 .. 0: a second pass over the smallest times)."""
    def timesteps(t_prime, n_steps=T, schedule=Schedule.REFERENCE, loop_extra=0):
        steps = _AS_SHIPPED(t_prime, n_steps, schedule, k)
        return steps + list(range(min(int(tail), len(steps)) - 1, -1, -1)) if steps else steps
    return timesteps


def gaussian_field(u, sigma: float):
    """``u`` (B, d, *spatial) smoothed by a separable Gaussian of ``sigma`` pixels per spatial axis
    (radius ceil(3 sigma), replicate padding: a constant field stays constant, also at the border)."""
    import torch.nn.functional as F

    from benchmarks.downstream_seg import gauss_kernel
    if sigma <= 0:
        return u
    w = gauss_kernel(sigma).to(u)
    r = (len(w) - 1) // 2
    nd = u.dim() - 2
    B, C = u.shape[:2]
    out = u.reshape(B * C, 1, *u.shape[2:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = 2 * r + 1
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = r
        out = conv(F.pad(out, pad, mode="replicate"), w.reshape(1, 1, *shape))
    return out.reshape(u.shape)


def smoothed_steps(sigma: float):
    """``frac_to_px`` for the reverse loop whose every step estimate is smoothed by
    :func:`gaussian_field` before it is composed (patched into ``core.recovery`` only)."""
    def to_px(u, side):
        return gaussian_field(_TO_PX(u, side), sigma)
    return to_px


def rows_of(result: dict, t_prime: int, schedule: str, steps: int, k, tail: int = 0) -> dict:
    """One loop's figures from a validation result (keys like ``val/T45/cues/paper/max_disp_pct``)."""
    row = {"k": k, "tail": tail, "steps": steps, "schedule": schedule}
    for key, value in result.items():
        for copy, tag in (("clean", f"T{t_prime}/{schedule}/"), ("cued", f"T{t_prime}/cues/{schedule}/")):
            for fig in FIGURES:
                if key.endswith(tag + fig):
                    row[f"{copy}_{fig}"] = float(value)
    return row


def measure(a) -> dict:
    import torch

    from training.export import validate_run
    if a.threads:
        torch.set_num_threads(a.threads)
    t_prime = 45
    for item in a.set:
        if item.replace(" ", "").startswith("validation.t_primes=["):
            t_prime = int(item.split("[", 1)[1].split(",")[0].rstrip("]"))
    loops = [(k, Schedule.PAPER, 0, 0.0) for k in a.k] + [(None, Schedule.REFERENCE, r, 0.0) for r in a.tail]
    loops += [(None, Schedule.REFERENCE, 0, sd) for sd in a.step_sigma]
    rows = []
    try:
        for k, schedule, tail, sigma in loops:
            recovery.reverse_timesteps = lengthened(k or 0, tail)
            recovery.frac_to_px = smoothed_steps(sigma) if sigma > 0 else _TO_PX
            steps = len(recovery.reverse_timesteps(t_prime, T, schedule))
            print(f"loop of {steps} steps (k = {k}, tail {tail}, step sigma {sigma}, {schedule})",
                  file=sys.stderr, flush=True)
            res = validate_run(a.run, a.weights_file, sets=[*a.set, f"validation.schedules=[{schedule.value}]"],
                               log=lambda m: print(m, file=sys.stderr, flush=True))
            rows.append(dict(rows_of(res, t_prime, schedule.value, steps, k, tail), step_sigma=sigma))
    finally:
        recovery.reverse_timesteps = _AS_SHIPPED
        recovery.frac_to_px = _TO_PX
    return {"run": a.run, "weights": a.weights_file, "t_prime": t_prime, "sets": a.set, "rows": rows}


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def table(record: dict) -> str:
    lines = [f"T' = {record['t_prime']}, {record['weights']} on {record['run']}'s validation images",
             "| loop steps | k | tail | step sigma | clean max disp % | cued max disp % | clean folding % | "
             "cued folding % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(record["rows"], key=lambda r: (r["steps"], r.get("step_sigma", 0.0))):
        k = "reference" if r["k"] is None else r["k"]
        lines.append(f"| {r['steps']} | {k} | {r.get('tail', 0)} | {r.get('step_sigma', 0.0):g} | "
                     f"{_cell(r, 'clean_max_disp_pct', '.2f')} | "
                     f"{_cell(r, 'cued_max_disp_pct', '.2f')} | {_cell(r, 'clean_folding_pct', '.3f')} | "
                     f"{_cell(r, 'cued_folding_pct', '.3f')} |")
    return "\n".join(lines)


def plot(record: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(record["rows"], key=lambda r: r["steps"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for copy, marker in (("clean", "o"), ("cued", "s")):
        if not all(f"{copy}_folding_pct" in r for r in rows):
            continue
        x = [r[f"{copy}_folding_pct"] for r in rows]
        y = [r[f"{copy}_max_disp_pct"] for r in rows]
        ax.plot(x, y, marker=marker, label=f"{copy} copy")
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"{r['steps']}", (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("recovered folding, % of pixels")
    ax.set_ylabel("maximum displacement, % of the side")
    ax.set_title(f"Reverse-loop length at T' = {record['t_prime']} ({record['weights']}, validation images)\n"
                 "labels: network steps (T' = paper loop, 80 = reference loop, more: a tail)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def weights_table(k: int, rest) -> int:
    """``benchmarks/weights_table.py`` with the paper loop lengthened by ``k`` (``--schedule paper``)."""
    from benchmarks import weights_table as wt
    recovery.reverse_timesteps = lengthened(k)
    try:
        rc = wt.main([*rest, "--schedule", "paper"])
    finally:
        recovery.reverse_timesteps = _AS_SHIPPED
    if rc == 0:
        print(f"(every 'paper loop' above ran k = {k} steps more: T' + {k} network steps, at most T)")
    if rc == 0 and "--json" in rest:
        path = rest[rest.index("--json") + 1]
        record = json.loads(open(path).read())
        for row in record["rows"]:
            row["loop_extra"] = k          # what ran, not the model's stored value (the engine's key)
        record["loop"] = f"paper loop lengthened by k = {k} steps (benchmarks/loop_length.py)"
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    return rc


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="the training run whose validation images and settings are used")
    ap.add_argument("--weights-file", default=None, help="weights to validate (a file or bundled name)")
    ap.add_argument("--k", type=int, nargs="*", default=[0], help="extra steps above the paper loop's first time "
                    "(each a paper loop; none: reference loops only)")
    ap.add_argument("--tail", type=int, nargs="*", default=[0],
                    help="reference loops to run, each followed by its last R times again (t = R-1 .. 0); 0: as shipped")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="validation overrides")
    ap.add_argument("--step-sigma", type=float, nargs="*", default=[],
                    help="reference loops whose every step estimate is smoothed by a Gaussian of this many pixels")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="save the record here")
    ap.add_argument("--from-json", default=None, help="read a saved record instead of measuring")
    ap.add_argument("--plot", default=None, help="draw maximum displacement against folding here (PNG)")
    ap.add_argument("--weights-table", action="store_true",
                    help="run benchmarks/weights_table.py (the arguments after --) with the one k given")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    if not a.weights_table:
        check_outputs(ap, a.force, a.json, a.plot)
    if a.weights_table:
        if len(a.k) != 1 or a.k[0] < 0:
            ap.error(f"--weights-table takes one --k >= 0, got {a.k}")
        return weights_table(a.k[0], rest)
    if a.from_json:
        record = json.loads(open(a.from_json).read())
    else:
        if not a.run:
            ap.error("--run is required unless --from-json is given")
        if any(k < 0 for k in a.k):
            ap.error(f"--k must be >= 0, got {a.k}")
        if any(r < 0 or r > T for r in a.tail):
            ap.error(f"--tail must lie in 0..{T}, got {a.tail}")
        record = measure(a)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(record, f, indent=1)
    print(table(record))
    if a.plot:
        plot(record, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
