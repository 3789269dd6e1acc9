"""``drdm evaluate``: the paper's Table 1 protocol over many samples, printed as one JSON object.

For every T': ``--samples`` generations, cycling through the images with seeds 0, 1, ...; each
image is normalised and resampled to the model grid (``--size`` overrides the model's side for
reference checkpoints); magnitudes and folding are measured on that grid, for the recovered
field phi and the forward field psi_{T':1}.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..validate import arg_type, check_int, check_seed
from . import (
    add_model_args,
    anatomy_fit_arg,
    background_margin_arg,
    checked_anatomy_fit,
    checked_background_margin,
    checked_input_padding,
    compose_padding_arg,
    input_padding_arg,
    k_arg,
    keep_size_arg,
    load_from_args,
    schedule_arg,
)


def add_parser(sub):
    p = sub.add_parser("evaluate", help="Table-1 statistics (displacement, folding) over many samples")
    add_model_args(p)
    p.add_argument("--images", nargs="+", required=True,
                   help="image files or folders (NIfTI, NRRD, PNG/JPEG, .npy, or .npz with an 'images' array)")
    p.add_argument("--t-prime", type=arg_type(check_int, "--t-prime", lo=0), nargs="+", default=[30, 45, 70])
    p.add_argument("--samples", type=arg_type(check_int, "--samples", lo=1), default=40,
                   help="generations per T' (default 40)")
    schedule_arg(p)
    compose_padding_arg(p)
    input_padding_arg(p)
    background_margin_arg(p)
    anatomy_fit_arg(p)
    keep_size_arg(p)
    k_arg(p)
    p.add_argument("--slices", type=arg_type(check_int, "--slices", lo=1), default=5,
                   help="for a 2D model given 3D volumes: this many evenly spaced foreground slices per volume, "
                        "along every axis in --slice-axes")
    p.add_argument("--slice-axes", default="2", help="axes to slice 3D volumes along, e.g. '0,1,2' (default '2')")
    p.add_argument("--batch", type=arg_type(check_int, "--batch", lo=1), default=1, help="samples per network pass")
    p.add_argument("--seed-offset", type=arg_type(check_seed, "--seed-offset"), default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON object (default prints it too)")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr")
    p.add_argument("--fold-guard", action="store_true",
                   help="also report every generation with and without the fold guard (same seeds): folding "
                        "(central and strict; mean and share of generations with any fold), max/mean displacement, "
                        "inverse-field residual, time per generation (key 'fold_guard')")
    return p


def collect_images(paths, ndim: int, slices: int = 5, slice_axes=(2,)):
    """List of (name, array, spacing) of model dimension; 3D volumes are sliced for 2D models."""
    import numpy as np

    from ..io import is_readable, read_stack

    files = []
    for p in paths:
        q = Path(p)
        if q.is_dir() and not any(q.glob("*.dcm")):
            files += sorted(f for f in q.iterdir() if is_readable(f))
        elif q.exists():
            files.append(q)
        else:
            raise FileNotFoundError(f"image not found: {q}")
    out = []
    for f in files:
        for vol in read_stack(f):
            a = np.asarray(vol.data)
            if a.ndim == ndim + 1 and a.shape[-1] == 1:
                a = a[..., 0]
            sp = tuple(vol.spacing[: a.ndim])
            if a.ndim == ndim:
                out.append((vol.path, a, sp))
            elif a.ndim == 3 and ndim == 2:
                for ax in slice_axes:
                    fg = np.array([np.mean(np.take(a, i, axis=ax) > a.min() + 0.05 * (a.max() - a.min()))
                                   for i in range(a.shape[ax])])
                    idx = np.flatnonzero(fg > 0.15)
                    if idx.size == 0:
                        continue
                    pick = idx[np.linspace(0, idx.size - 1, slices + 2)[1:-1].round().astype(int)]
                    for i in pick:
                        out.append((f"{vol.path}[axis{ax}={i}]", np.take(a, i, axis=ax),
                                    tuple(s for j, s in enumerate(sp) if j != ax)))
            else:
                raise InputError(f"{vol.path}: {a.ndim}D image (shape {a.shape}) for a {ndim}D model")
    if not out:
        raise InputError("no usable images found in " + ", ".join(map(str, paths)))
    return out


#: the figures kept per generation (``results[i]["generations"]``), to tell which images a mean hides
GENERATION_KEYS = ("folding_pct", "max_disp_pct", "mean_disp_pct", "affine_zoom", "affine_rotation_deg",
                   "fg_out_of_view_pct", "anatomy_folding_pct", "anatomy_max_disp_pct")

PLAUSIBILITY_KEYS = ("affine_share_pct", "affine_zoom", "affine_rotation_deg", "affine_residual_max_pct",
                     "affine_residual_mean_pct", "fg_out_of_view_pct", "anatomy_folding_pct",
                     "anatomy_max_disp_pct", "anatomy_share_pct")


def _stats(values):
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def evaluate(model, images, t_primes, samples, schedule=None, k=None, batch=1, seed_offset=0, progress=False,
             on_batch=None, compose_padding=None, input_padding=None, background_margin=None, anatomy_fit=None,
             keep_size=None):
    """Generation ``i`` (0 <= i < ``samples``) of each T' runs on image ``i mod len(images)`` with seed
    ``seed_offset + i``.  Returns one record per T': mean/SD/min/max of the recovered field's figures,
    the plausibility figures and the forward field's, and ``generations`` (one dict per generation:
    ``image`` (its name), ``seed`` and the figures of :data:`GENERATION_KEYS`), so that a mean can be
    traced to the images behind it.

    Args:
        model: a :class:`~napari_drdm.model.DRDM`.
        images: (name, array, spacing) triples (:func:`collect_images`).
        t_primes: the T' values.  samples: generations per T'.
        schedule, k, compose_padding, input_padding, background_margin, anatomy_fit, keep_size: the reverse
            loop's options (None: the model's).
        batch: generations per network pass.  seed_offset: the first seed.
        progress: a counter on stderr.  on_batch: called as ``on_batch(t_prime, phi, seeds, seconds)``.
    """
    import torch

    from ..core.metrics import field_metrics, jacobian_determinant, plausibility_metrics
    prepared = [model.prepare(a, sp)[1] for _, a, sp in images]
    results = []
    total = len(t_primes) * samples
    done = 0
    for tp in t_primes:
        rows = []
        t0 = time.perf_counter()
        for start in range(0, samples, batch):
            ids = list(range(start, min(samples, start + batch)))
            x = torch.cat([prepared[i % len(prepared)] for i in ids], 0)
            seeds = [seed_offset + i for i in ids]
            tb = time.perf_counter()
            bg, view, kept = {}, {}, {}
            phi, psi = model.generate_model_grid(x, tp, seeds, schedule=schedule, k=k, compose_padding=compose_padding,
                                                 input_padding=input_padding, background_margin=background_margin,
                                                 background_report=bg, anatomy_fit=anatomy_fit, view_report=view,
                                                 keep_size=keep_size, size_report=kept)
            if on_batch is not None:      # e.g. the fold-guard comparison (fold_report.GuardCollector)
                on_batch(tp, phi, seeds, time.perf_counter() - tb)
            for b in range(len(ids)):
                det = jacobian_determinant(phi[b])
                rec = field_metrics(phi[b], side=model.size, det=det)
                rec.update(plausibility_metrics(x[b, 0].cpu().numpy(), phi[b], side=model.size, det=det))
                fwd = field_metrics(psi[b], side=model.size)
                rows.append((rec, fwd, {"image": images[ids[b] % len(images)][0], "seed": seeds[b],
                                        **{key: float(rec[key]) for key in GENERATION_KEYS},
                                        "forward_folding_pct": float(fwd["folding_pct"]),
                                        "background_replaced_pct": float(bg["replaced_pct"][b]),
                                        "view_zoom": float(view["zoom"][b]),
                                        "zoom_removed": float(kept["zoom_removed"][b])}))
            done += len(ids)
            if progress:
                print(f"\r[evaluate] {done}/{total}", end="", file=sys.stderr, flush=True)
        secs = (time.perf_counter() - t0) / samples
        results.append({
            "t_prime": tp, "n": len(rows),
            "max_disp_pct": _stats([r[0]["max_disp_pct"] for r in rows]),
            "mean_disp_pct": _stats([r[0]["mean_disp_pct"] for r in rows]),
            "folding_pct": _stats([r[0]["folding_pct"] for r in rows]),
            "plausibility": {key: _stats([r[0][key] for r in rows]) for key in PLAUSIBILITY_KEYS},
            "forward": {"max_disp_pct": _stats([r[1]["max_disp_pct"] for r in rows]),
                        "mean_disp_pct": _stats([r[1]["mean_disp_pct"] for r in rows]),
                        "folding_pct": _stats([r[1]["folding_pct"] for r in rows])},
            "generations": [r[2] for r in rows],
            "seconds_per_image": secs})
    if progress:
        print(file=sys.stderr)
    return results


def _input_ndim(paths) -> int:
    """3 when the first readable input is a volume, else 2 (chooses the default model)."""
    import numpy as np

    from ..io import is_readable, read_stack, squeeze_trailing
    for p in paths:
        q = Path(p)
        files = sorted(f for f in q.iterdir() if is_readable(f)) if q.is_dir() and not any(q.glob("*.dcm")) else [q]
        for f in files:
            for vol in read_stack(f):
                return 3 if squeeze_trailing(np.asarray(vol.data)).ndim == 3 else 2
    return 2


def run(args) -> int:
    from ..model import resolve_anatomy_fit, resolve_background_margin, resolve_keep_size
    from ..validate import check_t_prime
    axes = tuple(check_int("--slice-axes", a, 0, 2) for a in str(args.slice_axes).split(",") if a.strip())
    model = load_from_args(args, ndim=_input_ndim(args.images) if args.weights is None else 2)
    for tp in args.t_prime:
        check_t_prime(tp, model.config.n_steps, name="--t-prime")
    input_padding = checked_input_padding(args, model)
    margin = checked_background_margin(args, model)
    fit = checked_anatomy_fit(args, model)
    images = collect_images(args.images, model.ndim, args.slices, axes)
    guard = None
    if args.fold_guard:
        from ..fold_report import GuardCollector
        guard = GuardCollector(model.size)
    results = evaluate(model, images, args.t_prime, args.samples, args.schedule, args.k, args.batch,
                       args.seed_offset, args.progress, on_batch=guard, compose_padding=args.compose_padding,
                       input_padding=input_padding, background_margin=margin, anatomy_fit=fit,
                       keep_size=args.keep_size)
    schedule = args.schedule or model.config.schedule
    out = {"weights": model.name, "weights_sha256": model.sha256, "schedule": schedule,
           "loop_extra": model.config.loop_extra_for(schedule),
           "compose_padding": args.compose_padding or model.config.compose_padding,
           "input_padding": model.config.input_padding if input_padding is None else input_padding,
           "background_margin": resolve_background_margin(margin, model.config),
           "anatomy_fit": resolve_anatomy_fit(fit, model.config),
           "keep_size": resolve_keep_size(args.keep_size, model.config),
           "k": args.k or model.config.k_recursions, "size": model.size, "device": str(model.device),
           "n_images": len(images), "units": {"disp": "% of the model-grid side", "folding": "% of pixels with det(J) <= 0",
                     "plausibility": "affine_share_pct: % of the recovered field's energy explained by one "
                                     "global affine map; affine_zoom: apparent size of the anatomy (1 = unchanged); "
                                     "affine_rotation_deg; affine_residual_*_pct: the non-affine part, % of side; "
                                     "fg_out_of_view_pct: % of the image's foreground pushed out of view; "
                                     "anatomy_folding_pct / anatomy_max_disp_pct: folding and maximum "
                                     "displacement over the pixels that show the foreground after warping"},
           "results": results}
    if guard is not None:
        out["fold_guard"] = guard.results()
    print(json.dumps(out, indent=None if args.json else 2))
    return 0
