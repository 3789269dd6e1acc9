"""Input checks shared by the engine (:mod:`napari_drdm.model`) and the napari widgets.

numpy only (no torch), so the widgets can run them on every change of a layer choice and show
the same one-line reason the engine would raise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError

__all__ = ["check_image", "check_labels", "MAX_IMAGE_RANGE"]

#: largest value range of a floating-point image: the normalisation (x - min) / (max - min) runs in float32
MAX_IMAGE_RANGE = 1e38


def check_image(image, ndim: int, name: str = "image", finite: bool = True) -> np.ndarray:
    """The image as an array, or InputError (a ValueError) naming the problem.

    Args:
        image: array-like, the spatial block a model will deform.
        ndim: the model's dimensionality (2 or 3).
        name: how to call the image in the message.
        finite: also refuse NaN/inf values (a full pass over the data).
    """
    a = np.asarray(image)
    if a.ndim != ndim:
        hint = ""
        if a.ndim == ndim + 1 and a.shape[-1] in (3, 4):
            hint = " (it looks like an RGB/RGBA image: convert it to a single grey-level channel)"
        elif a.ndim == ndim + 1:
            hint = f" (for a stack, pick one {ndim}D slice or frame)"
        raise InputError(f"{name} must be {ndim}D for this model, got a {a.ndim}D array of shape {a.shape}{hint}")
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
        raise InputError(f"{name} must be real numeric, got dtype {a.dtype}")
    if finite and a.dtype != bool and not np.all(np.isfinite(a)):
        raise InputError(f"{name} contains NaN or infinite values; replace them before generating")
    if finite and a.size and a.dtype.kind == "f" and float(np.max(a)) - float(np.min(a)) > MAX_IMAGE_RANGE:
        raise InputError(f"{name} spans [{float(np.min(a)):.3g}, {float(np.max(a)):.3g}], too wide for float32 "
                         f"arithmetic; expected a value range below {MAX_IMAGE_RANGE:.0e} (rescale the image)")
    if min(a.shape) < 2:
        raise InputError(f"{name} is too small: shape {a.shape}")
    return a


def check_labels(labels, shape: Sequence[int], name: str = "labels") -> np.ndarray:
    """The label map as an integer array, or InputError (a ValueError) naming the problem.

    Args:
        labels: array-like label map (integer, bool, or integer-valued float).
        shape: the image's spatial shape the labels must match.
        name: how to call the labels in the message.
    """
    lab = np.asarray(labels)
    if lab.shape != tuple(shape):
        raise InputError(f"{name} shape {lab.shape} does not match the image shape {tuple(shape)}")
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        if np.issubdtype(lab.dtype, np.floating) and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            if lab.size and max(-float(lab.min()), float(lab.max())) > 2.0 ** 53:
                who = "" if name == "labels" else f"{name}: "
                raise InputError(f"{who}label map holds values up to {max(-float(lab.min()), float(lab.max())):.3g}; "
                                 f"expected integer class values within +-2**53 (floats cannot hold larger "
                                 f"integers exactly)")
            return lab.astype(np.int64)
        raise InputError(f"{name} must hold integer class values, got dtype {lab.dtype} with non-integer values; "
                        f"a soft/probability map is not a label map")
    return lab
