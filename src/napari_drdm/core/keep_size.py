"""The anatomy keeps its size: the generated deformation's global zoom taken out.

A recovered deformation is meant to be local, anatomical variation.  Fine-tuned 2D networks
still inflate brain slices by a few per cent as a whole (``affine_zoom`` in the plausibility
figures, core/metrics.py: 1.06 for ``general2d`` on the held-out brain slices), and a zoom of the
whole anatomy moves its rim by more than any local change does.  :func:`remove_global_scale`
takes that one number out of a generated field and leaves everything else as it was.

With ``y(x) = x + u(x)`` the pull-back map of the field (the output at ``x`` shows the input at
``y(x)``), a least-squares fit ``y ~ M x + c`` over the output's anatomy (the pixels above
``threshold`` in the deformed image) gives the global scale ``s = |det M|^(1/d)``; the new map is
``y'(x) = p + (y(x) - p) / s`` with ``p`` the mean of ``y`` over the same pixels, so the anatomy
stays where the generation put it.  ``y'`` is ``y`` followed by one similarity, so it folds
exactly where ``y`` folds (every Jacobian determinant is divided by ``s^d > 0``), its rotation,
shear and local part are unchanged, and refitting it over the same pixels gives ``|det M'| = 1``.
The fit is over the output's anatomy, not the whole grid, so the whole-grid ``affine_zoom`` of
the plausibility figures need not come out 1 (1.040 for ``general2d``'s brain slices, docs/weights.md).

One-sided (``inflation_only``, the setting ``"inflation"``): the scale is taken out only where the
anatomy came out enlarged (zoom > 1); an anatomy the generation shrank is left as it is.  Taking a
shrink out enlarges the anatomy, and on images whose anatomy fills the view that pushes it out of
the field of view (docs/weights.md, session 20: CT 0.26 -> 1.27 % out of view with the two-sided
option); taking an enlargement out shrinks the anatomy towards its centre, which shows more of the
image, not less.

A model setting and an inference option: ``DRDMConfig.keep_size`` (False: off), applied by
``DRDM.iter_generate`` / ``generate_model_grid`` to the final field on the model's whole grid,
after the background extension and before the fold guard's final check.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .config import KEEP_SIZE_INFLATION
from .metrics import FG_THRESHOLD
from .spatial import warp

__all__ = ["apply_keep_size", "remove_global_scale", "MIN_ANATOMY_PX", "MIN_SPREAD_PX", "KEEP_SIZE_INFLATION"]

MIN_ANATOMY_PX = 64     # fewer anatomy pixels than this in the output: the field is left as it is
MIN_SPREAD_PX = 2.0     # anatomy thinner than this (SD along its narrowest direction, pixels): no
                        # scale is fitted (a thin band's determinant is noise; left as it is)


def apply_keep_size(phi: torch.Tensor, image: torch.Tensor, keep, image_interp: str = "linear"
                    ) -> Tuple[torch.Tensor, List[float]]:
    """A model's ``keep_size`` setting applied to its final fields.

    Args:
        phi: pull-back displacement fields in pixels, (B, d, *S).
        image: the images they deform, (B, 1, *S), min-max normalised (the model grid).
        keep: a resolved ``DRDMConfig.keep_size``: falsy (off: the fields as they are), True (the
            global zoom taken out) or :data:`KEEP_SIZE_INFLATION` (only an enlargement taken out).
        image_interp: interpolation of the deformed image that defines the anatomy.

    Returns:
        The fields and, per sample, the zoom taken out (1.0 where none was), as
        :func:`remove_global_scale`.
    """
    if not keep:
        return phi, [1.0] * phi.shape[0]
    return remove_global_scale(phi, image, image_interp=image_interp, inflation_only=keep == KEEP_SIZE_INFLATION)


def remove_global_scale(phi: torch.Tensor, image: torch.Tensor, threshold: float = FG_THRESHOLD,
                        image_interp: str = "linear", inflation_only: bool = False) -> Tuple[torch.Tensor, List[float]]:
    """``phi`` with its global isotropic scale over the output's anatomy removed.

    Args:
        phi: pull-back displacement fields in pixels, (B, d, *S).
        image: the images they deform, (B, 1, *S), min-max normalised (the model grid).
        threshold: intensity above which a pixel of the deformed image is anatomy.
        image_interp: interpolation of the deformed image that defines the anatomy.
        inflation_only: take the scale out only where the anatomy came out enlarged (zoom > 1);
            a sample whose anatomy was shrunk (or kept its size) is returned unchanged.

    Returns:
        The new fields (same shape and dtype) and, per sample, the anatomy's zoom taken out
        (> 1 where the anatomy had been inflated; 1.0 where ``inflation_only`` left a shrunk
        anatomy as it was, where the output has fewer than
        :data:`MIN_ANATOMY_PX` anatomy pixels, is thinner than :data:`MIN_SPREAD_PX` along some
        direction, or the fit is degenerate, and the field is returned unchanged).

    The fit runs in float64 on the CPU (a (N, d + 1) system; some accelerators have no float64),
    and the result goes back to the fields' device and dtype.
    """
    nd = phi.dim() - 2
    if image.shape[0] != phi.shape[0] or tuple(image.shape[2:]) != tuple(phi.shape[2:]):
        raise ValueError(f"image {tuple(image.shape)} does not match the fields {tuple(phi.shape)}")
    deformed = warp(image.to(phi.dtype), phi, image_interp if nd == 2 else "linear", "zeros")
    shape = phi.shape[2:]
    axes = [torch.arange(n, dtype=torch.float64) - (n - 1) / 2 for n in shape]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), 0)               # (d, *S), CPU
    out = phi.clone()
    zooms: List[float] = []
    for b in range(phi.shape[0]):
        mask = (deformed[b, 0] > threshold).cpu()
        n = int(mask.sum())
        if n < max(MIN_ANATOMY_PX, nd + 2):
            zooms.append(1.0)
            continue
        phi_b = phi[b].detach().to("cpu", torch.float64)
        x = coords[:, mask].T                                                    # (N, d)
        spread = torch.linalg.eigvalsh(torch.cov(x.T).reshape(nd, nd))[0]
        if not float(spread) >= MIN_SPREAD_PX ** 2:
            zooms.append(1.0)
            continue
        y = x + phi_b[:, mask].T
        X = torch.cat([x, torch.ones((n, 1), dtype=torch.float64)], 1)
        coef = torch.linalg.lstsq(X, y).solution                                 # (d + 1, d)
        det = float(torch.linalg.det(coef[:nd].T))
        if not (det > 0.0 and math.isfinite(det)):
            zooms.append(1.0)
            continue
        s = det ** (1.0 / nd)
        if inflation_only and s >= 1.0:     # y spreads the output over more of the input: shrunk, kept
            zooms.append(1.0)
            continue
        p = y.mean(0).view(nd, *([1] * nd))
        y_all = coords + phi_b
        out[b] = (p + (y_all - p) / s - coords).to(phi.device, phi.dtype)
        zooms.append(1.0 / s)
    return out, zooms
