"""napari writer: image and labels layers to NIfTI (``.nii`` / ``.nii.gz``).

The affine comes from the layer's metadata when the layer was read by this plugin (or made from
such a layer by the explorer), otherwise from its scale and translate.  Special layers:

* a layer whose metadata holds ``drdm_ddf`` (the explorer's "recovered field") is written as the
  displacement field itself: shape (*spatial, 1, d), millimetres, NIfTI intent VECTOR, the same
  convention as ``drdm generate`` (see :mod:`napari_drdm.outputs`);
* a stack whose first axis is time or the explorer's frame axis (metadata ``drdm_time_first`` or
  ``drdm_frame_axis``) is written with that axis last, as NIfTI's 4th (time) dimension.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["write_image", "write_labels", "affine_for_layer"]


def affine_for_layer(meta: Dict[str, Any], n_spatial: int) -> np.ndarray:
    """4x4 affine: metadata ``affine`` if present, else diag(scale) + translate of the spatial axes."""
    md = meta.get("metadata") or {}
    aff = md.get("affine")
    if aff is not None:
        a = np.asarray(aff, dtype=np.float64)
        if a.shape == (4, 4) and np.all(np.isfinite(a)) and abs(np.linalg.det(a[:3, :3])) > 1e-12:
            return a
    scale = list(meta.get("scale") if meta.get("scale") is not None else [])
    translate = list(meta.get("translate") if meta.get("translate") is not None else [])
    scale = [float(s) for s in scale[len(scale) - n_spatial:]] if scale else [1.0] * n_spatial
    translate = [float(t) for t in translate[len(translate) - n_spatial:]] if translate else [0.0] * n_spatial
    a = np.eye(4)
    for i in range(min(n_spatial, 3)):
        a[i, i] = scale[i]
        a[i, 3] = translate[i]
    return a


def _nifti_path(path: str) -> str:
    p = str(path)
    low = p.lower()
    if low.endswith(".nii") or low.endswith(".nii.gz"):
        return p
    return p + ".nii.gz"


def _write(path: str, data: Any, meta: Dict[str, Any], labels: bool) -> List[str]:
    from .io import write_nifti

    md = meta.get("metadata") or {}
    out_path = _nifti_path(path)
    header = md.get("nifti_header")
    ddf = md.get("drdm_ddf")
    if ddf is not None:
        from .outputs import write_ddf
        ddf = np.asarray(ddf)
        d = ddf.shape[0]
        spacing: Sequence[float] = md.get("spacing") or affine_for_layer(meta, d).diagonal()[:d]
        aff = affine_for_layer(meta, d)
        write_ddf(out_path, ddf, [float(s) for s in spacing], aff, overwrite=True)
        return [out_path]
    arr = np.asarray(data)
    if md.get("drdm_time_first") or md.get("drdm_frame_axis"):
        n_spatial = arr.ndim - 1
        aff = affine_for_layer(meta, n_spatial)
        arr = np.moveaxis(arr, 0, -1)                      # frames/time last
        if n_spatial < 3:                                  # NIfTI: time is the 4th dimension
            arr = arr.reshape(arr.shape[:-1] + (1,) * (3 - n_spatial) + arr.shape[-1:])
        header = None                                      # the source header describes another shape
    else:
        aff = affine_for_layer(meta, min(arr.ndim, 3))
    if labels and not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
        arr = arr.astype(np.int32)
    write_nifti(out_path, arr, aff, header=header, overwrite=True)
    return [out_path]


def write_image(path: str, data: Any, meta: Dict[str, Any]) -> Optional[List[str]]:
    """npe2 single-layer writer for image layers."""
    return _write(path, data, meta, labels=False)


def write_labels(path: str, data: Any, meta: Dict[str, Any]) -> Optional[List[str]]:
    """npe2 single-layer writer for labels layers."""
    return _write(path, data, meta, labels=True)
