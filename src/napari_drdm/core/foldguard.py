"""Fold guard: make a displacement field fold-free (det(I + grad u) > 0 everywhere) with a local change.

What is checked
---------------
A pixel (voxel) x *folds* when the Jacobian determinant of x -> x + u(x) is <= 0.  Two discrete
estimators are used, both from the forward differences ``D_k u(x) = u(x + e_k) - u(x)`` of the
pixel field u (d = 2 or 3 spatial axes):

* **central** (paper Table 1, :func:`napari_drdm.core.metrics.jacobian_determinant`):
  ``numpy.gradient`` differences, i.e. ``(D_k u(x) + D_k u(x - e_k)) / 2`` inside and the
  one-sided difference at the first and last index of each axis;
* **strict** (:func:`napari_drdm.core.metrics.strict_folding_pct`): for every one of the 2^d
  choices of a forward or a backward difference per axis (the 2^d corner simplices around x),
  det(I + J) with those columns; at the border, where one side is missing, the existing side is
  used for both (``numpy.pad(..., mode="edge")`` of the differences).

:func:`fold_mask` marks a pixel when **any** of these 2^d + 1 determinants is <= ``margin`` (a
small positive number, 1e-3 by default, computed in float64 from the float32 field), so that a
field passing it passes both metrics exactly, and still does after the float32 rounding of a
conversion to millimetres and back (a relative 1e-7 change of u moves a determinant by far less
than 1e-3).

How a field is corrected (:func:`guard_field`)
----------------------------------------------
1. Fields with no marked pixel are returned **unchanged** (the same tensor, bit for bit); in a
   batch, only the samples with folds are touched.
2. Local smoothing, faded out at the edge: let R = marked pixels dilated by ``radius`` (a (2r+1)^d
   box), A = the (2h+1)^d box average of the field (h = ``half``; replicate padding at the image
   border, so a border pixel averages with itself and its inner neighbours: no zero displacement
   is pulled in from outside the image) and w = the (2h+1)^d box average of R's indicator.  The
   field becomes u + w (A - u): w is 1 wherever the whole box lies in R (the marked pixels
   themselves, since r >= h), falls to 0 over h pixels past R's edge, and pixels with w = 0 keep
   their exact values.  The masks are recomputed and the step repeated; after ``grow_every``
   rounds in which the count of marked pixels does not fall by at least ``min_progress`` (2 %)
   below its lowest value so far, r and h grow by one (capped by ``max_radius`` / ``max_half``,
   so that the change stays local).
   Averaging is what removes a fold: the differences of an averaged field are averages of the
   differences, so the local compression (a difference below -1 along an axis, or a strongly
   sheared cell) is spread over its neighbours, whose determinants were positive; the field keeps
   its size (it is averaged, not scaled).  The fading matters as much: replacing R by A outright
   leaves a step of A - u at R's edge, and a step is a compression or a shear that can fold the
   pixels beside it.  Those new folds were then corrected with wider regions and boxes, which made
   wider steps: on the 3D model at T' = 70 (11 % of the voxels strictly folded) the marked count
   went from 7 back up to about 1000 once h grew, the correction spread over 99.7 % of the volume
   and took 11.5 % of the mean displacement.  With the fade the same fields are fold-free after
   5-10 rounds, about 38 % of the voxels change and the mean displacement moves by -0.9 %
   (benchmarks/README.md "Fold guard").
   Repeated, the region tends to a smooth interpolation of the values around it (in the continuous
   2D case a harmonic map, which is one-to-one inside a convex region bounded by a one-to-one map:
   Rado-Kneser-Choquet), but no discrete theorem promises that every fold goes, hence stage 3.
3. Guaranteed termination: after ``max_rounds`` rounds, a sample still marked is scaled towards
   zero displacement on a neighbourhood of what is left, u <- s u for s = 1/2, 1/4, 0, the
   neighbourhood doubling until it covers the image.  With s = 0 on the whole image the field is
   the identity map, whose determinants are all exactly 1 under both estimators, in 2D and 3D,
   inside and at the border: the loop cannot end with a fold.  (It was never needed in the
   measurements recorded in benchmarks/README.md; the report's ``fallback`` says when it is.)

So the returned field passes both checks at every pixel/voxel, border included, in 2D and 3D, by
construction: the last thing done to it is the check.  The guard is grid-local: a field resampled
to another grid (``ModelGrid.field_to_original``) must be guarded again on that grid, which the
callers do.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = ["fold_mask", "guard_field", "GuardReport", "DEFAULT_MARGIN"]

DEFAULT_MARGIN = 1e-3
_CHUNK_VOXELS = 1 << 21          # fold_mask works on slabs of about this many pixels (memory bound)


def _check(u: torch.Tensor) -> int:
    if u.dim() not in (4, 5) or u.shape[1] != u.dim() - 2:
        raise ValueError(f"field must have shape (B, d, *spatial) with d = 2 or 3, got {tuple(u.shape)}")
    if min(u.shape[2:]) < 2:
        raise ValueError(f"field is too small for finite differences: {tuple(u.shape)}")
    return u.dim() - 2


def _one_sided(u: torch.Tensor, axis: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward differences along spatial ``axis`` (0-based), edge-padded like the metrics."""
    dim = axis + 2
    n = u.shape[dim]
    d = u.narrow(dim, 1, n - 1) - u.narrow(dim, 0, n - 1)
    fwd = torch.cat([d, d.narrow(dim, n - 2, 1)], dim)     # x = n-1 uses the last difference
    bwd = torch.cat([d.narrow(dim, 0, 1), d], dim)         # x = 0 uses the first difference
    return fwd, bwd


def _with_identity(col: torch.Tensor, k: int) -> torch.Tensor:
    col = col.clone()
    col[:, k] += 1.0
    return col


def _det2(c0, c1):
    return c0[:, 0] * c1[:, 1] - c0[:, 1] * c1[:, 0]


def _cross(a, b):
    return torch.stack([a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1],
                        a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2],
                        a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]], 1)


def fold_mask(u: torch.Tensor, margin: float = DEFAULT_MARGIN, exact: bool = True) -> torch.Tensor:
    """Pixels where the central or any one-sided (2^d) Jacobian determinant is <= ``margin``.

    Args:
        u: pixel displacement field (B, d, *spatial), d = 2 or 3.
        margin: threshold; 0 with ``exact=True`` reproduces the metrics' ``det <= 0``.
        exact: True computes in float64 (as the metrics do); False in float32, about 10x faster
            on a CPU, used inside the correction loop, whose result is then checked exactly.

    Returns:
        bool tensor (B, *spatial).
    """
    nd = _check(u)
    n0 = u.shape[2]
    rows = max(2, _CHUNK_VOXELS // max(1, int(u[0, 0, 0].numel())))
    if n0 > rows:                  # large volumes in slabs along the first axis, with a 1-pixel halo
        parts = []
        for a in range(0, n0, rows):
            lo, hi = max(a - 1, 0), min(a + rows + 1, n0)
            m = _fold_mask(u[:, :, lo:hi], margin, exact, nd)
            parts.append(m[:, a - lo:a - lo + min(rows, n0 - a)])
        return torch.cat(parts, 1)
    return _fold_mask(u, margin, exact, nd)


def _fold_mask(u: torch.Tensor, margin: float, exact: bool, nd: int) -> torch.Tensor:
    u = u.detach().to(torch.float64 if exact else torch.float32)
    cols = []                          # per axis: (forward, backward, central) columns of I + J
    for k in range(nd):
        f, b = _one_sided(u, k)
        cols.append((_with_identity(f, k), _with_identity(b, k), _with_identity((f + b) * 0.5, k)))
    bad = None
    if nd == 2:
        for i in range(3):
            for j in range(3):
                if (i == 2) != (j == 2):          # central only with central
                    continue
                m = _det2(cols[0][i], cols[1][j]) <= margin
                bad = m if bad is None else bad | m
        return bad
    for j in range(3):
        for k in range(3):
            if (j == 2) != (k == 2):
                continue
            cr = _cross(cols[1][j], cols[2][k])
            for i in ((2,) if j == 2 else (0, 1)):
                m = (cols[0][i] * cr).sum(1) <= margin
                bad = m if bad is None else bad | m
    return bad


@dataclass
class GuardReport:
    """What :func:`guard_field` did, per sample of the batch."""

    folded_before: List[int] = field(default_factory=list)   # marked pixels on entry
    rounds: List[int] = field(default_factory=list)          # smoothing rounds used
    changed: List[int] = field(default_factory=list)         # pixels whose displacement changed
    fallback: List[float] = field(default_factory=list)      # scale s of the fallback (1.0: not needed)

    def as_dict(self) -> dict:
        return {"folded_before": list(self.folded_before), "rounds": list(self.rounds),
                "changed": list(self.changed), "fallback_scale": list(self.fallback)}


def _box_average(u: torch.Tensor, half: int) -> torch.Tensor:
    nd = u.dim() - 2
    pad = F.pad(u, (half, half) * nd, mode="replicate")
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    return pool(pad, 2 * half + 1, stride=1)


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilation by a (2 radius + 1)^d box, one axis at a time (cost linear in the radius)."""
    if radius <= 0:
        return mask
    nd = mask.dim() - 1
    pool = F.max_pool2d if nd == 2 else F.max_pool3d
    x = mask[:, None].to(torch.float32)
    for ax in range(nd):
        r = min(int(radius), x.shape[2 + ax] - 1)
        if r <= 0:
            continue
        k = [1] * nd
        pad = [0] * nd
        k[ax], pad[ax] = 2 * r + 1, r
        x = pool(x, tuple(k), stride=1, padding=tuple(pad))
    return x[:, 0] > 0


def _smooth_locally(v, m, margin, radius, half, grow_every, max_radius, max_half, max_rounds, min_progress):
    """Stage 2 of the module docstring on one sample: returns (field, mask left, rounds)."""
    r, h, rounds, best, since, exact = radius, half, 0, int(m.sum()), 0, False
    while rounds < max_rounds:
        if not bool(m.any()):
            if exact:
                break
            exact = True                       # passed in float32: the float64 check decides
            m = fold_mask(v, margin)
            continue
        w = _box_average(_dilate(m, r)[:, None].to(v.dtype), h)    # 1 on R's core, 0 beyond R by h
        v = torch.where(w > 0, v + w * (_box_average(v, h) - v), v)
        m = fold_mask(v, margin, exact)
        rounds += 1
        n = int(m.sum())
        if n < best * (1.0 - min_progress):     # min_progress = 0: any fall counts
            best, since = n, 0
        else:
            since += 1
        if since >= grow_every:                # slow or stalled: a wider region and a wider average
            r, h, since, best = min(r + 1, max_radius), min(h + 1, max_half), 0, min(best, n)
    if not exact:
        m = fold_mask(v, margin)
    return v, m, rounds


def _scale_locally(v, m, margin, radius):
    """Stage 3 (fallback): u <- s u on a growing neighbourhood of the folds, s = 1/2, 1/4, 0.

    Ends at the latest when the neighbourhood covers the image with s = 0: the identity map."""
    r = max(1, radius)
    while True:
        region = _dilate(m, r)[:, None]
        for s in (0.5, 0.25, 0.0):
            cand = torch.where(region, v * s, v)
            if not bool(fold_mask(cand, margin).any()):
                return cand, s
        if bool(region.all()):                 # unreachable: s = 0 on everything is the identity
            raise AssertionError("the identity map was flagged as folding")
        r *= 2


def guard_field(u: torch.Tensor, margin: float = DEFAULT_MARGIN, radius: int = 1, half: int = 1,
                grow_every: int = 2, max_radius: int = 4, max_half: int = 3,
                max_rounds: int = 1000, min_progress: float = 0.02) -> Tuple[torch.Tensor, GuardReport]:
    """Return a fold-free version of ``u`` (see the module docstring) and a :class:`GuardReport`.

    Args:
        u: pixel displacement field (B, d, *spatial), d = 2 or 3, any float dtype and device.
        margin: every determinant of the result is > margin (float64 arithmetic on the result).
        radius: initial dilation of the marked pixels (box of side 2 radius + 1).
        half: initial half-width of the box average (box of side 2 half + 1).
        grow_every: smoothing rounds in which the count of marked pixels does not fall below
            (1 - min_progress) times its lowest value so far before radius and half grow by one.
        max_radius, max_half: caps on that growth (keeps the change local); with
            max_radius >= max_half the marked pixels always get the full average.
        min_progress: the relative fall of that count that counts as progress (0: any fall).
        max_rounds: smoothing rounds before the fallback (local scaling towards zero) is used.

    Returns:
        (field, report): ``field`` is ``u`` itself when nothing folds, otherwise a new tensor whose
        samples without folds are bit-identical to the input's.
    """
    bad = fold_mask(u, margin, exact=False)
    per = bad.flatten(1).sum(1)
    if not bool(per.any()):                  # nothing found in float32: confirm in float64
        bad = fold_mask(u, margin)
        per = bad.flatten(1).sum(1)
    rep = GuardReport(folded_before=[int(v) for v in per], rounds=[0] * u.shape[0],
                      changed=[0] * u.shape[0], fallback=[1.0] * u.shape[0])
    if not bool(per.any()):
        return u, rep
    out = u.clone()
    for b in torch.nonzero(per).flatten().tolist():
        v, m, rep.rounds[b] = _smooth_locally(out[b:b + 1], bad[b:b + 1], margin, int(radius), int(half),
                                              int(grow_every), int(max_radius), int(max_half), int(max_rounds),
                                              float(min_progress))
        if bool(m.any()):
            v, rep.fallback[b] = _scale_locally(v, m, margin, int(radius))
        rep.changed[b] = int((v != u[b:b + 1]).any(1).sum())
        out[b:b + 1] = v
    return out, rep
