"""Writing generation results: deformed image, labels and displacement field as NIfTI + JSON sidecar.

Displacement-field files (``*_ddf.nii.gz``): shape (*spatial, 1, d) (NIfTI's vector layout,
intent VECTOR), float32, component ``c`` = displacement along **array axis c in millimetres**
(pixels x spacing_c), pull-back convention: the deformed image at voxel x samples the input at
x + u(x).  Same affine as the input image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from .io import atomic_write, write_nifti

__all__ = ["ddf_to_nifti_array", "nifti_array_to_ddf", "write_ddf", "write_json", "write_result", "result_paths"]


def ddf_to_nifti_array(ddf_px: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """(d, *spatial) pixels -> (*spatial, 1, d) millimetres."""
    d = ddf_px.shape[0]
    sp = np.asarray(spacing[:d], dtype=np.float32).reshape((d,) + (1,) * d)
    mm = (ddf_px * sp).astype(np.float32)
    return np.moveaxis(mm, 0, -1)[..., None, :] if d == 3 else np.moveaxis(mm, 0, -1)[:, :, None, None, :]


def nifti_array_to_ddf(arr: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`ddf_to_nifti_array`: back to (d, *spatial) pixels."""
    d = arr.shape[-1]
    a = arr.reshape(arr.shape[:d] + (d,)) if d == 3 else arr.reshape(arr.shape[:2] + (d,))
    px = np.moveaxis(a, -1, 0) / np.asarray(spacing[:d], dtype=np.float32).reshape((d,) + (1,) * d)
    return px.astype(np.float32)


def write_ddf(path, ddf_px: np.ndarray, spacing, affine, header=None, overwrite=False, root=None) -> Path:
    return write_nifti(path, ddf_to_nifti_array(ddf_px, spacing), affine, header=header,
                       overwrite=overwrite, intent="vector", root=root)


def write_json(path, obj: Dict[str, Any], overwrite: bool = False, root=None) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)

    def _w(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
    return atomic_write(Path(path), _w, overwrite=overwrite, root=root)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def result_paths(out_dir, stem: str, labels: bool, write_forward: bool = False,
                 overwrite: bool = False) -> Dict[str, Path]:
    """The files :func:`write_result` writes; with ``overwrite=False`` refuse if any exists (checked
    before any computation by ``drdm generate``)."""
    from .paths import confine
    out = Path(out_dir)
    names = {"image": f"{stem}_image.nii.gz", "ddf": f"{stem}_ddf.nii.gz", "json": f"{stem}.json"}
    if labels:
        names["labels"] = f"{stem}_labels.nii.gz"
    if write_forward:
        names["forward_ddf"] = f"{stem}_forward_ddf.nii.gz"
    paths = {k: confine(out, n) for k, n in names.items()}
    if not overwrite:
        clash = [str(p) for p in paths.values() if p.exists()]
        if clash:
            raise FileExistsError(f"refusing to overwrite existing outputs: {', '.join(clash)} (use --overwrite)")
    return paths


def write_result(out_dir, stem: str, result, volume, labels_volume=None, overwrite: bool = False,
                 extra: Optional[Dict[str, Any]] = None, write_forward: bool = False) -> Dict[str, str]:
    """Write image/labels/ddf NIfTI + ``<stem>.json`` sidecar; returns the written paths.

    Every array is checked first (finite image and fields, dtypes NIfTI holds), so a refused
    result leaves no file behind."""
    from .output_checks import check_finite, writable_array
    out = Path(out_dir)
    paths = result_paths(out, stem, result.labels is not None, write_forward, overwrite)
    check_finite(result.image, f"{paths['image']} (deformed image)")
    check_finite(result.ddf, f"{paths['ddf']} (field)")
    writable_array(result.image, str(paths["image"]))
    if result.labels is not None:
        writable_array(result.labels, str(paths["labels"]))
    if write_forward:
        check_finite(result.forward_ddf, f"{paths['forward_ddf']} (forward field)")
    hdr = volume.header
    write_nifti(paths["image"], result.image, volume.affine, header=hdr, overwrite=overwrite, root=out)
    if "labels" in paths:
        lab_hdr = labels_volume.header if labels_volume is not None else None
        write_nifti(paths["labels"], result.labels, volume.affine, header=lab_hdr, overwrite=overwrite, root=out)
    write_ddf(paths["ddf"], result.ddf, volume.spacing, volume.affine, overwrite=overwrite, root=out)
    if write_forward:
        write_ddf(paths["forward_ddf"], result.forward_ddf, volume.spacing, volume.affine, overwrite=overwrite,
                  root=out)
    side = {"t_prime": result.t_prime, "seed": result.seed, "schedule": result.schedule,
            "loop_extra": result.loop_extra, "k": result.k,
            "compose_padding": result.compose_padding, "input_padding": result.input_padding,
            "background_margin": result.background_margin,
            "background_replaced_pct": round(float(result.background_replaced_pct), 3),
            "anatomy_fit": result.anatomy_fit, "view_zoom": round(float(result.view_zoom), 4),
            "keep_size": result.keep_size or False, "zoom_removed": round(float(result.zoom_removed), 4),
            "metrics": result.metrics, "forward_metrics": result.forward_metrics,
            "ddf_convention": "pull-back; component c = displacement along array axis c in mm; shape (*spatial, 1, d)",
            "outputs": {k: p.name for k, p in paths.items()}}
    side.update(extra or {})
    write_json(paths["json"], side, overwrite=overwrite, root=out)
    return {k: str(p) for k, p in paths.items()}
