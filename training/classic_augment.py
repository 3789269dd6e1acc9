"""Classic augmentation of training batches (affine, flips, intensity), on the training device and
seedable with a torch.Generator: what Algorithm 1 applies to the images it learns from.

Not to be confused with DRDM augmentation (deformations recovered by a trained model):
:mod:`napari_drdm.export` writes DRDM-augmented datasets, :mod:`napari_drdm.transforms` applies
DRDM deformations on the fly in a data loader.

All random numbers of a batch are drawn in a fixed order and always the same amount whatever the
probabilities decide (the cut and the coarse resolution draw theirs after the spatial transform),
so a generator state fully determines the result.  Spatial transforms are a single
``affine_grid`` / ``grid_sample`` per batch (bilinear, zeros), so an image is interpolated once.
The options off by default (``p_zoom_out``, ``p_zoom_in``, ``p_cut``, ``p_coarse`` at 0) draw nothing, so the
streams of configurations without them are unchanged.  In the order applied:

1. spatial.  2D: rotation U(-max_rotation_deg, max_rotation_deg) and translation
   U(-max_translation, max_translation) of the side per axis, together with probability
   ``p_affine``.  3D: rotation about a random axis (uniform on the sphere) with probability
   ``p_rotate3d``; isotropic crop of ratio U(crop_min, 1) at a random position, resized back,
   with probability ``p_crop3d``.  Both: zoom-out with probability ``p_zoom_out``: the content
   shrinks by a factor U(zoom_out_min, 1) about the centre into an empty (zero) frame, so that a
   dark frame around the anatomy also occurs in images that are not deformed (training/README.md
   "Dark frames").  Zoom-in with probability ``p_zoom_in``: the content grows by U(1, zoom_in_max)
   about the centre, so that the anatomy overflows the grid's sides, as in a crop that the anatomy
   fills (cardiac crops, a chest CT whose body reaches the image's edges); an image drawn for both
   zooms is scaled by their product.
2. flips per axis (``p_flip``).
3. a truncated field of view with probability ``p_cut``: everything beyond a line (plane)
   parallel to one side of the grid, at U(cut_min, 1) of the half-side from the centre, on a
   random axis and side, is zeroed, as a head cut by the scanner's field of view looks.
4. coarse resolution with probability ``p_coarse``: each axis is averaged down by its own factor
   U(1, coarse_max) and interpolated back (linear), as an image acquired with thicker voxels and
   resampled to the model's grid looks (training/README.md "Coarse images and cut fields of view").
5. the view fitted to the anatomy (``anatomy_fit``, pixels; null: off): each image is resampled
   into the smallest square of the grid that holds everything above the foreground threshold with
   that many pixels free around it, at most 2x enlarged (``napari_drdm.core.view``), as the engine
   shows an image to the network when generating with the inference option ``anatomy_fit``.  A
   model that ships with that option then learns on the views it will be shown.  With
   ``p_anatomy_fit`` < 1 only that share of the images (one draw per image, after every other draw)
   is refitted and the rest keep the whole grid; at 1 (default) nothing is drawn.
6. autocontrast per image (``p_autocontrast``: min-max to [0, 1]); intensity (``p_intensity``):
   subtract a threshold U(0, threshold_max), clamp at 0, multiply by a gain N(1, gain_std) and
   add an offset N(0, offset_std).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

__all__ = ["AUGMENT_DEFAULTS", "augment", "affine_2d", "affine_3d", "zoom_out", "zoom_in", "coarsen", "coarse_resample", "cut",
           "field_of_view_cut", "to_anatomy_view", "check_augment", "check_overrides",
           "check_pixels"]

AUGMENT_DEFAULTS: Dict[str, Any] = {
    "enabled": True,
    "p_affine": 0.8, "max_rotation_deg": 180.0, "max_translation": 0.125,   # 2D
    "p_rotate3d": 0.6, "p_crop3d": 0.8, "crop_min": 0.6,                    # 3D
    "p_flip": 0.5, "p_autocontrast": 0.5,
    "p_intensity": 1.0, "threshold_max": 0.2, "gain_std": 0.1, "offset_std": 0.1,
    "p_zoom_out": 0.0, "zoom_out_min": 0.6,
    "p_zoom_in": 0.0, "zoom_in_max": 2.0,
    "p_coarse": 0.0, "coarse_max": 3.0,
    "p_cut": 0.0, "cut_min": 0.3,
    "anatomy_fit": None,     # px around the anatomy in a view fitted to it (null: the whole grid)
    "p_anatomy_fit": 1.0,    # share of the images shown that view when anatomy_fit is set
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_augment(cfg: Dict[str, Any]) -> None:
    """Raise ValueError naming the key when a zoom-out or coarse-resolution setting is out of range."""
    for key in ("p_zoom_out", "p_zoom_in", "p_coarse", "p_cut", "p_anatomy_fit"):
        p = cfg.get(key, 0.0)
        if not _is_number(p) or not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"augment.{key} must be a probability in [0, 1], got {p!r}")
    lo = cfg.get("zoom_out_min", 0.6)
    if not _is_number(lo) or not 0.0 < float(lo) <= 1.0:
        raise ValueError(f"augment.zoom_out_min must be a number in (0, 1], got {lo!r}")
    zin = cfg.get("zoom_in_max", 2.0)
    if not _is_number(zin) or not 1.0 <= float(zin) <= 8.0:
        raise ValueError(f"augment.zoom_in_max must be an enlargement factor in [1, 8], got {zin!r}")
    cut = cfg.get("cut_min", 0.3)
    if not _is_number(cut) or not 0.0 <= float(cut) <= 1.0:
        raise ValueError(f"augment.cut_min must be a share of the half-side in [0, 1], got {cut!r}")
    check_pixels(cfg.get("anatomy_fit"), "augment.anatomy_fit")
    hi = cfg.get("coarse_max", 3.0)
    if not _is_number(hi) or not 1.0 <= float(hi) <= 16.0:
        raise ValueError(f"augment.coarse_max must be a downsampling factor in [1, 16], got {hi!r}")


def check_pixels(value: Any, key: str) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is None (off) or a whole number of pixels >= 0
    (``augment.anatomy_fit``, ``validation.anatomy_fit``, ``validation.background_margin``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{key} must be a whole number of pixels >= 0 or null (off), got {value!r}")


def check_overrides(over: Any, key: str) -> None:
    """Raise ValueError naming ``key`` when ``over`` (overrides of the ``augment`` section, as in
    ``loss.teacher_augment`` or ``validation.cues``; None counts as none) is not a mapping of
    augment keys.  The merged values are checked by :func:`check_augment`."""
    if not isinstance(over or {}, dict):
        raise ValueError(f"{key} must be a mapping of augment keys (e.g. {{p_zoom_out: 1.0}}), got {over!r}")
    unknown = sorted(set(over or {}) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; valid: {sorted(AUGMENT_DEFAULTS)}")


def _scale_content(theta: torch.Tensor, p: float, lo: float, hi: float, g: Optional[torch.Generator]
                   ) -> torch.Tensor:
    """With probability ``p`` per map, show the content of the affine maps ``theta`` (B, d, d+1)
    U(lo, hi) times larger (affine_grid maps output to input coordinates: dividing the linear part
    by s shows the input s times larger).  Draws nothing when ``p`` is 0."""
    if p <= 0.0:
        return theta
    B, nd, dev = theta.shape[0], theta.shape[1], theta.device
    sel = (_u(B, g, dev) < p).to(theta.dtype)
    s = 1.0 + (_u(B, g, dev, lo, hi) - 1.0) * sel
    out = theta.clone()
    out[:, :, :nd] = theta[:, :, :nd] / s[:, None, None]
    return out


def zoom_out(theta: torch.Tensor, cfg: Dict[str, Any], g: Optional[torch.Generator]) -> torch.Tensor:
    """Shrink the content of the affine maps ``theta`` (B, d, d+1) by U(zoom_out_min, 1) with
    probability ``p_zoom_out``.  Draws nothing when ``p_zoom_out`` is 0."""
    return _scale_content(theta, float(cfg.get("p_zoom_out", 0.0)), float(cfg.get("zoom_out_min", 0.6)), 1.0, g)


def zoom_in(theta: torch.Tensor, cfg: Dict[str, Any], g: Optional[torch.Generator]) -> torch.Tensor:
    """Enlarge the content of the affine maps ``theta`` (B, d, d+1) by U(1, zoom_in_max) with
    probability ``p_zoom_in``, so the anatomy overflows the grid (the mirror of :func:`zoom_out`).
    Draws nothing when ``p_zoom_in`` is 0."""
    return _scale_content(theta, float(cfg.get("p_zoom_in", 0.0)), 1.0, float(cfg.get("zoom_in_max", 2.0)), g)


def coarse_resample(x: torch.Tensor, factors) -> torch.Tensor:
    """Images (B, C, S^d) as if acquired with voxels ``factors`` times larger per axis (d numbers
    >= 1): each axis averaged down to round(S / factor) samples (area, i.e. partial-volume
    averaging) and interpolated back to the side (bilinear / trilinear).  Deterministic: the
    transform behind :func:`coarsen`, also used by benchmarks/dark_frame.py ``--coarsen``."""
    nd = x.dim() - 2
    factors = [float(f) for f in factors]
    if len(factors) != nd or min(factors) < 1.0:
        raise ValueError(f"coarse_resample: expected {nd} factors >= 1, got {factors}")
    size = list(x.shape[2:])
    small = [max(1, int(round(n / f))) for n, f in zip(size, factors)]
    if small == size:
        return x.clone()
    low = F.interpolate(x, size=small, mode="area")
    return F.interpolate(low, size=size, mode="bilinear" if nd == 2 else "trilinear", align_corners=False)


def coarsen(x: torch.Tensor, cfg: Dict[str, Any], g: Optional[torch.Generator]) -> torch.Tensor:
    """Coarsen a batch (B, C, S^d) with probability ``p_coarse`` per image: :func:`coarse_resample`
    with a factor U(1, coarse_max) per axis and image.  Draws nothing when ``p_coarse`` is 0."""
    p = float(cfg.get("p_coarse", 0.0))
    if p <= 0.0:
        return x
    B, nd, dev = x.shape[0], x.dim() - 2, x.device
    sel = _u(B, g, dev) < p
    factors = _u(B, g, dev, 1.0, float(cfg["coarse_max"]), nd)
    out = x.clone()
    for b in torch.nonzero(sel).flatten().tolist():
        out[b:b + 1] = coarse_resample(x[b:b + 1], factors[b].tolist())
    return out


def field_of_view_cut(x: torch.Tensor, axis: int, side: int, position: float) -> torch.Tensor:
    """Images (B, C, S^d) with everything beyond ``position`` (a share of the half-side, measured
    from the centre; 1 keeps everything) on ``side`` (+1 / -1) of ``axis`` (0 = the first spatial
    axis) set to zero: a field of view that ends there.  Deterministic: the transform behind
    :func:`cut`."""
    nd = x.dim() - 2
    if not 0 <= axis < nd or side not in (1, -1):
        raise ValueError(f"field_of_view_cut: axis must be in 0..{nd - 1} and side +1 or -1, got {axis}, {side}")
    n = x.shape[2 + axis]
    centres = (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) / (n / 2) - 1.0   # in (-1, 1)
    keep = (centres * side <= float(position)).to(x.dtype)
    shape = [1] * x.dim()
    shape[2 + axis] = n
    return x * keep.view(shape)


def cut(x: torch.Tensor, cfg: Dict[str, Any], g: Optional[torch.Generator]) -> torch.Tensor:
    """Truncate the field of view of a batch (B, C, S^d) with probability ``p_cut`` per image:
    :func:`field_of_view_cut` on a random axis and side at U(cut_min, 1).  Draws nothing when
    ``p_cut`` is 0."""
    p = float(cfg.get("p_cut", 0.0))
    if p <= 0.0:
        return x
    B, nd, dev = x.shape[0], x.dim() - 2, x.device
    sel = _u(B, g, dev) < p
    axis = (_u(B, g, dev) * nd).long().clamp_max(nd - 1)
    side = torch.where(_u(B, g, dev) < 0.5, 1, -1)
    pos = _u(B, g, dev, float(cfg["cut_min"]), 1.0)
    out = x.clone()
    for b in torch.nonzero(sel).flatten().tolist():
        out[b:b + 1] = field_of_view_cut(x[b:b + 1], int(axis[b]), int(side[b]), float(pos[b]))
    return out


def to_anatomy_view(x: torch.Tensor, margin: int) -> torch.Tensor:
    """Each image of ``x`` (B, 1, S^d, in [0, 1]) resampled into its view fitted to the anatomy
    (``napari_drdm.core.view.anatomy_views`` with ``margin`` free pixels), as generation with the
    inference option ``anatomy_fit`` shows it to the network."""
    from .data import ensure_core
    ensure_core()
    from napari_drdm.core.view import anatomy_views, to_view
    return to_view(x, anatomy_views(x.clamp(0.0, 1.0), margin))


def _anatomy_view_some(x: torch.Tensor, margin: int, p: float, g: Optional[torch.Generator]) -> torch.Tensor:
    """:func:`to_anatomy_view` on a share ``p`` of the images (one draw each; none drawn at p = 1)."""
    if p >= 1.0:
        return to_anatomy_view(x, margin)
    sel = _u(x.shape[0], g, x.device) < p
    if not bool(sel.any()):
        return x
    out = x.clone()
    out[sel] = to_anatomy_view(x[sel], margin)
    return out


def _u(n, g, device, lo=0.0, hi=1.0, *shape):
    return lo + (hi - lo) * torch.rand((n,) + shape, generator=g, device=device)


def affine_2d(B: int, cfg: Dict[str, Any], g: Optional[torch.Generator], device) -> torch.Tensor:
    """(B, 2, 3) affine_grid matrices: rotation + translation with probability p_affine."""
    sel = (_u(B, g, device) < cfg["p_affine"]).to(torch.float32)
    ang = _u(B, g, device, -1.0, 1.0) * math.radians(cfg["max_rotation_deg"]) * sel
    # translation as a fraction of the side -> normalised units (side = 2)
    tr = _u(B, g, device, -1.0, 1.0, 2) * (2.0 * cfg["max_translation"]) * sel[:, None]
    c, s = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([c, -s, tr[:, 0]], 1), torch.stack([s, c, tr[:, 1]], 1)], 1)
    return theta


def affine_3d(B: int, cfg: Dict[str, Any], g: Optional[torch.Generator], device) -> torch.Tensor:
    """(B, 3, 4) matrices: rotation about a random axis (p_rotate3d) after an isotropic crop (p_crop3d)."""
    sel_r = (_u(B, g, device) < cfg["p_rotate3d"]).to(torch.float32)
    axis = torch.randn((B, 3), generator=g, device=device)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-8)
    ang = _u(B, g, device, -1.0, 1.0) * math.radians(cfg["max_rotation_deg"]) * sel_r
    sel_c = (_u(B, g, device) < cfg["p_crop3d"]).to(torch.float32)
    ratio = 1.0 - (1.0 - _u(B, g, device, cfg["crop_min"], 1.0)) * sel_c
    centre = _u(B, g, device, -1.0, 1.0, 3) * (1.0 - ratio)[:, None]
    K = torch.zeros((B, 3, 3), device=device)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    K = K - K.transpose(1, 2)
    eye = torch.eye(3, device=device).expand(B, 3, 3)
    R = eye + torch.sin(ang)[:, None, None] * K + (1 - torch.cos(ang))[:, None, None] * (K @ K)
    return torch.cat([R * ratio[:, None, None], centre[:, :, None]], dim=2)


def augment(x: torch.Tensor, cfg: Optional[Dict[str, Any]] = None, generator: Optional[torch.Generator] = None
            ) -> torch.Tensor:
    """Augment a batch (B, C, S^d) of images in [0, 1]; returns a new float32 tensor, same shape.

    Output range: [offset, gain * 1 + offset] per image (the intensity part is not re-clamped).
    """
    cfg = dict(AUGMENT_DEFAULTS, **(cfg or {}))
    if not cfg.get("enabled", True):
        return x
    x = x.to(torch.float32)
    B, nd, dev, g = x.shape[0], x.dim() - 2, x.device, generator
    theta = affine_2d(B, cfg, g, dev) if nd == 2 else affine_3d(B, cfg, g, dev)
    theta = zoom_out(theta, cfg, g)
    theta = zoom_in(theta, cfg, g)
    flips = _u(B, g, dev, 0.0, 1.0, nd) < cfg["p_flip"]
    sel_ac = _u(B, g, dev) < cfg["p_autocontrast"]
    sel_in = (_u(B, g, dev) < cfg["p_intensity"]).to(torch.float32)
    thr = _u(B, g, dev, 0.0, cfg["threshold_max"]) * sel_in
    gain = 1.0 + torch.randn(B, generator=g, device=dev) * cfg["gain_std"] * sel_in
    offset = torch.randn(B, generator=g, device=dev) * cfg["offset_std"] * sel_in

    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    view = (B,) + (1,) * (nd + 1)
    for a in range(nd):
        x = torch.where(flips[:, a].view(view), x.flip(2 + a), x)
    x = cut(x, cfg, g)
    x = coarsen(x, cfg, g)
    if cfg.get("anatomy_fit") is not None:
        x = _anatomy_view_some(x, int(cfg["anatomy_fit"]), float(cfg.get("p_anatomy_fit", 1.0)), g)
    flat = x.reshape(B, -1)
    lo, hi = flat.min(1).values.view(view), flat.max(1).values.view(view)
    stretched = (x - lo) / (hi - lo).clamp_min(1e-6)
    x = torch.where(sel_ac.view(view) & (hi - lo > 1e-6), stretched, x)
    x = torch.relu(x - thr.view(view))
    return x * gain.view(view) + offset.view(view)
