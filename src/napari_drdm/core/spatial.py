"""Spatial operations on dense displacement fields (DDFs), 2D and 3D, batched, any device.

Conventions (see README, "Units and conventions"):

* An image batch has shape ``(B, C, *spatial)``; a displacement field ``(B, d, *spatial)``.
* Channel ``c`` of a field is the displacement along array axis ``2 + c`` ("ij" order:
  in 2D channel 0 is rows).
* Fields in this module are in **pixels (voxels) of the grid they live on**.  The reference
  implementation stores fields as a fraction of the image side S; :func:`frac_to_px` and
  :func:`px_to_frac` convert exactly (pixels = fraction * S).
* Warping is a pull-back: ``warp(I, u)(x) = I(x + u(x))``, evaluated with
  ``grid_sample(align_corners=True)`` and the reference's normalisation
  ``g = (u + x) / ((n - 1) / 2) - 1`` (same float32 operation order).
* Composition (paper eq. 5): ``compose(first=a, then=b)(x) = a(x) + b(x + a(x))``, so
  ``warp(I, compose(a, b)) == warp(warp(I, b), a)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "MODES",
    "PADDINGS",
    "frac_to_px",
    "px_to_frac",
    "index_grid",
    "sampling_grid",
    "warp",
    "warp_labels",
    "compose",
    "resize_image",
    "resize_field",
    "resample_affine",
    "px_to_mm",
    "invert_field",
]

#: interpolation names accepted by :func:`warp` -> grid_sample mode
MODES = {"linear": "bilinear", "bilinear": "bilinear", "trilinear": "bilinear",
         "nearest": "nearest", "cubic": "bicubic", "bicubic": "bicubic"}
PADDINGS = ("zeros", "border", "reflection")


def frac_to_px(u: torch.Tensor, side: float) -> torch.Tensor:
    """Reference units (fraction of the image side) -> pixels: ``u * side``."""
    return u * side


def px_to_frac(u: torch.Tensor, side: float) -> torch.Tensor:
    """Pixels -> reference units (fraction of the image side): ``u / side``."""
    return u / side


def _check_field(field: torch.Tensor, name: str = "field") -> int:
    if field.dim() not in (4, 5):
        raise ValueError(f"{name} must have shape (B, d, *spatial) with d = 2 or 3, got {tuple(field.shape)}")
    nd = field.dim() - 2
    if field.shape[1] != nd:
        raise ValueError(f"{name} has {field.shape[1]} channels but {nd} spatial axes; "
                         f"expected shape (B, {nd}, *spatial)")
    return nd


_GRID_CACHE: dict = {}


def index_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Integer index coordinates, shape ``(d, *shape)``, 'ij' order. Cached per shape/device/dtype."""
    key = (tuple(int(s) for s in shape), torch.device(device) if device is not None else torch.device("cpu"), dtype)
    g = _GRID_CACHE.get(key)
    if g is None:
        axes = [torch.arange(s, device=key[1], dtype=dtype) for s in key[0]]
        g = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
        if len(_GRID_CACHE) > 64:
            _GRID_CACHE.clear()
        _GRID_CACHE[key] = g
    return g


def sampling_grid(disp: torch.Tensor) -> torch.Tensor:
    """grid_sample grid (B, *spatial, d) in (x, y[, z]) order for a pixel displacement field."""
    nd = _check_field(disp, "displacement")
    spatial = disp.shape[2:]
    idx = index_grid(spatial, disp.device, disp.dtype)
    coords = []
    for c in range(nd):
        half = (spatial[c] - 1) / 2
        # same float32 order as the reference: (u*S + index) / ((S-1)/2) - 1
        coords.append((disp[:, c] + idx[c]) / half - 1)
    return torch.stack(coords[::-1], dim=-1)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "linear", padding: str = "zeros") -> torch.Tensor:
    """Pull-back warp ``out(x) = image(x + disp(x))``.

    image: ``(B or 1, C, *spatial)``; disp: ``(B or 1, d, *spatial)`` in pixels of that grid.
    mode: ``linear`` (bi/trilinear), ``nearest`` or ``cubic`` (2D only).
    padding: ``zeros``, ``border`` or ``reflection`` (grid_sample semantics, align_corners=True).
    """
    nd = _check_field(disp, "displacement")
    if image.dim() != nd + 2:
        raise ValueError(f"image has shape {tuple(image.shape)} but the field is {nd}D; "
                         f"expected (B, C, *spatial) with {nd} spatial axes")
    if tuple(image.shape[2:]) != tuple(disp.shape[2:]):
        raise ValueError(f"image spatial shape {tuple(image.shape[2:])} differs from the field's "
                         f"{tuple(disp.shape[2:])}")
    if mode not in MODES:
        raise ValueError(f"unknown interpolation {mode!r}; expected one of {sorted(MODES)}")
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
    gmode = MODES[mode]
    if gmode == "bicubic" and nd != 2:
        raise ValueError("cubic interpolation is only available for 2D images; use 'linear' in 3D")
    b = max(image.shape[0], disp.shape[0])
    if image.shape[0] != b:
        image = image.expand(b, *image.shape[1:])
    grid = sampling_grid(disp)
    if grid.shape[0] != b:
        grid = grid.expand(b, *grid.shape[1:])
    if image.dtype != grid.dtype:
        grid = grid.to(image.dtype)
    return F.grid_sample(image, grid, mode=gmode, padding_mode=padding, align_corners=True)


def warp_labels(labels: torch.Tensor, disp: torch.Tensor, method: str = "nearest",
                background: int = 0) -> torch.Tensor:
    """Warp an integer label map so that no new label values appear.

    labels: integer tensor ``(B or 1, 1, *spatial)``.  Samples outside the field of view get
    ``background``.  method: ``nearest``, or ``linear_argmax`` (each label's indicator is warped
    linearly and the most likely label wins; smoother boundaries, same label set).
    """
    if labels.is_floating_point():
        raise TypeError("labels must be an integer tensor (a label map), got a floating-point tensor")
    if labels.dim() != disp.dim() or labels.shape[1] != 1:
        raise ValueError(f"labels must have shape (B, 1, *spatial), got {tuple(labels.shape)}")
    if method == "nearest":
        big = labels.abs().max().item() if labels.numel() else 0
        dtype = torch.float32 if big < 2 ** 24 else torch.float64
        out = warp((labels - background).to(dtype), disp.to(dtype), "nearest", "zeros")
        return torch.round(out).to(labels.dtype) + background
    if method == "linear_argmax":
        values = torch.unique(labels)
        b = max(labels.shape[0], disp.shape[0])
        best_w = torch.zeros((b, 1) + tuple(labels.shape[2:]), device=disp.device, dtype=disp.dtype)
        best = torch.full_like(best_w, background, dtype=labels.dtype)
        for v in values.tolist():
            w = warp((labels == v).to(disp.dtype), disp, "linear", "zeros")
            take = w > best_w
            best = torch.where(take, torch.as_tensor(v, dtype=labels.dtype, device=best.device), best)
            best_w = torch.where(take, w, best_w)
        return best
    raise ValueError(f"unknown label interpolation {method!r}; expected 'nearest' or 'linear_argmax'")


def compose(first: torch.Tensor, then: torch.Tensor, padding: str = "border") -> torch.Tensor:
    """``compose(first=a, then=b)(x) = a(x) + b(x + a(x))`` (paper eq. 5), pixels, bilinear.

    Warping by the result equals warping by ``then`` and then by ``first``.
    """
    return first + warp(then, first, "linear", padding)


def _interp_mode(nd: int, mode: str) -> str:
    if mode == "nearest":
        return "nearest"
    return "bilinear" if nd == 2 else "trilinear"


def resize_image(image: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resize an image batch to ``size`` (pixel-centre geometry, align_corners=False)."""
    nd = image.dim() - 2
    size = tuple(int(s) for s in size)
    if tuple(image.shape[2:]) == size:
        return image
    if mode == "nearest":
        return F.interpolate(image, size=size, mode="nearest-exact")
    return F.interpolate(image, size=size, mode=_interp_mode(nd, mode), align_corners=False)


def resize_field(disp: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resample a pixel displacement field to another grid covering the same extent.

    Pixel-centre geometry (align_corners=False): values are interpolated linearly and channel
    ``c`` is multiplied by ``new_size[c] / old_size[c]`` so that it stays in pixels of the new grid.
    """
    nd = _check_field(disp, "displacement")
    size = tuple(int(s) for s in size)
    old = disp.shape[2:]
    if tuple(old) == size:
        return disp
    out = F.interpolate(disp, size=size, mode=_interp_mode(nd, "linear"), align_corners=False)
    scale = torch.tensor([size[c] / old[c] for c in range(nd)], dtype=disp.dtype, device=disp.device)
    return out * scale.view(1, nd, *([1] * nd))


def resample_affine(image: torch.Tensor, out_shape: Sequence[int], scale: Sequence[float],
                    offset: Sequence[float], mode: str = "linear", padding: str = "zeros") -> torch.Tensor:
    """Sample ``image`` on a new grid where output index ``o`` reads input index ``scale*o + offset``
    (per axis, no rotation).  Used to move between an image's own grid and the model's isotropic grid.
    """
    nd = image.dim() - 2
    out_shape = tuple(int(s) for s in out_shape)
    in_shape = image.shape[2:]
    idx = index_grid(out_shape, image.device, torch.float32)
    coords = []
    for c in range(nd):
        pos = idx[c] * float(scale[c]) + float(offset[c])
        half = (in_shape[c] - 1) / 2 if in_shape[c] > 1 else 1.0
        coords.append(pos / half - 1)
    grid = torch.stack(coords[::-1], dim=-1).unsqueeze(0).expand(image.shape[0], *out_shape, nd)
    gmode = MODES[mode]
    return F.grid_sample(image, grid.to(image.dtype), mode=gmode, padding_mode=padding, align_corners=True)


def px_to_mm(disp: torch.Tensor, spacing: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Multiply a pixel field by the voxel spacing per channel (pixels -> millimetres)."""
    nd = _check_field(disp, "displacement")
    if spacing is None:
        return disp
    s = torch.tensor([float(v) for v in spacing], dtype=disp.dtype, device=disp.device)
    return disp * s.view(1, nd, *([1] * nd))


def invert_field(u: torch.Tensor, spacing: Sequence[float], iterations: int = 50, tol: float = 1e-4):
    """Fixed-point inverse of a pixel field u (1, d, *shape): v_{n+1}(x) = -u(x + v_n(x)).

    Args:
        u: displacement in pixels of its grid, shape (1, d, *spatial).
        spacing: pixel size per array axis (mm), for the residual in mm.
        iterations: most fixed-point iterations.
        tol: stop when no displacement changes by more than this (pixels).

    Returns (v, residual): residual = max and mean over pixels of |u(x + v(x)) + v(x)| in mm
    (and max in pixels), so that warping the deformed image by v gives the input back.
    """
    v = -u
    for _ in range(int(iterations)):
        nv = -warp(u, v, "linear", "border")
        delta = float((nv - v).abs().max())
        v = nv
        if delta < tol:
            break
    r = v + warp(u, v, "linear", "border")
    nd = u.shape[1]
    sp = torch.tensor([float(s) for s in spacing[:nd]], dtype=r.dtype, device=r.device).view(1, nd, *([1] * nd))
    mag_mm = torch.sqrt(((r * sp) ** 2).sum(1))
    mag_px = torch.sqrt((r ** 2).sum(1))
    return v, {"inverse_residual_max_mm": float(mag_mm.max()), "inverse_residual_mean_mm": float(mag_mm.mean()),
               "inverse_residual_max_px": float(mag_px.max())}
