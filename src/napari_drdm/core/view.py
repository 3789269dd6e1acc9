"""The model's view fitted to the anatomy: the reverse loop runs on a square (cube) around it.

A model sees its S^d grid.  When the anatomy fills only part of the image (a head in a wide field
of view, a knee in a long scan), most of that grid is empty and the anatomy gets fewer pixels than
the network was trained with.  The published 2D network then stretches it to fill the view: on
the held-out KmeansTest brain slices, whose head spans about three quarters of the view, the
recovered field's global zoom was 1.21 on average, 1.09 with the shipped fit (docs/weights.md).
Fitting the view to the anatomy first gives the network the anatomy at the scale it knows.

:func:`anatomy_views` finds, per sample, the smallest square (cube) of the model grid that holds
everything brighter than ``threshold`` with ``margin`` model pixels to spare, at most
``max_zoom`` times smaller than the grid (the data kit's training images were never upsampled more
than 2x).  :func:`to_view` resamples an image into it; the reverse loop then runs there unchanged.
:func:`field_from_view` brings a pixel field back to the whole grid: displacements are scaled by
the view's size and, outside the view, each point takes the field of the nearest point of the
view's border (the view holds all the anatomy, so what lies outside is empty background).  Fields
stay on the model grid, so every figure is measured on the same grid with the view on or off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .metrics import FG_THRESHOLD
from .spatial import resample_affine

__all__ = ["View", "anatomy_views", "to_view", "field_from_view"]

#: the largest zoom a view may apply (the data kit's preparation upsamples at most 2x, data.max_upsample)
MAX_ZOOM = 2.0


@dataclass(frozen=True)
class View:
    """One sample's view: view index ``m`` reads grid index ``ratio * m + offset[c]`` on axis ``c``.

    ``ratio`` <= 1 is the view's side over the grid's (1: the whole grid, nothing changes).
    """

    ratio: float
    offset: tuple

    @property
    def whole(self) -> bool:
        return self.ratio >= 1.0 - 1e-9

    @property
    def zoom(self) -> float:
        """How much larger the anatomy appears to the network (1 / ratio)."""
        return 1.0 / self.ratio


def _whole(nd: int) -> View:
    return View(1.0, (0.0,) * nd)


def anatomy_views(x: torch.Tensor, margin: int, threshold: float = FG_THRESHOLD,
                  max_zoom: float = MAX_ZOOM) -> List[View]:
    """Per sample of ``x`` (B, 1, S...) in [0, 1], the view around its anatomy.

    Args:
        x: images on the model grid, normalised to [0, 1].
        margin: model pixels (of the view) kept free around the anatomy's bounding box on each side.
        threshold: intensity above which a pixel is anatomy (the background extension's and the
            plausibility figures' threshold).
        max_zoom: the view is at least ``S / max_zoom`` pixels wide.

    Returns:
        one :class:`View` per sample; the whole grid when a sample has no anatomy or when it
        already fills the grid.
    """
    nd = x.dim() - 2
    size = int(x.shape[2])
    out = []
    for b in range(x.shape[0]):
        fg = x[b, 0] > threshold
        if not bool(fg.any()):
            out.append(_whole(nd))
            continue
        lo, hi = [], []
        for ax in range(nd):
            other = tuple(a for a in range(nd) if a != ax)
            hit = torch.nonzero(fg.any(dim=other) if other else fg).flatten()
            lo.append(float(hit.min()))
            hi.append(float(hit.max()) + 1.0)            # pixel edges: [lo, hi)
        extent = max(h - a for a, h in zip(lo, hi))
        free = size - 2 * int(margin)
        side = extent * size / max(free, 1)
        side = min(max(side, size / float(max_zoom)), float(size))
        ratio = side / size
        if ratio >= 1.0 - 1e-9:
            out.append(_whole(nd))
            continue
        offset = []
        for a, h in zip(lo, hi):
            start = min(max((a + h) / 2 - side / 2, 0.0), size - side)   # the view stays on the grid
            offset.append(start + 0.5 * ratio - 0.5)                    # view pixel centre 0 -> grid index
        out.append(View(ratio, tuple(offset)))
    return out


def to_view(x: torch.Tensor, views: Sequence[View], mode: str = "linear") -> torch.Tensor:
    """Images (B, C, S...) resampled into their views (zeros outside the grid)."""
    if all(v.whole for v in views):
        return x
    shape = tuple(x.shape[2:])
    nd = len(shape)
    return torch.cat([x[b:b + 1] if v.whole else
                      resample_affine(x[b:b + 1], shape, (v.ratio,) * nd, v.offset, mode, "zeros")
                      for b, v in enumerate(views)], 0)


def field_from_view(u: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Pixel fields on the views (B, d, S...) -> pixel fields on the whole grid (B, d, S...).

    Displacements are multiplied by the view's ratio (a view pixel is ``ratio`` grid pixels);
    outside the view the field of the view's nearest border point is kept.
    """
    if all(v.whole for v in views):
        return u
    shape = tuple(u.shape[2:])
    nd = len(shape)
    outs = []
    for b, v in enumerate(views):
        if v.whole:
            outs.append(u[b:b + 1])
            continue
        inv = 1.0 / v.ratio
        back = resample_affine(u[b:b + 1], shape, (inv,) * nd, tuple(-o * inv for o in v.offset), "linear", "border")
        outs.append(back * v.ratio)
    return torch.cat(outs, 0)


def views_report(views: Sequence[View]) -> Optional[List[float]]:
    """Each view's zoom (1: the whole grid), for the records that say what a generation used."""
    return [float(v.zoom) for v in views]
