"""The recovered field in empty background, extended smoothly from the anatomy.

The reverse loop cannot see a deformation where the image is empty: a uniformly dark region looks
the same however it is moved, so the network's steps there are guesses, and what the forward field
left in such a region (its folds included) stays in the recovered field.  Those folds do not show
in the deformed image, but they are in the field a user applies to label maps or trains a
registration network with.  :func:`extend_into_background` replaces the field in *empty
background* (farther than ``margin`` pixels from anything brighter than ``threshold``, both in the
input image and in the deformed one) by the harmonic extension of the field around it: each
component is the solution of Laplace's equation there, with the field outside as boundary values.
A harmonic function takes its extremes on the boundary, so the extension adds no displacement
larger than the field around it, and it is as smooth as a field can be that meets the anatomy's.
The deformed image changes only where a moved background pixel now samples the anatomy's faint
edge (on the held-out slices by at most a few hundredths of the intensity range,
``benchmarks/background_extension.py``).

A model setting and an inference option: ``DRDMConfig.background_margin`` (None: off), applied by
``DRDM.iter_generate`` / ``generate_model_grid`` after the reverse loop and before the fold guard's
final check (the bundled ``cmr2d`` stores 8 px, the 3D models 2 px; docs/weights.md).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .metrics import FG_THRESHOLD
from .spatial import warp

__all__ = ["empty_background", "harmonic_fill", "extend_into_background"]


def _max_pool(x: torch.Tensor, radius: int) -> torch.Tensor:
    pool = F.max_pool2d if x.dim() == 4 else F.max_pool3d
    return pool(x, 2 * radius + 1, 1, radius)


def empty_background(image: torch.Tensor, deformed: torch.Tensor, margin: int,
                     threshold: float = FG_THRESHOLD) -> torch.Tensor:
    """Boolean mask (B, 1, S...) of the pixels farther than ``margin`` pixels (Chebyshev distance)
    from anything above ``threshold`` in ``image`` and in ``deformed`` (both (B, 1, S...), the
    model grid, min-max normalised)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0 pixels, got {margin}")
    seen = ((image > threshold) | (deformed > threshold)).float()
    near = _max_pool(seen, margin) > 0 if margin else seen > 0
    return ~near


def _smooth(u: torch.Tensor) -> torch.Tensor:
    """Mean of the 2d neighbours of every pixel (replicated edges)."""
    nd = u.dim() - 2
    p = F.pad(u, (1, 1) * nd, mode="replicate")
    total = torch.zeros_like(u)
    for a in range(nd):
        lo = [slice(None), slice(None)] + [slice(1, -1)] * nd
        hi = list(lo)
        lo[2 + a], hi[2 + a] = slice(0, -2), slice(2, None)
        total = total + p[tuple(lo)] + p[tuple(hi)]
    return total / (2 * nd)


def harmonic_fill(field: torch.Tensor, free: torch.Tensor, iters: int = 60, min_side: int = 8) -> torch.Tensor:
    """``field`` (B, C, S...) with its values where ``free`` (B, 1, S...) replaced by the harmonic
    extension of the rest (Jacobi iterations, coarse to fine: the solution on a grid of half the
    side starts the iterations on this one).  Pixels not free are returned unchanged."""
    if not bool(free.any()):
        return field
    free_c = free.expand_as(field)
    side = min(field.shape[2:])
    if side // 2 >= min_side and all(n % 2 == 0 for n in field.shape[2:]):
        pool = F.avg_pool2d if field.dim() == 4 else F.avg_pool3d
        fixed = (~free).float()
        weight = pool(fixed, 2)
        coarse = pool(field * fixed, 2) / weight.clamp_min(1e-6)      # mean of the fixed values
        coarse_free = weight == 0
        coarse = harmonic_fill(coarse, coarse_free, iters, min_side)
        mode = "bilinear" if field.dim() == 4 else "trilinear"
        start = F.interpolate(coarse, size=list(field.shape[2:]), mode=mode, align_corners=False)
    else:
        fixed_mean = (field * (~free_c)).flatten(2).sum(-1) / (~free_c).flatten(2).sum(-1).clamp_min(1)
        start = fixed_mean.view(field.shape[:2] + (1,) * (field.dim() - 2)).expand_as(field)
    u = torch.where(free_c, start, field)
    for _ in range(int(iters)):
        u = torch.where(free_c, _smooth(u), field)
    return u


def extend_into_background(phi: torch.Tensor, image: torch.Tensor, margin: int = 8,
                           threshold: float = FG_THRESHOLD, image_interp: str = "linear",
                           iters: int = 60) -> Tuple[torch.Tensor, torch.Tensor]:
    """The recovered field ``phi`` (B, d, S..., pixels) with its empty background (see the module
    docstring; ``image`` (B, 1, S...) the model-grid input) replaced by the harmonic extension of
    the rest.  Returns (the new field, the mask of the pixels replaced)."""
    deformed = warp(image, phi, image_interp, "zeros")
    free = empty_background(image, deformed, margin, threshold)
    return harmonic_fill(phi, free, iters), free
