"""``drdm generate``: one DRDM generation (Algorithm 2) on one image, written as NIfTI + JSON."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from ..validate import arg_type, check_int, check_positive
from . import (
    add_fold_guard_arg,
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
    label_interp_arg,
    load_from_args,
    schedule_arg,
    seed_arg,
)


def add_parser(sub):
    p = sub.add_parser("generate", help="deform one image (and its labels) with a recovered DRDM deformation")
    p.add_argument("image", help="input image: NIfTI, NRRD, DICOM (file or series folder), PNG/JPEG, .npy")
    p.add_argument("--labels", help="label map on the same grid (integer values)")
    add_model_args(p)
    p.add_argument("--t-prime", type=arg_type(check_int, "--t-prime", lo=0), default=45,
                   help="diffusion level T' (0..T, default 45)")
    seed_arg(p)
    schedule_arg(p)
    compose_padding_arg(p)
    input_padding_arg(p)
    background_margin_arg(p)
    anatomy_fit_arg(p)
    keep_size_arg(p)
    k_arg(p, help="internal recursions K >= 1 (default: the model's, 2)")
    label_interp_arg(p)
    add_fold_guard_arg(p, default=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default=None, help="output file prefix (default: input name)")
    p.add_argument("--forward-ddf", action="store_true", help="also write the forward field psi_{T':1}")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--max-memory", type=arg_type(check_positive, "--max-memory"), default=None, metavar="GB",
                   help="memory budget for the estimate made before work (default: the memory available)")
    return p


def run(args) -> int:
    import numpy as np

    from ..checks import check_image, check_labels
    from ..core.config import keep_size_name
    from ..core.metrics import affine_text, field_affine
    from ..io import read_image, squeeze_trailing, stem_of
    from ..memory import available_memory, check_memory, estimate_export_bytes
    from ..output_lock import OutputLock
    from ..outputs import result_paths, write_result
    from ..paths import check_output_dir, check_utf8_name
    from ..validate import check_t_prime

    for p in (args.image, args.labels):
        if p:
            check_utf8_name(p)
            if not Path(p).exists():
                raise FileNotFoundError(f"input not found: {p}")
    check_t_prime(args.t_prime, name="--t-prime")
    stem = args.prefix or stem_of(args.image)
    # the output folder is checked (writable, no clash) and locked before anything is computed
    check_output_dir(args.out)
    result_paths(args.out, stem, bool(args.labels), args.forward_ddf, args.overwrite)
    with OutputLock(args.out, what="drdm generate"):
        vol = read_image(args.image)
        lab_vol = read_image(args.labels) if args.labels else None
        data = squeeze_trailing(vol.data)                  # NIfTI 2D read as (x, y, 1)
        model = load_from_args(args, ndim=data.ndim if data.ndim in (2, 3) else 2)
        check_t_prime(args.t_prime, model.config.n_steps, name="--t-prime")
        input_padding = checked_input_padding(args, model)
        margin = checked_background_margin(args, model)
        fit = checked_anatomy_fit(args, model)
        labels = None
        if lab_vol is not None:
            labels = lab_vol.data
            if labels.ndim == data.ndim + 1 and labels.shape[-1] == 1:
                labels = labels[..., 0]
            if labels.shape != data.shape:
                raise InputError(f"labels {args.labels} have shape {labels.shape}, image {args.image} has {data.shape}")
        data = check_image(data, model.ndim, args.image)      # named by their files, before any work
        if labels is not None:
            labels = check_labels(labels, data.shape, args.labels)
        budget = int(args.max_memory * 1e9) if args.max_memory else available_memory()
        est = estimate_export_bytes(data.shape, np.asarray(data).dtype.itemsize, model.size, model.config.channels,
                                    1, labels is not None, frames=0)
        check_memory(est, budget, str(args.image))
        t0 = time.perf_counter()
        res = model.generate(data, labels, t_prime=args.t_prime, seed=args.seed, schedule=args.schedule,
                             k=args.k, spacing=vol.spacing[: data.ndim], label_interp=args.label_interp,
                             fold_guard=args.fold_guard, compose_padding=args.compose_padding,
                             input_padding=input_padding, background_margin=margin, anatomy_fit=fit,
                             keep_size=args.keep_size)
        secs = time.perf_counter() - t0
        affine = field_affine(res.ddf)             # the written field's global affine part
        vol.spacing = tuple(vol.spacing[: data.ndim])
        extra = {"input": str(Path(args.image).resolve()),
                 "labels_input": str(Path(args.labels).resolve()) if args.labels else None,
                 "weights": model.name, "weights_sha256": model.sha256, "device": str(model.device),
                 "seconds": round(secs, 3), "model_size": model.size, "fold_guard": res.guard,
                 "input_padding": res.input_padding,                 # the one used
                 "background_margin": res.background_margin,         # the one used (None: off)
                 "background_replaced_pct": round(res.background_replaced_pct, 3),
                 "affine": {k: round(float(v), 4) for k, v in affine.items()},
                 "label_values": sorted(int(v) for v in np.unique(res.labels)) if res.labels is not None else None}
        paths = write_result(args.out, stem, res, vol, lab_vol, overwrite=args.overwrite,
                             extra=extra, write_forward=args.forward_ddf)
    m = res.metrics
    pad_in = (f" input_padding={res.input_padding}px"
              if res.input_padding or res.input_padding != model.config.input_padding else "")
    if res.background_margin is not None or model.config.background_margin is not None:
        pad_in += (f" background_margin={res.background_margin}px ({res.background_replaced_pct:.1f} % extended)"
                   if res.background_margin is not None else " background_margin=off")
    if res.anatomy_fit is not None or model.config.anatomy_fit is not None:
        pad_in += (f" anatomy_fit={res.anatomy_fit}px (view x{res.view_zoom:.2f})"
                   if res.anatomy_fit is not None else " anatomy_fit=off")
    if res.keep_size or model.config.keep_size:
        pad_in += (f" keep_size={keep_size_name(res.keep_size)} (zoom {res.zoom_removed:.3f} removed)"
                   if res.keep_size else " keep_size=off")
    loop = f" (from T'+{res.loop_extra})" if res.loop_extra else ""
    print(f"T'={args.t_prime} seed={args.seed} schedule={res.schedule}{loop} padding={res.compose_padding}{pad_in}: "
          f"max {m['max_disp_pct']:.2f} % / mean {m['mean_disp_pct']:.2f} % of side, "
          f"folding {m['folding_pct']:.3f} % ({secs:.1f} s)")
    print(affine_text(affine))
    if res.guard is not None:
        print(f"fold guard: {res.guard['folded_pct_before'][0]:.3f} % of model-grid pixels folded before "
              f"(central or strict check), {res.guard['changed_pct'][0]:.3f} % changed; the written field is fold-free")
    for k, p in paths.items():
        print(f"  {k}: {p}")
    return 0
