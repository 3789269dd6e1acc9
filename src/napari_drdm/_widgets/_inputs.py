"""What a DRDM run reads from napari layers: the spatial block, its labels and its geometry.

Qt-free (numpy and duck-typed napari layers).  The array checks are the engine's own
(:mod:`napari_drdm.checks`), so Run is disabled for exactly the inputs the model would refuse;
what is checked here is what only the layers know: RGB, multiscale, which axes are space and
which are time/stack axes, and whether the model's dimensionality matches the data's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..checks import check_image, check_labels
from ..errors import InputError

__all__ = ["Inputs", "read_inputs", "stack_axes", "spatial_ndim", "is_output_layer", "layer_affine",
           "output_geometry", "check_export_layers"]


@dataclass
class Inputs:
    """What a run needs, read from the chosen layers (the spatial block the model will see)."""

    image_layer: Any
    labels_layer: Any
    image: np.ndarray                       # (*spatial)
    labels: Optional[np.ndarray]
    spacing: Tuple[float, ...]              # spatial spacing
    lead_index: Tuple[int, ...]             # indices of the leading (time/stack) axes, () if none
    describe: str


def is_output_layer(layer) -> bool:
    """A layer this plugin made (explorer frames or export previews): never an input."""
    md = getattr(layer, "metadata", None) or {}
    return "drdm_run" in md or "drdm_export_preview" in md


def stack_axes(layer) -> int:
    """Leading axes that are time, not space: 1 for a 2D+t cine or a 4D NIfTI read by this plugin."""
    md = getattr(layer, "metadata", None) or {}
    return 1 if md.get("drdm_time_first") else 0


def spatial_ndim(layer) -> int:
    """Spatial dimensionality of an image layer (time axes and RGB channels excluded)."""
    return layer.ndim - stack_axes(layer) - (1 if getattr(layer, "rgb", False) else 0)


def layer_affine(layer) -> Optional[np.ndarray]:
    """The 4x4 affine a reader stored in the layer's metadata, if usable."""
    aff = (getattr(layer, "metadata", None) or {}).get("affine")
    if aff is None:
        return None
    a = np.asarray(aff, dtype=np.float64)
    ok = a.shape == (4, 4) and np.all(np.isfinite(a)) and abs(np.linalg.det(a[:3, :3])) > 1e-12
    return a if ok else None


def output_geometry(inp: Inputs) -> Tuple[Tuple[float, ...], Tuple[float, ...], Optional[np.ndarray]]:
    """(scale, translate, affine) that put a run's output layers where its input block lies.

    The translation moves to the slice or time frame deformed; the affine is kept only when it
    describes the axes the outputs have (not for stacks, where it leaves out the stack axes).

    Args:
        inp: what :func:`read_inputs` returned.
    """
    layer = inp.image_layer
    scale = tuple(float(s) for s in layer.scale)
    translate = [float(t) for t in layer.translate]
    for a, i in enumerate(inp.lead_index):
        translate[a] += i * scale[a]
    aff = layer_affine(layer)
    if aff is not None:
        md = layer.metadata or {}
        if md.get("drdm_time_first") or layer.ndim > 3:
            aff = None                           # the affine does not describe the stack axes
        elif inp.lead_index:
            aff = aff.copy()
            for a, i in enumerate(inp.lead_index):
                aff[:3, 3] += aff[:3, a] * i
    return scale, tuple(translate), aff


def check_export_layers(image_layer, labels_layer) -> None:
    """What a dataset export refuses in the chosen layers: InputError with a one-line reason.

    The export reads whole 2D or 3D single-channel images (no slice or time frame picked on
    screen), so the checks are simpler than :func:`read_inputs`; the engine checks the values.

    Args:
        image_layer: the chosen image layer, or None.
        labels_layer: the chosen labels layer, or None.
    """
    if image_layer is None:
        raise InputError("add or pick an image layer")
    name, shape = image_layer.name, tuple(image_layer.data.shape)
    if getattr(image_layer, "rgb", False) or getattr(image_layer, "multiscale", False):
        raise InputError(f"layer {name!r} is RGB or multiscale; pick a single-channel image")
    if len(shape) not in (2, 3):
        raise InputError(f"layer {name!r} is {len(shape)}D; pick a 2D or 3D image")
    if labels_layer is not None and tuple(labels_layer.data.shape) != shape:
        raise InputError(f"labels {labels_layer.name!r} shape {tuple(labels_layer.data.shape)} differs from image "
                         f"{shape}")


def _cached(cache: Dict[tuple, Optional[str]], key: tuple, check) -> None:
    """Run ``check`` (raises InputError) once per key; re-raise its reason from the cache."""
    if key not in cache:
        try:
            check()
            cache[key] = None
        except (ValueError, TypeError) as e:
            cache[key] = str(e)
    if len(cache) > 64:
        cache.clear()
    elif cache.get(key):
        raise InputError(cache[key])


def read_inputs(img_layer, lab_layer, model_ndim: int, world_point: Sequence[float],
                slice_of_volume: bool = False, cache: Optional[Dict[tuple, Optional[str]]] = None) -> Inputs:
    """The arrays a run would use; InputError (a ValueError) with a one-line reason when they are unusable.

    Args:
        img_layer: the napari image layer to deform.
        lab_layer: an optional labels (or integer-valued image) layer, or None.
        model_ndim: the chosen model's dimensionality (2 or 3).
        world_point: the viewer's current point (``viewer.dims.point``); picks the slice or time
            frame when the image has more axes than the model.
        slice_of_volume: allow a 2D model on the slice on screen of a 3D volume (the user asked).
        cache: memo of the full-array checks (NaN scans), keyed by layer and slice.
    """
    cache = {} if cache is None else cache
    name = img_layer.name
    if getattr(img_layer, "rgb", False):
        raise InputError(f"Image '{name}' is RGB/RGBA: DRDM needs a single-channel grey-level image.")
    if getattr(img_layer, "multiscale", False):
        raise InputError(f"Image '{name}' is multiscale: not supported, open a single-resolution image.")
    data = img_layer.data
    nd = int(model_ndim)
    n_time = stack_axes(img_layer)
    sp_nd = data.ndim - n_time
    if sp_nd < nd:
        raise InputError(f"Image '{name}' is {sp_nd}D but the model is {nd}D: choose a {sp_nd}D model.")
    if sp_nd > nd and not (slice_of_volume and sp_nd == nd + 1 and nd == 2):
        hint = " or tick 'slice on screen' to deform one slice" if sp_nd == 3 and nd == 2 else ""
        raise InputError(f"Image '{name}' is {sp_nd}D but the model is {nd}D: choose a {sp_nd}D model{hint}.")
    if data.ndim > nd + 2:
        raise InputError(f"Image '{name}' has {data.ndim} axes: at most {nd + 2} for this {nd}D model.")
    lead = data.ndim - nd
    idx: Tuple[int, ...] = ()
    if lead:
        pos = img_layer.world_to_data(world_point)
        idx = tuple(int(np.clip(np.round(pos[a]), 0, data.shape[a] - 1)) for a in range(lead))
    image = np.asarray(data[idx] if lead else data)
    where = " in this slice" if lead else ""
    _cached(cache, ("img", id(img_layer), id(data), idx),
            lambda: check_image(image, nd, f"Image '{name}'{where}"))
    spacing = tuple(float(s) for s in np.asarray(img_layer.scale)[lead:])
    if any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(f"Image '{name}' has an unusable scale {tuple(img_layer.scale)}.")
    labels = None
    if lab_layer is not None:
        lname = lab_layer.name
        if getattr(lab_layer, "multiscale", False):
            raise InputError(f"Labels '{lname}' are multiscale: not supported.")
        ldata = lab_layer.data
        if tuple(ldata.shape) == tuple(data.shape):
            labels = np.asarray(ldata[idx] if lead else ldata)
        elif tuple(ldata.shape) == tuple(image.shape):
            labels = np.asarray(ldata)
        else:
            raise InputError(f"Labels '{lname}' have shape {tuple(ldata.shape)} but the image '{name}' has "
                             f"{tuple(data.shape)}" + (f" (slice {tuple(image.shape)})" if lead else "")
                             + ": they must match.")
        if not np.issubdtype(labels.dtype, np.integer):
            lab = labels
            _cached(cache, ("lab", id(lab_layer), id(ldata), idx),
                    lambda: check_labels(lab, image.shape, f"Labels '{lname}'"))
            labels = labels.astype(np.uint8 if labels.dtype == bool else np.int32)
    shape_txt = "x".join(str(n) for n in image.shape)
    sp_txt = "x".join(f"{s:g}" for s in spacing)
    if n_time and lead:
        desc = f"{nd}D frame at time {idx[0]} of the {nd}D+t '{name}': {shape_txt}, spacing {sp_txt}"
    elif lead:
        where_txt = ", ".join(f"axis {a} = {i}" for a, i in enumerate(idx))
        desc = f"{nd}D slice ({where_txt}) of the {data.ndim}D '{name}': {shape_txt}, spacing {sp_txt}"
    else:
        desc = f"{nd}D '{name}': {shape_txt}, spacing {sp_txt}"
    if labels is not None:
        desc += f"; labels '{lab_layer.name}'"
    return Inputs(img_layer, lab_layer, image, labels, spacing, idx, desc)
