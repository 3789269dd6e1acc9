"""Step by step through the reverse loop: where a model's recovered folding comes from.

For each model and generation (the unseen 2D slices of ``benchmarks/make_eval_sets.py``, the
model's default loop, generation ``i`` on image ``i mod n`` with seed ``i``) and each reverse
step t, it records the folding of the accumulated field phi (what the generation would be if it
stopped there), the folding of the step psi_hat itself, the step's mean |u| and mean |grad u|
(pixels, pixels per pixel), and where the step's folded pixels lie (within ``--band`` pixels of the
image border; on the foreground of the image the network saw).  The forward steps the network is
trained to undo never fold and keep |grad u| / |u| near 0.04 at every t (printed with
``--targets``), so a step that folds is the network's own doing.

    python benchmarks/reverse_trace.py --models cmr2d --set brain --samples 4 --threads 1 \\
        --json benchmarks/results/reverse_trace_cmr2d_brain.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

SETS = {"brain": "unseen2d_brain.npz", "ct": "unseen2d_ct.npz", "cardiac": "unseen2d_cardiac.npz"}


def _grad_abs(u: np.ndarray) -> float:
    return float(np.mean([np.abs(g).mean() for g in np.gradient(u, axis=tuple(range(1, u.ndim)))]))


def _border_distance(shape) -> np.ndarray:
    idx = np.indices(shape)
    return np.min([np.minimum(i, n - 1 - i) for i, n in zip(idx, shape)], axis=0)


def trace(model, images, t_prime: int, samples: int, band: int = 8, fg_threshold: float = 0.05,
          input_padding=None):
    """One row per reverse step (mean over the generations): t, folding of phi and of the step (%),
    the step's mean |u| and |grad u|, and the shares (%) of the step's folded pixels within ``band``
    pixels of the border and on the foreground.  ``input_padding``: pixels of mirrored image around
    the network's input (None: the model's own)."""
    from napari_drdm.core.config import Schedule
    from napari_drdm.core.metrics import jacobian_determinant
    from napari_drdm.core.recovery import recover
    cfg = model.config
    opts = cfg.recover_options(Schedule.parse(cfg.schedule), int(cfg.k_recursions), None, input_padding)
    near = None
    per_gen = []
    for i in range(samples):
        _, arr, spacing = images[i % len(images)]
        x = model.prepare(arr, spacing)[1]
        psi = model.sampler.sample(int(t_prime), batch=1, draws=model._seeded_draws([i]),
                                   return_step=False).forward_ddf
        rows = []
        for fr in recover(model._net, x.to(model.device), psi, int(t_prime), **opts):
            phi, u = fr.ddf[0].cpu().numpy(), fr.step_ddf[0].cpu().numpy()
            if near is None:
                near = _border_distance(u.shape[1:]) < band
            folded = jacobian_determinant(u) <= 0
            fg = fr.image[0, 0].cpu().numpy() > fg_threshold
            n = int(folded.sum())
            rows.append([fr.t, 100.0 * float((jacobian_determinant(phi) <= 0).mean()), 100.0 * n / folded.size,
                         float(np.abs(u).mean()), _grad_abs(u), n, int((folded & near).sum()), int((folded & fg).sum())])
        per_gen.append(rows)
    arr = np.asarray(per_gen, dtype=np.float64)              # generations x steps x columns
    out = []
    for s in range(arr.shape[1]):
        col = arr[:, s]
        n = col[:, 5].sum()
        out.append({"t": int(col[0, 0]), "phi_folding_pct": float(col[:, 1].mean()),
                    "step_folding_pct": float(col[:, 2].mean()), "step_mean_abs_px": float(col[:, 3].mean()),
                    "step_mean_abs_grad": float(col[:, 4].mean()), "step_folded_px": int(n),
                    "step_folds_near_border_pct": float(100.0 * col[:, 6].sum() / n) if n else None,
                    "step_folds_on_foreground_pct": float(100.0 * col[:, 7].sum() / n) if n else None})
    return out


def target_rows(model, ts, samples: int = 4):
    """The forward steps psi_t themselves (what the network is trained to undo) at the given t."""
    from napari_drdm.core.metrics import jacobian_determinant
    out = []
    for t in ts:
        fs = model.sampler.sample(torch.full((samples,), int(t), dtype=torch.int64),
                                  draws=model._seeded_draws(list(range(samples))))
        s = fs.step_ddf.cpu().numpy()
        out.append({"t": int(t), "step_folding_pct": float(np.mean([(jacobian_determinant(v) <= 0).mean() * 100
                                                                   for v in s])),
                    "step_mean_abs_px": float(np.abs(s).mean()),
                    "step_mean_abs_grad": float(np.mean([_grad_abs(v) for v in s]))})
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rec, every: int = 8) -> str:
    lines = []
    for m in rec["models"]:
        lines += [f"\n{m['name']} on {rec['set']} (T' = {rec['t_prime']}, {rec['samples']} generations)",
                  "| t | phi folding % | step folding % | step mean abs u px | step mean abs grad u "
                  "| step folds near border % | on foreground % |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        rows = m["steps"]
        for i, r in enumerate(rows):
            if i % every == 0 or i == len(rows) - 1:
                lines.append(f"| {r['t']} | {r['phi_folding_pct']:.2f} | {r['step_folding_pct']:.3f} | "
                             f"{r['step_mean_abs_px']:.3f} | {r['step_mean_abs_grad']:.4f} | "
                             f"{_fmt(r['step_folds_near_border_pct'], '.0f')} | {_fmt(r['step_folds_on_foreground_pct'], '.0f')} |")
    if rec.get("targets"):
        lines += ["\nforward steps psi_t (the training targets)", "| t | folding % | mean abs u px | mean abs grad u |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {r['t']} | {r['step_folding_pct']:.3f} | {r['step_mean_abs_px']:.3f} | {r['step_mean_abs_grad']:.4f} |"
                  for r in rec["targets"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["cmr2d"], help="bundled names (default: cmr2d)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATH", help="other weights files")
    ap.add_argument("--eval-dir", default="cache/eval", help="2D sets from benchmarks/make_eval_sets.py")
    ap.add_argument("--set", default="brain", choices=sorted(SETS))
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--samples", type=int, default=4, help="generations per model (default 4)")
    ap.add_argument("--band", type=int, default=8, help="border band in pixels (default 8)")
    ap.add_argument("--input-padding", type=int, default=None, metavar="PX",
                    help="pixels of mirrored image around the network's input (default: each model's own)")
    ap.add_argument("--targets", action="store_true", help="also tabulate the forward steps psi_t")
    ap.add_argument("--every", type=int, default=8, help="print every N-th step (default 8; the JSON has all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="save the record here")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    for opt, v in (("--samples", a.samples), ("--band", a.band), ("--every", a.every)):
        if v < 1:
            raise SystemExit(f"{opt}: expected a positive number, got {v}")
    models = [(n, n) for n in a.models]
    for item in a.extra:
        if "=" not in item:
            raise SystemExit(f"--extra: expected NAME=PATH, got {item!r}")
        models.append(tuple(item.split("=", 1)))
    path = Path(a.eval_dir) / SETS[a.set]
    if not path.is_file():
        raise SystemExit(f"--eval-dir: {path} not found (run benchmarks/make_eval_sets.py)")
    if a.threads:
        torch.set_num_threads(a.threads)
    np.seterr(all="ignore")
    from napari_drdm.commands.evaluate import collect_images
    from napari_drdm.model import load_model
    images = collect_images([str(path)], 2)
    rec = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "set": a.set, "set_file": str(path),
           "t_prime": a.t_prime, "samples": a.samples, "band_px": a.band,
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "command": " ".join(["python"] + sys.argv), "models": []}
    for name, src in models:
        model = load_model(src, device="cpu")
        if model.ndim != 2:
            raise SystemExit(f"--models/--extra: {name} is a {model.ndim}D model; this trace takes 2D models")
        t0 = time.perf_counter()
        steps = trace(model, images, a.t_prime, a.samples, a.band, input_padding=a.input_padding)
        print(f"  {name}: {a.samples} generations, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        rec["models"].append({"name": name, "source": str(src), "sha256": model.sha256, "steps": steps,
                              "input_padding": model.config.input_padding if a.input_padding is None
                              else a.input_padding})
        if a.targets and "targets" not in rec:
            rec["targets"] = target_rows(model, sorted({int(r["t"]) for r in steps[::a.every]} | {0}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rec, indent=1))
    print(table(rec, a.every))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
