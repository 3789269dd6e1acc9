"""napari reader for medical images: NIfTI (``*.nii``, ``*.nii.gz``), NRRD (``*.nrrd``, ``*.nhdr``)
and DICOM (a ``*.dcm`` file, or a folder holding a ``*.dcm`` series), read by :mod:`napari_drdm.io`.

napari offers several readers for some of these names; choose this one once with
``viewer.open(path, plugin="napari-drdm")``, in the "Choose reader" dialog (tick "Remember"), or
for good with :func:`prefer_this_reader` (napari's Preferences > Plugins > File extension readers).

* The array keeps the file's own axis order (i, j, k), as :mod:`napari_drdm.io` does; a 4D file
  (i, j, k, t) gets its time axis moved first so napari's sliders show time and the last two
  axes are displayed.  Trailing singleton axes of a 2D image stored as (i, j, 1) are dropped.
* ``scale`` = voxel spacing (mm), ``translate`` = the affine's origin column; the full 4x4
  ``affine``, the ``nifti_header`` and the ``spacing`` go into the layer's metadata so the writer
  can put them back unchanged.
* Label maps become labels layers: integer (or integer-valued) data whose file name contains
  ``label``, ``seg`` or ``mask``, or integer data with few distinct values (at most 64).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, List, Optional, Union

import numpy as np

__all__ = ["napari_get_reader", "read_nifti_layers", "read_layers", "looks_like_labels", "prefer_this_reader",
           "READER_PATTERNS"]

READER_PATTERNS = ("*.nii", "*.nii.gz", "*.nrrd", "*.nhdr", "*.dcm")
PLUGIN = "napari-drdm"

MAX_LABEL_VALUES = 64
_LABEL_WORDS = re.compile(r"(label|seg|mask)", re.IGNORECASE)


def _is_nifti(path: str) -> bool:
    p = str(path).lower()
    return p.endswith(".nii") or p.endswith(".nii.gz")


def _is_medical(path) -> bool:
    p = Path(path)
    if p.is_dir():
        return any(p.glob("*.dcm"))
    name = p.name.lower()
    return _is_nifti(name) or name.endswith((".nrrd", ".nhdr", ".dcm"))


def napari_get_reader(path: Union[str, List[str]]) -> Optional[Callable]:
    """A reader function for NIfTI, NRRD and DICOM paths (or a DICOM folder); None for anything else.

    Args:
        path: one path or a list of paths, as napari passes them.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths or not all(_is_medical(p) for p in paths):
        return None
    return read_layers


def prefer_this_reader(patterns=READER_PATTERNS) -> None:
    """Make napari open these file names with this plugin without asking (a saved napari setting).

    Args:
        patterns: file name patterns, e.g. ``("*.nii.gz",)``.
    """
    from napari.settings import get_settings
    plugins = get_settings().plugins
    plugins.extension2reader = {**plugins.extension2reader, **{pat: PLUGIN for pat in patterns}}


def looks_like_labels(data: np.ndarray, name: str = "") -> bool:
    """Integer-valued data named like a label map, or integer data with few distinct values."""
    a = np.asarray(data)
    if a.dtype == bool:
        return True
    named = bool(_LABEL_WORDS.search(name))
    if np.issubdtype(a.dtype, np.integer):
        if named:
            return True
        flat = a.reshape(-1)
        step = max(1, flat.size // 200_000)        # quick look first: big CT volumes leave early
        if np.unique(flat[::step]).size > MAX_LABEL_VALUES:
            return False
        return np.unique(flat).size <= MAX_LABEL_VALUES
    if named and np.issubdtype(a.dtype, np.floating):
        return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)) and a.size and a.min() >= 0)
    return False


def read_layers(path: Union[str, List[str]]) -> List[tuple]:
    """Read NIfTI, NRRD or DICOM file(s) (or DICOM folders) as napari LayerData tuples (image or labels).

    Args:
        path: one path or a list of paths.
    """
    from .io import read_image, squeeze_trailing, stem_of

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out = []
    for p in paths:
        vol = read_image(p)
        data = np.asarray(vol.data)
        aff = np.asarray(vol.affine, dtype=np.float64)
        spacing = [float(s) for s in vol.spacing]
        time_first = False
        data = squeeze_trailing(data)
        if data.ndim == 4:
            data = np.moveaxis(data, -1, 0)
            zooms = vol.header.get_zooms() if vol.header is not None else ()
            dt = float(zooms[3]) if len(zooms) > 3 and float(zooms[3]) > 0 else 1.0
            scale = [dt] + spacing[:3]
            translate = [0.0] + [float(v) for v in aff[:3, 3]]
            time_first = True
        else:
            nd = min(data.ndim, 3)
            scale = spacing[:nd] + [1.0] * (data.ndim - nd)
            translate = [float(v) for v in aff[:nd, 3]] + [0.0] * (data.ndim - nd)
        scale = [s if np.isfinite(s) and s > 0 else 1.0 for s in scale]
        name = stem_of(p)
        meta: dict[str, Any] = {"affine": aff, "nifti_header": vol.header, "spacing": tuple(spacing),
                                "source_path": str(p)}
        if time_first:
            meta["drdm_time_first"] = True
        kwargs = {"name": name, "scale": scale, "translate": translate, "metadata": meta}
        if looks_like_labels(data, name):
            if not np.issubdtype(data.dtype, np.integer):
                data = data.astype(np.int32)
            out.append((data, kwargs, "labels"))
        else:
            out.append((data, kwargs, "image"))
    return out


read_nifti_layers = read_layers          # the name this reader had when it read NIfTI only
