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

__all__ = ["jacobian_determinant", "folding_pct", "displacement_pct", "field_metrics", "strict_folding_pct",
           "affine_fit", "field_affine", "affine_text", "foreground_out_of_view_pct", "anatomy_metrics",
           "plausibility_metrics"]


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


# ------------------------------------------------------------------------------ plausibility
def affine_fit(phi_px, side: Optional[float] = None) -> Dict[str, float]:
    """How much of a displacement field a single global affine map explains.

    A generated deformation that is mostly a zoom, a shear or a rotation of the whole image is
    not the local, anatomical variation DRDM is for.  The field u(x) is fitted by least squares
    with ``A x + b`` (x = pixel coordinates, centred); the map ``x -> x + A x + b`` has linear
    part ``M = I + A``, split by polar decomposition into a rotation R and a symmetric stretch.

    Args:
        phi_px: displacement field (d, *spatial) in pixels.
        side: image side for the percentages (default: the largest array side).

    Returns:
        ``affine_share_pct``: 100 * (1 - |u - fit|^2 / |u|^2), the share of the field's energy
        explained (translation counts as affine); ``affine_zoom``: det(M)^(-1/d), the apparent
        linear size of the anatomy after warping (1 = unchanged, 0.9 = shrunk by 10 %);
        ``affine_rotation_deg``: the rotation angle of R; ``affine_residual_max_pct`` /
        ``affine_residual_mean_pct``: |u - fit| in % of the side (the non-affine part).
    """
    u = _as_field(phi_px)
    nd = u.shape[0]
    shape = u.shape[1:]
    side = float(side or max(shape))
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) - (n - 1) / 2 for n in shape],
                                  indexing="ij"), 0).reshape(nd, -1)
    X = np.concatenate([coords, np.ones((1, coords.shape[1]))], 0).T           # (N, d + 1)
    U = u.reshape(nd, -1).T                                                      # (N, d)
    coef, *_ = np.linalg.lstsq(X, U, rcond=None)                                 # (d + 1, d)
    fit = X @ coef
    res = U - fit
    energy = float(np.sum(U * U))
    share = 100.0 * (1.0 - float(np.sum(res * res)) / energy) if energy > 0 else 0.0
    M = np.eye(nd) + coef[:nd].T                                                 # M[c, k] = d(x + u)_c / dx_k
    w, _, vt = np.linalg.svd(M)
    R = w @ vt
    if np.linalg.det(R) < 0:                                                     # reflection: not a rotation
        w[:, -1] *= -1
        R = w @ vt
    if nd == 2:
        angle = np.degrees(np.arctan2(R[1, 0], R[0, 0]))
    else:
        angle = np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0)))
    det = float(np.linalg.det(M))
    rmag = np.sqrt(np.sum(res * res, axis=1)) / side
    zoom = float(np.sign(det) * abs(det) ** (-1.0 / nd)) if det != 0 else float("inf")
    return {"affine_share_pct": share, "affine_zoom": zoom,
            "affine_rotation_deg": float(abs(angle)), "affine_residual_max_pct": 100.0 * float(rmag.max()),
            "affine_residual_mean_pct": 100.0 * float(rmag.mean())}


def field_affine(ddf: np.ndarray, max_points: int = 65536) -> Dict[str, float]:
    """The global affine part of a field (:func:`affine_fit`: zoom,
    rotation, share of the field explained), fitted on at most ``max_points`` pixels: every s-th
    pixel along each axis, with the displacements divided by s, so that the figures are those of
    the whole field up to the sampling (a few milliseconds on the UI thread, whatever the size).

    Args:
        ddf: pull-back displacement field in pixels, (d, *shape).
        max_points: the most pixels the least-squares fit uses.
    """
    shape = ddf.shape[1:]
    s = 1
    while int(np.prod([-(-n // s) for n in shape])) > max_points:
        s += 1
    sub = ddf[(slice(None),) + (slice(None, None, s),) * len(shape)]
    fit = affine_fit(np.asarray(sub, np.float64) / s)
    return {k: fit[k] for k in ("affine_zoom", "affine_rotation_deg", "affine_share_pct")}


def affine_text(a: Dict[str, float]) -> str:
    """One sentence on the field's global affine part, and a warning when it is mostly one zoom."""
    txt = (f"Global affine part: zoom {a['affine_zoom']:.3f}, rotation {a['affine_rotation_deg']:.1f} deg, "
           f"{a['affine_share_pct']:.0f} % of the field.")
    if abs(a["affine_zoom"] - 1.0) >= 0.1 and a["affine_share_pct"] >= 50.0:
        what = "inflates" if a["affine_zoom"] > 1.0 else "shrinks"
        txt += (f" It mostly {what} the whole image, not a local variation (models inflate anatomy "
                f"that ends in darkness: docs/weights.md).")
    return txt


#: foreground = pixels above min + FG_THRESHOLD * (max - min) of the image (the plausibility figures)
FG_THRESHOLD = 0.05


def _warped_foreground(image, u: np.ndarray, threshold: float):
    """The input's foreground mask F (above min + threshold * range) and F pulled back by ``u``
    (bilinear, zero outside the image): what each output pixel shows of the foreground."""
    import torch

    from .spatial import warp
    img = np.asarray(image, dtype=np.float64)
    if img.shape != u.shape[1:]:
        raise ValueError(f"image shape {img.shape} does not match the field's grid {u.shape[1:]}")
    lo, hi = float(img.min()), float(img.max())
    fg = (img > lo + threshold * (hi - lo)).astype(np.float32)
    warped = warp(torch.from_numpy(fg)[None, None], torch.from_numpy(u.astype(np.float32))[None],
                  mode="linear", padding="zeros")[0, 0].numpy().astype(np.float64)
    return fg, warped


def foreground_out_of_view_pct(image, phi_px, threshold: float = FG_THRESHOLD, det: Optional[np.ndarray] = None,
                               _warped=None) -> float:
    """% of the image's foreground that the deformation pushes out of the field of view.

    With pull-back warping, output pixel x shows the input at x + u(x) and covers det(I + grad u)(x)
    pixels of the input (change of variables).  The foreground still visible is therefore
    sum_x F(x + u(x)) * max(det(x), 0), with F the input's foreground mask (bilinear, zero outside
    the image), and the share lost is 1 - visible / sum F.  Compression inside the image keeps its
    mass (a smaller area with a smaller determinant weighs as much); only content sampled from
    outside the image is lost.

    Args:
        image: the input image (*spatial), same grid as the field.
        phi_px: displacement field (d, *spatial) in pixels.
        threshold: foreground = pixels above min + threshold * (max - min) of the image.
        det: the field's Jacobian determinant, if already computed.

    Returns:
        The lost share in percent, clipped to [0, 100].
    """
    u = _as_field(phi_px)
    fg, warped = _warped if _warped is not None else _warped_foreground(image, u, threshold)
    total = float(fg.sum())
    if total == 0:
        return 0.0
    if det is None:
        det = jacobian_determinant(u)
    visible = float(np.sum(warped * np.clip(det, 0.0, None)))
    return float(np.clip(100.0 * (1.0 - visible / total), 0.0, 100.0))


def anatomy_metrics(image, phi_px, side: Optional[float] = None, threshold: float = FG_THRESHOLD,
                    det: Optional[np.ndarray] = None, _warped=None) -> Dict[str, float]:
    """Folding and displacement where the deformed image shows anatomy, not over the whole grid.

    The whole-grid figures (:func:`field_metrics`) also count the empty background, where the image
    carries nothing that a recovery network could read and where most of a recovered field's folds
    lie (``benchmarks/fold_locations.py``).  Here only the output pixels that show the input's
    foreground count: x with F(x + u(x)) >= 0.5 (F as in :func:`foreground_out_of_view_pct`), i.e.
    the anatomy as the user sees it after warping.

    Args:
        image: the input image (*spatial), same grid as the field.
        phi_px: displacement field (d, *spatial) in pixels.
        side: the side for the percentages (default: the largest axis).
        threshold: foreground = pixels above min + threshold * (max - min) of the image.
        det: the field's Jacobian determinant, if already computed.

    Returns:
        ``anatomy_folding_pct``: % of those pixels with det <= 0; ``anatomy_max_disp_pct``: the
        largest |u| among them in % of the side; ``anatomy_share_pct``: their share of the grid.
        With no foreground all three are 0.
    """
    u = _as_field(phi_px)
    _, warped = _warped if _warped is not None else _warped_foreground(image, u, threshold)
    mask = warped >= 0.5
    n = int(mask.sum())
    if n == 0:
        return {"anatomy_folding_pct": 0.0, "anatomy_max_disp_pct": 0.0, "anatomy_share_pct": 0.0}
    if det is None:
        det = jacobian_determinant(u)
    side = float(side or max(u.shape[1:]))
    mag = np.sqrt(np.sum(u * u, axis=0))
    return {"anatomy_folding_pct": 100.0 * float(np.sum(det[mask] <= 0)) / n,
            "anatomy_max_disp_pct": 100.0 * float(mag[mask].max()) / side,
            "anatomy_share_pct": 100.0 * n / mask.size}


def plausibility_metrics(image, phi_px, side: Optional[float] = None,
                         det: Optional[np.ndarray] = None) -> Dict[str, float]:
    """:func:`affine_fit`, ``fg_out_of_view_pct`` (:func:`foreground_out_of_view_pct`) and the
    folding and maximum displacement inside the anatomy (:func:`anatomy_metrics`)."""
    u = _as_field(phi_px)
    if det is None:
        det = jacobian_determinant(u)
    out = affine_fit(u, side=side)
    warped = _warped_foreground(image, u, FG_THRESHOLD)
    out["fg_out_of_view_pct"] = foreground_out_of_view_pct(image, u, det=det, _warped=warped)
    out.update(anatomy_metrics(image, u, side=side, det=det, _warped=warped))
    return out
