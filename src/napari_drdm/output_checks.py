"""Checks of arrays before they are written: a dtype NIfTI holds exactly, finite values, and warped
labels holding only the input's label values.

Each refusal is an :class:`~napari_drdm.errors.OutputError` with a one-line message naming the output.
"""
from __future__ import annotations

import numpy as np

from .errors import OutputError

__all__ = ["writable_array", "check_finite", "check_label_values"]


def writable_array(arr, what: str) -> np.ndarray:
    """``arr`` in a dtype NIfTI holds exactly, or refuse.

    bool becomes uint8, float16 becomes float32 (exact), float128 becomes float64 when its
    values fit, int64/uint64 are narrowed to 32 bits when their values fit and otherwise kept
    (NIfTI has 64-bit integer codes).

    Args:
        arr: the array to be written.
        what: how to name it in messages (file and role).

    Raises:
        OutputError: complex, object or string data, or float128 values beyond float64.
    """
    a = np.asarray(arr)
    kind = a.dtype.kind
    if a.dtype == bool:
        return a.astype(np.uint8)
    if kind == "f":
        if a.dtype.itemsize < 4:
            return a.astype(np.float32)
        if a.dtype.itemsize > 8:
            b = a.astype(np.float64)
            if not np.array_equal(np.isfinite(a), np.isfinite(b)):
                raise OutputError(f"{what}: float{8 * a.dtype.itemsize} values beyond the float64 range cannot be "
                                  f"written to NIfTI")
            return b
        return a
    if kind in "iu":
        if a.dtype.itemsize == 8 and a.size:
            lo, hi = int(a.min()), int(a.max())
            for t in (np.int32, np.uint32):
                if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                    return a.astype(t)
        return a
    raise OutputError(f"{what}: dtype {a.dtype} cannot be written to NIfTI (expected real numbers)")


def check_finite(arr, what: str) -> None:
    """Refuse an output holding NaN or infinite values.

    Args:
        arr: the array.
        what: how to name it in messages.
    """
    a = np.asarray(arr)
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
        n = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise OutputError(f"{what}: {n} of {a.size} values are NaN or infinite; nothing was written")


def check_label_values(out_labels, allowed, what: str) -> None:
    """Refuse warped labels holding a value the input label map did not have.

    Args:
        out_labels: the warped label map.
        allowed: the input's label values (plus the background).
        what: how to name it in messages.
    """
    new = np.setdiff1d(np.unique(np.asarray(out_labels)), np.asarray(allowed))
    if new.size:
        raise OutputError(f"{what}: label values {new[:5].tolist()} are not in the input label map; nothing "
                          f"was written")
