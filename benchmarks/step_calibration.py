"""How large are a model's steps against the steps they should undo?  Per diffusion time t.

For each model, held-out image and t: a forward draw gives I_t = I_0 o psi_{t:1} and the last
forward step b = psi_t (pixels); the network's estimate psi_hat(I_t, t) (K recursions, the model's
input padding unless ``--input-padding``) is read where the training loss reads it,
a(x) = psi_hat(x + b(x)), which undoes the step perfectly when a = -b.  Printed per set (the
brain set split by source volume) and t:

* ``slope``: the least-squares slope of a onto -b over every pixel, sum(-a . b) / sum(b . b);
  1 is a calibrated step size, below 1 a model that undoes each step only partly;
* ``fg`` / ``bg``: the same over the pixels of I_t that show anatomy (> 0.05) and the rest;
* ``cos``: the mean cosine between a and -b (direction agreement, 1 = perfect);
* ``ratio``: mean |a| / mean |b|.

Every 2D fine-tune so far lowered the slope (docs/weights.md); this measures it in a
few minutes where the held-out tables take an hour.

    python benchmarks/step_calibration.py --models cmr2d --extra run=runs/x/export.safetensors \\
        --threads 1 --json benchmarks/results/step_calibration.json

2D: the unseen slices of ``benchmarks/make_eval_sets.py`` (``--eval-dir``); 3D: the kit's
held-out volumes (``--kit``).  Generation ``i`` of time t uses seed ``100 t + i``.

``--triplanar NAME ...`` (3D models only) also scores each 2D model's *tri-planar* estimate on the same
draws: the 2D network run on every slice along each of the three axes (optionally upsampled by
``--triplanar-upsample``), each 3D component the mean of the two slice directions that contain it.
It asks whether the 2D networks could teach the 3D one (docs/weights.md, session 26: they cannot,
as a slice never shows the through-plane part of a step).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402
from benchmarks.weights_table import SETS_2D, SETS_3D, _models, _sources, add_source_args, save_record  # noqa: E402


def _groups(model, eval_dir, kit, per_group):
    """{group name: [model-grid image tensors]}: the 2D sets (brain split by source) or the 3D volumes."""
    from napari_drdm.commands.evaluate import collect_images
    sets = SETS_2D if model.ndim == 2 else SETS_3D
    base = Path(eval_dir) if model.ndim == 2 else Path(kit)
    sources = _sources(eval_dir) if model.ndim == 2 else {}
    out = {}
    for set_name, rel in sets.items():
        path = base / rel
        if not path.exists():
            continue
        for name, arr, spacing in collect_images([str(path)], model.ndim):
            src = sources.get(name)
            group = set_name if src is None or set_name != "brain" else f"brain: {Path(src).parts[0]}"
            bucket = out.setdefault(group, [])
            if len(bucket) < per_group:
                bucket.append(model.prepare(arr, spacing)[1])
    return out


def triplanar_estimator(net2d, k: int, padding: int, upsample: int = 1, chunk: int = 64):
    """A 3D step estimate from a 2D network: ``fn(img (1, 1, S, S, S), t (1,)) -> (1, 3, S, S, S)``
    as a fraction of the side.  The network runs on the slices along each axis (K recursions,
    ``padding`` px of mirrored image); the slice's two in-plane components go to their 3D axes, so
    every component is estimated by two slice directions and averaged."""
    import torch.nn.functional as F

    from napari_drdm.core.recovery import padded_estimate

    def fn(img, t):
        x = img[0, 0]
        S = x.shape[0]
        acc = torch.zeros((3,) + tuple(x.shape), dtype=img.dtype, device=img.device)
        for ax in range(3):
            sl = x.movedim(ax, 0).unsqueeze(1)                      # (S, 1, a, b): slice index first
            if upsample != 1:
                sl = F.interpolate(sl, scale_factor=upsample, mode="bilinear", align_corners=True)
            est = torch.cat([padded_estimate(net2d, part, t.expand(len(part)), k, padding)
                             for part in sl.split(chunk)])
            if upsample != 1:
                est = F.interpolate(est, size=(S, S), mode="bilinear", align_corners=True)
            for c, d in enumerate(d for d in range(3) if d != ax):
                acc[d] += est[:, c].movedim(0, ax)
        return (acc / 2).unsqueeze(0)
    return fn


def calibration(model, images, t: int, input_padding=None, seed0: int = 0, estimator=None):
    """Slope (all / anatomy / background), mean cosine and size ratio of the model's estimates at
    time ``t`` on ``images`` (model-grid tensors (1, 1, S...)), one forward draw per image.
    ``estimator(img_t, t)``, when given, replaces the model's network (the draws stay the model's)."""
    from napari_drdm.core.recovery import padded_estimate
    from napari_drdm.core.spatial import frac_to_px, warp
    cfg = model.config
    pad = cfg.input_padding if input_padding is None else int(input_padding)
    sums = np.zeros(6)
    cosines, sizes_a, sizes_b = [], [], []
    for i, x0 in enumerate(images):
        tt = torch.tensor([int(t)])
        fs = model.sampler.sample(tt, draws=model._seeded_draws([seed0 + 100 * int(t) + i]))
        b = fs.step_ddf
        img_t = warp(x0, fs.forward_ddf, "linear", "zeros")
        with torch.inference_mode():
            est = (estimator(img_t, tt) if estimator is not None
                   else padded_estimate(model._net, img_t, tt, int(cfg.k_recursions), pad))
        a = warp(frac_to_px(est, model.size), b, "linear", "border")
        fg = (img_t[:, 0] > 0.05).double()
        dot, bb = -(a * b).sum(1).double(), (b * b).sum(1).double()
        sums += [float(dot.sum()), float(bb.sum()), float((dot * fg).sum()), float((bb * fg).sum()),
                 float((dot * (1 - fg)).sum()), float((bb * (1 - fg)).sum())]
        na, nb = a.norm(dim=1), b.norm(dim=1)
        keep = nb > 1e-6
        cosines.append(float((dot[keep] / (na[keep] * nb[keep] + 1e-12)).mean()))
        sizes_a.append(float(na.mean()))
        sizes_b.append(float(nb.mean()))

    def _div(p, q):
        return p / q if q > 0 else float("nan")
    return {"t": int(t), "n": len(images), "slope": _div(sums[0], sums[1]), "slope_fg": _div(sums[2], sums[3]),
            "slope_bg": _div(sums[4], sums[5]), "cos": float(np.mean(cosines)),
            "ratio": _div(float(np.mean(sizes_a)), float(np.mean(sizes_b)))}


def _load_2d(two: str):
    """A ``--triplanar`` model, loaded before anything is measured; bad input is one line."""
    from napari_drdm.errors import DRDMError
    from napari_drdm.model import load_model
    try:
        m2 = load_model(two, device="cpu")
    except (DRDMError, OSError, ValueError) as e:
        raise SystemExit(f"--triplanar {two}: {e}") from None
    if m2.ndim != 2:
        raise SystemExit(f"--triplanar {two}: expected a 2D model, got a {m2.ndim}D one")
    return m2


def _triplanar_row(model, name: str, groups: dict, two: str, m2, upsample: int, ts) -> dict:
    """The 2D model ``m2`` (named ``two``) scored tri-planar on ``model``'s draws (same images, times, seeds)."""
    fn = triplanar_estimator(m2._net, int(m2.config.k_recursions), int(m2.config.input_padding), upsample)
    t0 = time.perf_counter()
    res = {g: [calibration(model, imgs, t, estimator=fn) for t in ts] for g, imgs in groups.items()}
    print(f"  {two} tri-planar on {name}'s draws: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"name": f"{Path(two).stem} tri-planar (x{upsample}) on {name}'s draws", "source": str(two),
            "sha256": m2.sha256, "ndim": 3, "triplanar_of": name, "upsample": upsample, "groups": res}


def table(rec) -> str:
    lines = ["| model | set | t | slope | in the anatomy | background | cos | size ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in rec["models"]:
        for group, rows in m["groups"].items():
            for r in rows:
                lines.append(f"| {m['name']} | {group} | {r['t']} | {r['slope']:.2f} | {r['slope_fg']:.2f} | "
                             f"{r['slope_bg']:.2f} | {r['cos']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap, ["cmr2d"], "bundled names (default: cmr2d)")
    ap.add_argument("--t", type=int, nargs="+", default=[5, 20, 40, 60, 79], help="diffusion times")
    ap.add_argument("--images", type=int, default=5, help="images per set (or brain source) (default 5)")
    ap.add_argument("--input-padding", type=int, default=None, metavar="PX",
                    help="pixels of mirrored image around the network's input (default: each model's own)")
    ap.add_argument("--triplanar", nargs="+", default=[], metavar="NAME",
                    help="for each 3D model, also score these 2D models' tri-planar estimates (bundled names or files)")
    ap.add_argument("--triplanar-upsample", type=int, default=1, metavar="N",
                    help="upsample the slices N times for the 2D model (default 1)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="save the record here")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    if a.images < 1:
        raise SystemExit(f"--images: expected a positive number, got {a.images}")
    if a.triplanar_upsample < 1:
        raise SystemExit(f"--triplanar-upsample: expected a positive number, got {a.triplanar_upsample}")
    models = _models(a.models, a.extra)
    twos = [(two, _load_2d(two)) for two in a.triplanar]
    if a.threads:
        torch.set_num_threads(a.threads)
    from napari_drdm.model import load_model
    rec = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "t": a.t, "images": a.images,
           "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__},
           "command": " ".join(["python"] + sys.argv), "models": []}
    for name, src in models:
        model = load_model(src, device="cpu")
        groups = _groups(model, a.eval_dir, a.kit, a.images)
        if not groups:
            raise SystemExit(f"{name}: no evaluation images found (--eval-dir {a.eval_dir} / --kit {a.kit})")
        t0 = time.perf_counter()
        res = {g: [calibration(model, imgs, t, a.input_padding) for t in a.t] for g, imgs in groups.items()}
        print(f"  {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        rec["models"].append({"name": name, "source": str(src), "sha256": model.sha256, "ndim": model.ndim,
                              "input_padding": model.config.input_padding if a.input_padding is None
                              else a.input_padding, "groups": res})
        if model.ndim == 3:
            rec["models"] += [_triplanar_row(model, name, groups, two, m2, a.triplanar_upsample, a.t)
                              for two, m2 in twos]
    save_record(a.json, rec)
    print(table(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
