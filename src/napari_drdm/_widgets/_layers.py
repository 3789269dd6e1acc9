"""Turning DRDM frames into napari layer data: a memory plan, per-frame packing and a frame store.

Qt-free and napari-free (numpy; torch only inside :func:`warp_grid`), so it is testable alone.

Per kept frame the store holds, on the image's own grid (``*shape``):

* ``image``    the deformed image (float32, or float16/uint8 when compact),
* ``labels``   the deformed labels (smallest integer type holding the input's classes),
* ``jacobian`` det(I + grad u) of the total field (float32, or float16 when compact),
* ``folding``  1 where det <= 0 (uint8),
* ``grid``     grid lines warped by the total field (uint8, 0..255),
* ``vectors``  the field subsampled on a coarse lattice (napari vectors rows),
* ``metrics``  phase, t, max/mean displacement (% of the largest physical side), folding (%).

A :class:`FramePlan` decides, from the number of frames and a byte budget, whether to store
compactly and which frames to keep (every k-th, plus the last forward and the last frame).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["FramePlan", "plan_frames", "FrameStore", "grid_lines", "jacobian_det", "vector_lattice",
           "label_dtype", "pack_frame", "fmt_bytes", "field_summary", "clip_to_image", "outline_mask"]

DEFAULT_BUDGET_MIB = 1024


def fmt_bytes(n: float) -> str:
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{int(n)} B"


def label_dtype(labels: Optional[np.ndarray]) -> Optional[np.dtype]:
    """Smallest dtype holding the label values (unsigned when none is negative)."""
    if labels is None:
        return None
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo >= 0:
        for dt in (np.uint8, np.uint16, np.uint32):
            if hi <= np.iinfo(dt).max:
                return np.dtype(dt)
    return np.dtype(np.int32) if lo >= np.iinfo(np.int32).min and hi <= np.iinfo(np.int32).max \
        else np.dtype(np.int64)


@dataclass
class FramePlan:
    """How frames are stored: dtypes, which frames are kept, and the bytes that takes."""

    shape: Tuple[int, ...]          # spatial shape of one frame
    n_forward: int
    n_recovery: int
    keep: List[int]                 # 0-based indices (over all frames) that are stored
    compact: bool
    image_dtype: np.dtype
    jacobian_dtype: np.dtype
    labels_dtype: Optional[np.dtype]
    bytes_per_frame: int
    budget: int
    image_range: Tuple[float, float] = (0.0, 1.0)   # for uint8 quantisation of the image

    @property
    def n_total(self) -> int:
        return self.n_forward + self.n_recovery

    @property
    def n_kept(self) -> int:
        return len(self.keep)

    @property
    def total_bytes(self) -> int:
        return self.n_kept * self.bytes_per_frame

    @property
    def stride(self) -> int:
        if self.n_kept < 2:
            return max(1, self.n_total)
        return max(1, self.keep[1] - self.keep[0])

    def describe(self) -> str:
        """One line for the widget: what was kept, how, and how much memory it takes."""
        if self.n_total == 0:
            return "no frames (T' = 0): only the final result"
        kinds = f"image {self.image_dtype.name}, jacobian {self.jacobian_dtype.name}"
        what = f"all {self.n_total} frames" if self.n_kept == self.n_total else \
            f"{self.n_kept} of {self.n_total} frames (every {self.stride}th + last forward + last)"
        note = "" if not self.compact else " compact"
        over = " (one frame alone exceeds the budget)" if self.total_bytes > self.budget else ""
        return f"frames: {what},{note} {kinds}: {fmt_bytes(self.total_bytes)} of a {fmt_bytes(self.budget)} budget{over}"


def plan_frames(shape: Sequence[int], n_forward: int, n_recovery: int, labels_dtype: Optional[np.dtype],
                image_range: Tuple[float, float] = (0.0, 1.0), budget_bytes: int = DEFAULT_BUDGET_MIB * 2 ** 20,
                ) -> FramePlan:
    """Full precision when everything fits the budget; else compact; else compact + every k-th frame."""
    shape = tuple(int(n) for n in shape)
    vox = int(np.prod(shape))
    n_total = int(n_forward) + int(n_recovery)
    lab_b = labels_dtype.itemsize if labels_dtype is not None else 0
    full = vox * (4 + 4 + 1 + 1 + lab_b)
    lo, hi = image_range
    f16_ok = max(abs(lo), abs(hi)) < 60000
    img_compact = np.dtype(np.float16) if f16_ok else np.dtype(np.uint8)
    compact = vox * (img_compact.itemsize + 2 + 1 + 1 + lab_b)
    budget = int(budget_bytes)
    all_frames = list(range(n_total))
    if n_total * full <= budget:
        return FramePlan(shape, n_forward, n_recovery, all_frames, False, np.dtype(np.float32),
                         np.dtype(np.float32), labels_dtype, full, budget, (lo, hi))
    specials = sorted({i for i in (n_forward - 1, n_total - 1) if i >= 0})

    def kept(stride):
        return sorted(set(range(0, n_total, stride)) | set(specials))

    stride = 1
    keep = kept(1)
    while len(keep) * compact > budget and stride < n_total:
        stride += 1
        keep = kept(stride)
    if len(keep) * compact > budget:      # not even the special frames fit: keep only the last one
        keep = [n_total - 1]
    return FramePlan(shape, n_forward, n_recovery, keep, True, img_compact, np.dtype(np.float16),
                     labels_dtype, compact, budget, (lo, hi))


def grid_lines(shape: Sequence[int], spacing: Optional[int] = None) -> np.ndarray:
    """Lines every ``spacing`` pixels along the last two axes (planes in 3D), float32 0/1."""
    shape = tuple(int(n) for n in shape)
    if spacing is None:
        spacing = max(4, int(round(max(shape[-2:]) / 16)))
    g = np.zeros(shape[-2:], dtype=np.float32)
    off = (spacing // 2)
    g[off::spacing, :] = 1.0
    g[:, off::spacing] = 1.0
    return np.broadcast_to(g, shape).copy()


def jacobian_det(ddf: np.ndarray) -> np.ndarray:
    """det(I + grad u) of a pixel field (d, *shape), central differences, float32 (saves memory in 3D)."""
    u = np.asarray(ddf, dtype=np.float32)
    nd = u.shape[0]
    axes = tuple(range(nd))
    g = [list(np.gradient(u[c], axis=axes)) for c in range(nd)]   # g[c][k] = d u_c / d x_k
    if nd == 1:
        return 1.0 + g[0]
    for c in range(nd):
        g[c][c] += 1.0
    if nd == 2:
        return g[0][0] * g[1][1] - g[0][1] * g[1][0]
    return (g[0][0] * (g[1][1] * g[2][2] - g[1][2] * g[2][1])
            - g[0][1] * (g[1][0] * g[2][2] - g[1][2] * g[2][0])
            + g[0][2] * (g[1][0] * g[2][1] - g[1][1] * g[2][0]))


def vector_lattice(shape: Sequence[int], per_axis: Optional[int] = None) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Subsampling lattice for the vectors layer: (positions (M, d), index slices)."""
    shape = tuple(int(n) for n in shape)
    per_axis = per_axis or (14 if len(shape) == 2 else 8)
    steps = [max(1, int(math.ceil(n / per_axis))) for n in shape]
    sl = tuple(slice(s // 2, n, s) for s, n in zip(steps, shape))
    coords = np.meshgrid(*[np.arange(n)[s] for n, s in zip(shape, sl)], indexing="ij")
    pos = np.stack([c.ravel() for c in coords], axis=1).astype(np.float32)
    return pos, sl


def pack_frame(ddf: np.ndarray, image: Optional[np.ndarray], labels: Optional[np.ndarray],
               warped_grid: Optional[np.ndarray], plan: FramePlan, spacing: Sequence[float],
               lattice: Tuple[np.ndarray, Tuple[slice, ...]]) -> Dict[str, object]:
    """Everything the store keeps for one frame, computed off the UI thread."""
    det = jacobian_det(ddf)
    fold = det <= 0
    out: Dict[str, object] = {"metrics": field_summary(ddf, spacing, det)}
    if image is not None:
        if plan.image_dtype == np.uint8:
            lo, hi = plan.image_range
            out["image"] = np.clip((image - lo) / (hi - lo + 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            out["image"] = image.astype(plan.image_dtype, copy=False)
    if labels is not None and plan.labels_dtype is not None:
        out["labels"] = labels.astype(plan.labels_dtype, copy=False)
    if plan.jacobian_dtype == np.float16:
        det = np.clip(det, -60000, 60000)
    out["jacobian"] = det.astype(plan.jacobian_dtype, copy=False)
    out["folding"] = fold.astype(np.uint8)
    if warped_grid is not None:
        out["grid"] = np.clip(warped_grid * 255.0 + 0.5, 0, 255).astype(np.uint8)
    pos, sl = lattice
    vec = np.stack([ddf[c][sl].ravel() for c in range(ddf.shape[0])], axis=1).astype(np.float32)
    out["vectors"] = (pos, clip_to_image(pos, vec, plan.shape))
    return out


def field_summary(ddf: np.ndarray, spacing: Sequence[float], det: Optional[np.ndarray] = None) -> Dict[str, float]:
    """The metrics shown for a field, on the image grid it is given on.

    Args:
        ddf: pull-back displacement field in pixels, (d, *shape).
        spacing: pixel spacing (mm) of each spatial axis.
        det: its Jacobian determinant if already computed.

    Returns max/mean displacement in % of the largest physical side, folding in % of pixels
    with det(J) <= 0, and the smallest det(J).
    """
    from ..core.metrics import displacement_pct

    det = jacobian_det(ddf) if det is None else det
    mx, mn = displacement_pct(ddf, spacing=spacing)
    return {"max_disp_pct": mx, "mean_disp_pct": mn, "folding_pct": 100.0 * float(np.mean(det <= 0)),
            "min_jacobian": float(det.min())}


def clip_to_image(pos: np.ndarray, vec: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Shorten vectors (keeping their direction) so that ``pos + vec`` stays inside the image."""
    hi = np.asarray(shape, np.float32) - 1
    tip = pos + vec
    with np.errstate(divide="ignore", invalid="ignore"):
        over = np.where(tip > hi, (hi - pos) / vec, np.where(tip < 0, -pos / vec, 1.0))
    f = np.clip(np.nan_to_num(over.min(axis=1), nan=1.0, posinf=1.0), 0.0, 1.0)
    return (vec * f[:, None]).astype(np.float32)


def outline_mask(image: np.ndarray, labels: Optional[np.ndarray]) -> np.ndarray:
    """Where the original anatomy is, for its outline over the frames: labels > 0 when given,
    else the image above an Otsu threshold (uint8 0/1)."""
    if labels is not None and np.any(labels):
        return (np.asarray(labels) > 0).astype(np.uint8)
    a = np.asarray(image, np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    hist, edges = np.histogram(a, bins=128, range=(lo, hi))
    w = np.cumsum(hist).astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    mu = np.cumsum(hist * centres)
    w1 = w[-1] - w
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w * w1 * (mu / w - (mu[-1] - mu) / w1) ** 2
    k = int(np.nanargmax(between[:-1])) if np.any(np.isfinite(between[:-1])) else 63
    return (a > edges[k + 1]).astype(np.uint8)


@dataclass
class FrameStore:
    """Preallocated per-frame buffers (lazily committed zeros), filled in order by the worker.

    The worker thread writes frame ``n`` completely, then increments ``n``; the UI thread only
    reads ``[:n]``, so no lock is needed.
    """

    plan: FramePlan
    has_image: bool = True
    has_labels: bool = False
    has_grid: bool = True
    lead_ndim: int = 0               # singleton axes between the frame axis and the spatial axes
    buffers: Dict[str, np.ndarray] = field(default_factory=dict)
    metrics: List[dict] = field(default_factory=list)
    vectors: List[np.ndarray] = field(default_factory=list)
    n: int = 0
    n_seen: int = 0                  # frames computed (kept or not)

    def __post_init__(self):
        p = self.plan
        shp = (p.n_kept,) + (1,) * self.lead_ndim + p.shape
        if self.has_image:
            self.buffers["image"] = np.zeros(shp, p.image_dtype)
        if self.has_labels and p.labels_dtype is not None:
            self.buffers["labels"] = np.zeros(shp, p.labels_dtype)
        self.buffers["jacobian"] = np.zeros(shp, p.jacobian_dtype)
        self.buffers["folding"] = np.zeros(shp, np.uint8)
        if self.has_grid:
            self.buffers["grid"] = np.zeros(shp, np.uint8)
        self._keep = set(p.keep)

    def wants(self, frame_number: int) -> bool:
        """Is this 0-based frame (over forward + recovery) kept?"""
        return frame_number in self._keep

    def add(self, packed: Dict[str, object], info: dict) -> None:
        j = self.n
        for key, buf in self.buffers.items():
            if key in packed:
                buf[j] = np.asarray(packed[key]).reshape(buf.shape[1:])
        pos, vec = packed["vectors"]
        lead = self.lead_ndim
        rows = np.zeros((len(pos), 2, 1 + lead + pos.shape[1]), np.float32)
        rows[:, 0, 0] = j
        rows[:, 0, 1 + lead:] = pos
        rows[:, 1, 1 + lead:] = vec
        self.vectors.append(rows)
        self.metrics.append(dict(info, **packed["metrics"]))
        self.n = j + 1

    def view(self, key: str, n: Optional[int] = None) -> np.ndarray:
        """The first ``n`` (default: all computed) frames of one buffer (a view, no copy)."""
        n = self.n if n is None else n
        return self.buffers[key][: max(n, 1)]

    def vectors_data(self, n: Optional[int] = None) -> np.ndarray:
        n = self.n if n is None else n
        if n == 0:
            return np.zeros((0, 2, 1 + self.lead_ndim + len(self.plan.shape)), np.float32)
        return np.concatenate(self.vectors[:n], axis=0)
