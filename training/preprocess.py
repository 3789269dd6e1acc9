"""Preprocessing of one image or volume for the model grid, and its 2D training slices.

Intensities are scaled robustly to [0, 1], the background removed (threshold, largest connected
component, holes filled slice-wise), the foreground box cropped and resampled isotropically into
a cube of side S (anti-aliased, centred, zero padded).  2D training images are the slices of that
cube with enough foreground, each min-max scaled to uint8.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["preprocess_volume", "minmax_u8", "foreground_slices"]


def _foreground_mask(v: np.ndarray, threshold: float) -> np.ndarray:
    """v > threshold, largest connected component, holes filled in every slice plane."""
    from scipy import ndimage as ndi
    mask = v > threshold
    lab, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        mask = lab == int(np.argmax(sizes))
    nd = v.ndim
    if nd == 2:
        return ndi.binary_fill_holes(mask)
    filled = mask.copy()
    for ax in range(nd):  # planar structuring element = hole filling slice by slice along `ax`
        st = np.zeros((3,) * nd, dtype=bool)
        sl = [slice(None)] * nd
        sl[ax] = 1
        st[tuple(sl)] = ndi.generate_binary_structure(nd - 1, 1)
        filled |= ndi.binary_fill_holes(mask, structure=st)
    return filled


def preprocess_volume(vol: np.ndarray, spacing: Sequence[float], size: int, bg_threshold: float = 0.08,
                      margin_px: int = 2):
    """Image/volume (2D or 3D array) -> (image on an isotropic S^d grid in [0, 1], foreground mask).

    ``margin_px``: margin around the foreground box, in pixels of the finest axis.

    Intensities: robust scaling (0.5 / 99.5 percentiles) clipped to [0, 1]; everything outside
    the foreground mask set to 0.  Geometry: crop to the mask's bounding box (+ margin), then
    an isotropic grid of spacing ``max_k(extent_k) / S`` centred on the box, linear interpolation
    after a Gaussian anti-aliasing blur of sigma ``(zoom - 1) / 2`` per axis, zero padding.
    """
    from scipy import ndimage as ndi
    v = np.nan_to_num(np.asarray(vol, dtype=np.float32))
    nd = v.ndim
    sp = np.asarray([float(s) for s in spacing][:nd], dtype=np.float64)
    if sp.shape[0] != nd or np.any(sp <= 0):
        raise ValueError(f"spacing {tuple(spacing)} does not fit an image of shape {v.shape}")
    lo, hi = np.percentile(v, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    v = np.clip((v - lo) / max(hi - lo, 1e-8), 0.0, 1.0).astype(np.float32)
    mask = _foreground_mask(v, bg_threshold)
    if not mask.any():
        return None, None
    v = v * mask
    idx = np.nonzero(mask)
    margin = [int(math.ceil(margin_px * sp.min() / s)) for s in sp]   # the same physical margin on every axis
    box = tuple(slice(max(int(i.min()) - m, 0), min(int(i.max()) + m + 1, n))
                for i, n, m in zip(idx, v.shape, margin))
    v, m = v[box], mask[box].astype(np.float32)
    extent = np.asarray(v.shape) * sp
    iso = float(extent.max()) / size
    zoom = iso / sp                              # input pixels per output pixel, per axis
    sigma = np.maximum(0.0, (zoom - 1.0) / 2.0)
    if np.any(sigma > 0):
        v = ndi.gaussian_filter(v, sigma=sigma, mode="constant")
    offset = (np.asarray(v.shape) - 1) / 2.0 - (size - 1) / 2.0 * zoom
    kw = dict(matrix=zoom, offset=offset, output_shape=(size,) * nd, order=1, mode="constant", cval=0.0)
    out = ndi.affine_transform(v, **kw)
    fg = ndi.affine_transform(m, **kw) > 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32), fg


def minmax_u8(a: np.ndarray) -> np.ndarray:
    """``a`` min-max scaled to uint8 (0..255)."""
    a = a.astype(np.float64)
    a = (a - a.min()) / (a.max() - a.min() + 1e-7)
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def foreground_slices(cube: np.ndarray, fg: np.ndarray, axes: Sequence[int], min_foreground: float):
    """(images uint8 (n, S, S), axis, index) of the foreground slices of a cube (or the 2D image)."""
    if cube.ndim == 2:
        ok = fg.mean() >= min_foreground and cube.max() > 0
        return ([minmax_u8(cube)], [-1], [0]) if ok else ([], [], [])
    ims, ax_l, ix_l = [], [], []
    for ax in axes:
        for i in range(cube.shape[ax]):
            f = np.take(fg, i, axis=ax)
            if f.mean() < min_foreground:
                continue
            s = np.take(cube, i, axis=ax)
            if s.max() <= 0:
                continue
            ims.append(minmax_u8(s))
            ax_l.append(ax)
            ix_l.append(i)
    return ims, ax_l, ix_l
