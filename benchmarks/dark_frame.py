"""Does a model inflate whatever sits in a dark frame?  The same slices, framed differently.

For each model and each unseen 2D set, every image is prepared as ``drdm evaluate`` prepares it
(normalised, on the model grid) and generated three ways with the same seeds: as it is; shrunk
about its centre into a dark (zero) frame (``--shrink``, default 0.7: the anatomy fills 70 % of
the side); and magnified about its centre (``--magnify``, default 1.3: less of any dark margin
is left); with ``--fit-margin m``, also fitted to the anatomy (the foreground's box, made square
and widened by m of its side on each side, fills the grid); with ``--coarsen FY FX``, also
resampled as if acquired with pixels FY x FX times larger (averaged down per axis and
interpolated back, training/classic_augment.coarse_resample: what the ITK KmeansTest head's
2 x 3 mm voxels look like next to the 1 mm brainbrowser head); with ``--cut k``, also cut as a
field of view that ends inside the anatomy would (every column beyond k of the foreground's
width, from its left edge, set to zero: the KmeansTest slices lose the face that way); with
``--combined``, also all of the requested cut, coarsening and shrinking at once, in that order.
``--only`` keeps some framings, ``--indices`` picks the images.  Printed per model, set and framing:
the zoom of the least-squares affine part of the recovered field (``affine_zoom``: 1 = the
anatomy keeps its size), the share of the field that affine map explains, the folding and the
maximum displacement (% of the side), mean +- SD over the generations.  A model that reads a
dark frame as "content pulled in from outside" expands the shrunk images (zoom well above 1)
and the magnified ones less.

    python benchmarks/make_eval_sets.py --kit cache/kit --out cache/eval     # once
    python benchmarks/dark_frame.py --models cmr2d --sets ct brain --images 2 --threads 1 \\
        --json benchmarks/results/dark_frame_cmr2d.json
    python benchmarks/dark_frame.py --models --extra new=runs/x/export.safetensors ...   # a run's export
    python benchmarks/dark_frame.py --models cmr2d --sets brain --indices 5 6 7 8 9 --coarsen 2 3 \\
        --cut 0.8 --shrink 0.8 --combined --threads 1 --json benchmarks/results/cues_brainbrowser.json

Generation i uses image i of the set and seed i (as ``drdm evaluate``), T' = ``--t-prime`` (45),
each model's default reverse loop.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src", ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from weights_table import SETS_2D, _models  # noqa: E402

from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402
from training.classic_augment import coarse_resample  # noqa: E402


def reframe(x: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, 1, S, S) images scaled by ``factor`` about the centre on the same grid: below 1 the
    content shrinks into a zero frame, above 1 it is magnified and its edges leave the view."""
    if factor == 1.0:
        return x.clone()
    B = x.shape[0]
    theta = torch.zeros(B, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fit_to_anatomy(x: torch.Tensor, margin: float, threshold: float) -> torch.Tensor:
    """(B, 1, S, S) images with their foreground (> ``threshold``) box, made square and widened by
    ``margin`` of its side on each side, resampled to the whole grid (zero outside the image)."""
    out = []
    S = x.shape[-1]
    for img in x:
        fg = torch.nonzero(img[0] > threshold)
        if fg.numel() == 0:
            out.append(img.clone())
            continue
        lo, hi = fg.min(0).values.float(), fg.max(0).values.float()
        centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 + 0.5
        half = half * (1.0 + 2.0 * margin)
        theta = torch.zeros(1, 2, 3, dtype=x.dtype)
        theta[0, 0, 0] = theta[0, 1, 1] = half / (S / 2)
        theta[0, 0, 2] = (float(centre[1]) + 0.5) / (S / 2) - 1.0     # x <- columns
        theta[0, 1, 2] = (float(centre[0]) + 0.5) / (S / 2) - 1.0     # y <- rows
        grid = F.affine_grid(theta, [1, 1, S, S], align_corners=False)
        out.append(F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0])
    return torch.stack(out)


def cut_anatomy(x: torch.Tensor, keep: float, threshold: float) -> torch.Tensor:
    """(B, 1, S, S) images with every column beyond ``keep`` of the foreground's (> ``threshold``)
    width, from its left edge, set to zero: a field of view that ends inside the anatomy."""
    out = x.clone()
    for b in range(x.shape[0]):
        cols = torch.nonzero(x[b, 0].amax(0) > threshold).flatten()
        if cols.numel():
            lo, hi = int(cols.min()), int(cols.max())
            out[b, :, :, lo + int(round(keep * (hi - lo))) + 1:] = 0
    return out


def _stats(values):
    return {"mean": float(statistics.fmean(values)),
            "sd": float(statistics.stdev(values)) if len(values) > 1 else 0.0}


def run(models, eval_dir: Path, sets, n_images: int, t_prime: int, shrink: float, magnify: float, log=print,
        fit_margin: Optional[float] = None, coarsen=None, only=None, indices=None, cut: Optional[float] = None,
        combined: bool = False):
    """Rows of figures per model, set and framing (``only``: framings whose name starts with one of
    these; ``indices``: these images of each set, generation i on image i with seed i)."""
    from napari_drdm.commands.evaluate import collect_images
    from napari_drdm.core.metrics import FG_THRESHOLD, affine_fit, field_metrics
    from napari_drdm.model import load_model
    # name: (the scale factor recorded in the JSON, or None; the framing itself)
    framings = {name: (f, lambda x, f=f: reframe(x, f)) for name, f in (
        ("as is", 1.0), (f"shrunk {shrink:g} in a dark frame", shrink), (f"magnified {magnify:g}", magnify))}
    if fit_margin is not None:
        framings[f"fitted to the anatomy, margin {fit_margin:g}"] = (
            None, lambda x: fit_to_anatomy(x, fit_margin, FG_THRESHOLD))
    if coarsen is not None:
        framings["coarsened {:g} x {:g}".format(*coarsen)] = (None, lambda x: coarse_resample(x, coarsen))
    if cut is not None:
        framings[f"cut at {cut:g} of the anatomy"] = (None, lambda x: cut_anatomy(x, cut, FG_THRESHOLD))
    if combined:
        def all_cues(x):
            if cut is not None:
                x = cut_anatomy(x, cut, FG_THRESHOLD)
            if coarsen is not None:
                x = coarse_resample(x, coarsen)
            return reframe(x, shrink)
        parts = ([f"cut {cut:g}"] if cut is not None else []) + (
            ["coarsened {:g} x {:g}".format(*coarsen)] if coarsen is not None else []) + [f"shrunk {shrink:g}"]
        framings["combined: " + ", ".join(parts)] = (None, all_cues)
    if only:
        framings = {k: v for k, v in framings.items() if any(k.startswith(o) for o in only)}
        if not framings:
            raise SystemExit(f"--only {' '.join(only)}: no framing of this run starts with that")
    rows = []
    for name, src in models:
        model = load_model(src)
        if model.ndim != 2:
            log(f"  skip {name}: a {model.ndim}D model (the framings are 2D)")
            continue
        for set_name in sets:
            path = eval_dir / SETS_2D[set_name]
            if not path.exists():
                raise SystemExit(f"{path}: not found; run benchmarks/make_eval_sets.py --kit cache/kit --out {eval_dir}")
            images = collect_images([str(path)], 2)
            picked = list(indices) if indices else list(range(min(n_images, len(images))))
            if max(picked) >= len(images):
                raise SystemExit(f"--indices: {path} has {len(images)} images (0..{len(images) - 1})")
            prepared = [(i, model.prepare(images[i][1], images[i][2])[1]) for i in picked]
            for framing, (factor, frame) in framings.items():
                per = []
                for i, x in prepared:
                    t0 = time.perf_counter()
                    phi, _ = model.generate_model_grid(frame(x), t_prime, seeds=[i])
                    u = phi[0].cpu().numpy()
                    fm, af = field_metrics(u), affine_fit(u)
                    per.append({"image": i, "affine_zoom": af["affine_zoom"], "affine_share_pct": af["affine_share_pct"],
                                "folding_pct": fm["folding_pct"], "max_disp_pct": fm["max_disp_pct"],
                                "seconds": time.perf_counter() - t0})
                    log(f"  {name} {set_name} {framing} image {i}: zoom {per[-1]['affine_zoom']:.3f}, "
                        f"folding {per[-1]['folding_pct']:.2f} %")
                row = {"model": name, "set": set_name, "framing": framing, "factor": factor,
                       "generations": len(per), "per_generation": per}
                for key in ("affine_zoom", "affine_share_pct", "folding_pct", "max_disp_pct"):
                    row[key] = _stats([p[key] for p in per])
                rows.append(row)
    return rows


def table(rows) -> str:
    out = ["| model | set | framing | zoom | affine share % | folding % | max disp % | generations |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    def f(r, key, nd):
        return f"{r[key]['mean']:.{nd}f} ± {r[key]['sd']:.{nd}f}"
    for r in rows:
        out.append(f"| {r['model']} | {r['set']} | {r['framing']} | {f(r, 'affine_zoom', 3)} | "
                   f"{f(r, 'affine_share_pct', 0)} | {f(r, 'folding_pct', 2)} | {f(r, 'max_disp_pct', 1)} | "
                   f"{r['generations']} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None, help="bundled names (default: every 2D model; alone: none)")
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATH", help="checkpoints not (yet) bundled")
    ap.add_argument("--eval-dir", default="cache/eval", help="2D sets from benchmarks/make_eval_sets.py")
    ap.add_argument("--sets", nargs="+", default=["ct", "brain"], choices=sorted(SETS_2D))
    ap.add_argument("--images", type=int, default=2, help="images per set (generation i: image i, seed i)")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--shrink", type=float, default=0.7, help="scale of the dark-frame variant, in (0, 1)")
    ap.add_argument("--magnify", type=float, default=1.3, help="scale of the magnified variant, > 1")
    ap.add_argument("--fit-margin", type=float, default=None,
                    help="add a framing: the foreground's box, made square and widened by this share of "
                         "its side on each side, resampled to the grid (e.g. 0.05)")
    ap.add_argument("--coarsen", type=float, nargs=2, default=None, metavar=("FY", "FX"),
                    help="add a framing: pixels FY x FX times larger (rows, columns), each >= 1")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="keep the framings whose name starts with these ('as is', shrunk, magnified, "
                         "fitted, coarsened, cut, combined)")
    ap.add_argument("--cut", type=float, default=None, metavar="K",
                    help="add a framing: every column beyond K of the anatomy's width set to zero, K in (0, 1)")
    ap.add_argument("--combined", action="store_true",
                    help="add a framing with the requested cut and coarsening and the shrinking together")
    ap.add_argument("--indices", type=int, nargs="+", default=None,
                    help="these images of each set instead of the first --images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every figure here")
    add_force_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args.force, args.json)
    if not 0.0 < args.shrink < 1.0:
        raise SystemExit(f"--shrink must lie in (0, 1), got {args.shrink}")
    if args.magnify <= 1.0:
        raise SystemExit(f"--magnify must be above 1, got {args.magnify}")
    if args.fit_margin is not None and not 0.0 <= args.fit_margin <= 0.5:
        raise SystemExit(f"--fit-margin must lie in [0, 0.5], got {args.fit_margin}")
    if args.images < 1:
        raise SystemExit(f"--images must be at least 1, got {args.images}")
    if args.coarsen is not None and min(args.coarsen) < 1.0:
        raise SystemExit(f"--coarsen factors must be >= 1, got {args.coarsen[0]:g} {args.coarsen[1]:g}")
    if args.cut is not None and not 0.0 < args.cut < 1.0:
        raise SystemExit(f"--cut must lie in (0, 1), got {args.cut}")
    if args.indices is not None and min(args.indices) < 0:
        raise SystemExit(f"--indices must be >= 0, got {min(args.indices)}")
    torch.set_num_threads(args.threads)
    rows = run(_models(args.models, args.extra), Path(args.eval_dir), args.sets, args.images, args.t_prime,
               args.shrink, args.magnify, fit_margin=args.fit_margin, coarsen=args.coarsen, only=args.only,
               indices=args.indices, cut=args.cut, combined=args.combined)
    print(table(rows))
    if args.json:
        rec = {"command": " ".join(["python", "benchmarks/dark_frame.py"] + list(argv if argv is not None else sys.argv[1:])),
               "torch": torch.__version__, "machine": platform.machine(), "t_prime": args.t_prime, "rows": rows}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rec, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
