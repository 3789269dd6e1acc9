"""Deformation quality metrics (paper Table 1), computed in float64 numpy.

* magnitude: max / mean over pixels of ||phi(x)||_2 in % of the image side;
* Jacobian determinant det(I + grad(phi in pixels)) with central differences
  (``numpy.gradient``: unit spacing, one-sided at the border);
* folding: % of pixels with det <= 0 over the whole image (the paper's Table 1 header says
  per mille, but its values are percent: we report percent).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["jacobian_determinant", "folding_pct", "displacement_pct", "field_metrics", "strict_folding_pct"]


def _as_field(phi) -> np.ndarray:
    a = phi.detach().cpu().numpy() if hasattr(phi, "detach") else np.asarray(phi)
    a = a.astype(np.float64)
    if a.ndim >= 2 and a.shape[0] == a.ndim - 1:
        return a
    raise ValueError(f"field must have shape (d, *spatial) with d = number of spatial axes, got {a.shape}")


def jacobian_determinant(phi_px) -> np.ndarray:
    """det(I + J) for a pixel displacement field of shape (d, *spatial). Returns (*spatial,) float64."""
    u = _as_field(phi_px)
    nd = u.shape[0]
    J = np.empty((nd, nd) + u.shape[1:], dtype=np.float64)
    for c in range(nd):
        grads = np.gradient(u[c], axis=tuple(range(nd)))
        if nd == 1:
            grads = [grads]
        for k in range(nd):
            J[c, k] = grads[k]
    for c in range(nd):
        J[c, c] += 1.0
    if nd == 2:
        return J[0, 0] * J[1, 1] - J[0, 1] * J[1, 0]
    return (J[0, 0] * (J[1, 1] * J[2, 2] - J[1, 2] * J[2, 1])
            - J[0, 1] * (J[1, 0] * J[2, 2] - J[1, 2] * J[2, 0])
            + J[0, 2] * (J[1, 0] * J[2, 1] - J[1, 1] * J[2, 0]))


def folding_pct(phi_px=None, det: Optional[np.ndarray] = None) -> float:
    """% of pixels whose Jacobian determinant is <= 0."""
    if det is None:
        det = jacobian_determinant(phi_px)
    return 100.0 * float(np.mean(det <= 0))


def strict_folding_pct(phi_px) -> float:
    """Stricter estimator: % of pixels where any one-sided finite-difference determinant is <= 0
    (forward and backward differences on every axis, 2^d combinations)."""
    u = _as_field(phi_px)
    nd = u.shape[0]
    bad = np.zeros(u.shape[1:], dtype=bool)
    for combo in range(2 ** nd):
        J = np.zeros((nd, nd) + u.shape[1:])
        for k in range(nd):
            forward = bool((combo >> k) & 1)
            d = np.diff(u, axis=k + 1)
            pad = [(0, 0)] * (nd + 1)
            pad[k + 1] = (0, 1) if forward else (1, 0)
            d = np.pad(d, pad, mode="edge")
            for c in range(nd):
                J[c, k] = d[c]
        for c in range(nd):
            J[c, c] += 1
        if nd == 2:
            det = J[0, 0] * J[1, 1] - J[0, 1] * J[1, 0]
        else:
            det = np.linalg.det(np.moveaxis(J, (0, 1), (-2, -1)))
        bad |= det <= 0
    return 100.0 * float(bad.mean())


def displacement_pct(phi_px, side: Optional[float] = None, spacing: Optional[Sequence[float]] = None):
    """(max %, mean %) of ||phi|| relative to the image side.

    With ``spacing`` the norm is taken in millimetres and divided by the largest physical side;
    otherwise in pixels divided by ``side`` (default: the largest array side).
    """
    u = _as_field(phi_px)
    nd = u.shape[0]
    if spacing is not None:
        sp = np.asarray(spacing, dtype=np.float64).reshape((nd,) + (1,) * nd)
        u = u * sp
        side = max(n * s for n, s in zip(u.shape[1:], np.ravel(spacing)))
    elif side is None:
        side = max(u.shape[1:])
    mag = np.sqrt(np.sum(u * u, axis=0)) / float(side)
    return 100.0 * float(mag.max()), 100.0 * float(mag.mean())


def field_metrics(phi_px, side: Optional[float] = None, spacing: Optional[Sequence[float]] = None,
                  det: Optional[np.ndarray] = None) -> Dict[str, float]:
    """max/mean displacement (% of side) and folding (% of pixels, det <= 0)."""
    mx, mn = displacement_pct(phi_px, side=side, spacing=spacing)
    if det is None:
        det = jacobian_determinant(phi_px)
    return {"max_disp_pct": mx, "mean_disp_pct": mn, "folding_pct": folding_pct(det=det),
            "min_jacobian": float(det.min())}
