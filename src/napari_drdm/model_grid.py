"""The mapping between an image's own grid (any shape and spacing) and a model's isotropic S^d grid.

The image is centred in a square / cube covering its largest physical extent, so the model sees
it undistorted; fields generated on the model grid are resized back with their displacements
rescaled to the image's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .core.foldguard import guard_field
from .core.spatial import resample_affine
from .errors import InputError

__all__ = ["ModelGrid"]


@dataclass
class ModelGrid:
    """Mapping between an image's own grid and the model's isotropic S^d grid.

    Model index m reads original (continuous) index ``scale * m + offset`` on each axis.
    """

    shape: tuple            # original spatial shape
    spacing: tuple          # original spacing (mm)
    size: int               # model side S
    scale: tuple
    offset: tuple

    @property
    def identity(self) -> bool:
        return all(n == self.size for n in self.shape) and all(abs(a - 1) < 1e-12 for a in self.scale) \
            and all(abs(b) < 1e-12 for b in self.offset)

    @property
    def model_spacing(self) -> float:
        return float(self.scale[0] * self.spacing[0])

    @classmethod
    def fit(cls, shape: Sequence[int], spacing: Optional[Sequence[float]], size: int) -> "ModelGrid":
        shape = tuple(int(n) for n in shape)
        sp = tuple(float(s) for s in (spacing if spacing is not None else [1.0] * len(shape)))
        if len(sp) != len(shape) or any(not np.isfinite(s) or s <= 0 for s in sp):
            raise InputError(f"spacing must be {len(shape)} positive numbers, got {spacing}")
        extent = max(n * s for n, s in zip(shape, sp))
        h = extent / size
        scale = tuple(h / s for s in sp)
        offset = tuple((0.5 * h - extent / 2 + n * s / 2) / s - 0.5 for n, s in zip(shape, sp))
        return cls(shape, sp, int(size), scale, offset)

    def to_model(self, x: torch.Tensor, mode: str = "linear") -> torch.Tensor:
        """(B, C, *shape) -> (B, C, S...) (zeros outside)."""
        if self.identity:
            return x
        return resample_affine(x, (self.size,) * len(self.shape), self.scale, self.offset, mode, "zeros")

    def field_to_original(self, ddf: torch.Tensor, fold_guard: bool = False) -> torch.Tensor:
        """Model-grid pixel field (B, d, S...) -> original-grid pixel field (B, d, *shape).

        Args:
            ddf: pixel field on the model grid.
            fold_guard: make the resampled field fold-free on the original grid (resampling a
                fold-free field can fold: the guard holds per grid, see core/foldguard.py).
        """
        if self.identity:
            return guard_field(ddf)[0] if fold_guard else ddf
        nd = len(self.shape)
        inv_scale = [1.0 / a for a in self.scale]
        inv_off = [-b / a for a, b in zip(self.scale, self.offset)]
        out = resample_affine(ddf, self.shape, inv_scale, inv_off, "linear", "border")
        a = torch.tensor(self.scale, dtype=ddf.dtype, device=ddf.device).view(1, nd, *([1] * nd))
        out = out * a
        return guard_field(out)[0] if fold_guard else out
