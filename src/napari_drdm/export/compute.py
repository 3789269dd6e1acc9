"""The computation of a dataset export: one batch of inputs sharing a model and T'.

Algorithm 3 (segmentation sets): per output, a DRDM deformation phi (Algorithm 2) on the model's
grid, resized to the input's own grid, warps the image (dtype and range kept) and the labels
(values kept).  Algorithm 4 (registration pairs): phi_aug from I0 gives I_mv = warp(I0, phi_aug);
phi_syn from Algorithm 2 on I_mv gives I_fx = warp(I0, compose(first=phi_syn, then=phi_aug)), so
that I_fx(x) ~= I_mv(x + phi_syn(x)).  Optionally, the fixed-point inverse of each written field.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple

import numpy as np

from ..core.spatial import invert_field
from .jobspec import Job
from .sample import LoadedSample

if TYPE_CHECKING:
    from .options import ExportOptions

__all__ = ["compute_batch"]


def _render(ls: LoadedSample, ddf, label_interp: str):
    """Warp the original-grid image (input dtype/range kept) and labels (values kept) by ``ddf``."""
    from ..core.spatial import warp, warp_labels
    model, img = ls.model, ls.image
    lo, hi = ls.lo, ls.hi
    out = (warp(ls.x - lo, ddf, model.config.image_interp, "zeros") + lo).clamp(lo, hi)[0, 0].cpu().numpy()
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(img.dtype, copy=False)
    lab = None
    if ls.lab_t is not None:
        lab = warp_labels(ls.lab_t, ddf, label_interp, ls.background)[0, 0].cpu().numpy()
        lab = lab.astype(ls.labels.dtype)
    return out, lab


def compute_batch(members: List[Tuple[LoadedSample, Job]], opts: ExportOptions) -> List[dict]:
    """Run one batch (same model and T'): arrays, fields (pixels, original grid) and metrics per member."""
    import torch

    from ..core.metrics import field_metrics
    from ..core.spatial import compose
    model = members[0][0].model
    seeds = [j.seeds[0] for _, j in members]
    x = torch.cat([ls.x_model for ls, _ in members])
    key = members[0][1].key
    phi_m, _ = model.generate_model_grid(x, key[0], seeds, **opts.loop_options())
    outs = []
    for b, (ls, _job) in enumerate(members):
        ddf = ls.grid.field_to_original(phi_m[b:b + 1], opts.fold_guard)
        o = {"metrics": field_metrics(phi_m[b], side=model.size)}
        if opts.mode == "pairs":
            o["moving"], o["moving_labels"] = _render(ls, ddf, opts.label_interp)
            o["phi_aug"] = ddf
            o["aug_metrics"] = o.pop("metrics")
        else:
            o["image"], o["labels"] = _render(ls, ddf, opts.label_interp)
            o["ddf_t"] = ddf
        outs.append(o)
    if opts.mode == "pairs":
        xs = torch.cat([model.prepare(o["moving"], ls.spacing)[1] for o, (ls, _) in zip(outs, members)])
        phi_s, _ = model.generate_model_grid(xs, key[1], [j.seeds[1] for _, j in members], **opts.loop_options())
        for b, (o, (ls, _job)) in enumerate(zip(outs, members)):
            syn = ls.grid.field_to_original(phi_s[b:b + 1], opts.fold_guard)
            total = compose(syn, o.pop("phi_aug"), "border")
            o["fixed"], o["fixed_labels"] = _render(ls, total, opts.label_interp)
            o["ddf_t"] = syn
            o["metrics"] = field_metrics(phi_s[b], side=model.size)
    for o, (ls, _) in zip(outs, members):
        if opts.inverse:
            inv, res = invert_field(o["ddf_t"], ls.spacing, opts.inverse_iterations)
            o["inverse_ddf"] = inv[0].cpu().numpy()
            o["residual"] = res
        o["ddf"] = o.pop("ddf_t")[0].cpu().numpy()
    return outs
