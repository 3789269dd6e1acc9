"""Read each source format into arrays with RAS affines, derive label maps, write NIfTI.

Converters take ``files`` (path inside the package -> local file) and return :class:`Item`s.
Everything written is reoriented to the closest canonical (RAS+) voxel order, so that the last
axis is always the (approximately) axial one, and gzipped without a timestamp, so that rebuilding
gives byte-identical outputs and the same sha256 in the manifest.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import nibabel as nib
import numpy as np
from scipy import ndimage

Files = Mapping[str, Path]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

TISSUE_CLASSES = {1: "brain, other (CSF, deep)", 2: "grey matter", 3: "white matter"}
LUNG_CLASSES = {1: "lung", 2: "nodule"}
KMEANS_CLASSES = {i: f"k-means class {i}" for i in range(1, 7)}


@dataclass
class Item:
    """One output volume: an image or a label map, with the package files it came from."""

    stem: str
    role: str  # "image" or "label"
    data: np.ndarray
    affine: np.ndarray
    inputs: tuple[str, ...]
    modality: str = "MR"
    label: str | None = None  # for an image: stem of its primary label map
    classes: dict[int, str] | None = None  # for a label map: value -> name
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # e.g. frame time


Converter = Callable[[Files], "list[Item]"]


# ---------------------------------------------------------------- writing


def to_canonical(item: Item) -> nib.Nifti1Image:
    """The item as a NIfTI-1 image in the closest canonical (RAS+) voxel order."""
    img = nib.Nifti1Image(np.asarray(item.data), item.affine)
    img.header.set_qform(item.affine, code=1)
    img.header.set_sform(item.affine, code=1)
    img = nib.as_closest_canonical(img)
    img.header.set_xyzt_units("mm", "sec")
    if "frame_time_s" in item.extra and img.ndim == 4:
        zooms = list(img.header.get_zooms())
        img.header.set_zooms(zooms[:3] + [item.extra["frame_time_s"]])
    return img


def gz_bytes(img: nib.Nifti1Image) -> bytes:
    """``.nii.gz`` bytes with gzip mtime 0, so equal images give equal files."""
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array in native byte order and its affine."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    return data.astype(data.dtype.newbyteorder("=")), img.affine


# ---------------------------------------------------------------- readers


def read_minc_raw(raw: Path, header: Path) -> tuple[np.ndarray, np.ndarray]:
    """BrainBrowser's raw MINC export: gzipped uint8 bytes plus a JSON header.

    ``order`` lists the dimensions slowest first (here x, z, y); world position is
    sum over dims of (start + i * step) * direction_cosines.
    """
    head = json.loads(gzip.decompress(header.read_bytes()))
    order = head["order"]
    shape = tuple(int(head[d]["space_length"]) for d in order)
    data = np.frombuffer(gzip.decompress(raw.read_bytes()), dtype=np.uint8)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{raw.name}: {data.size} bytes, header says {shape}")
    axes = [order.index(d) for d in ("xspace", "yspace", "zspace")]
    data = data.reshape(shape).transpose(axes)
    affine = np.eye(4)
    for k, dim in enumerate(("xspace", "yspace", "zspace")):
        cosines = np.asarray(head[dim].get("direction_cosines", np.eye(3)[k]), dtype=float)
        affine[:3, k] = cosines * float(head[dim]["step"])
        affine[:3, 3] += cosines * float(head[dim]["start"])
    return np.ascontiguousarray(data), affine


def read_metaimage_2d(mha: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 2D MetaImage header with a separate raw file (MET_UCHAR), as (x, y, 1)."""
    head = dict(
        (k.strip(), v.strip()) for k, v in
        (line.split("=", 1) for line in mha.read_text().splitlines() if "=" in line)
    )
    if head.get("ElementType") != "MET_UCHAR" or head.get("NDims") != "2":
        raise ValueError(f"{mha.name}: only 2D MET_UCHAR is handled")
    nx, ny = (int(v) for v in head["DimSize"].split())
    sx, sy = (float(v) for v in head.get("ElementSpacing", "1 1").split())
    raw = mha.parent / head["ElementDataFile"]
    data = np.fromfile(raw, dtype=np.uint8).reshape(ny, nx).T[:, :, None]
    return np.ascontiguousarray(data), np.diag([sx, sy, 1.0, 1.0])


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """NRRD in 'left-posterior-superior' space, returned with a RAS affine."""
    import nrrd

    data, head = nrrd.read(str(path))
    if head.get("space") not in ("left-posterior-superior", "LPS"):
        raise ValueError(f"{path.name}: unsupported space {head.get('space')}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(head["space directions"], dtype=float).T
    affine[:3, 3] = np.asarray(head["space origin"], dtype=float)
    return data, LPS_TO_RAS @ affine


def read_dicom(path: Path, fallback_spacing: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM slice or multi-frame cine as (columns, rows, 1[, frames]) with a RAS affine.

    Rescale slope/intercept are applied (CT -> HU, kept as int16). Without ImagePositionPatient
    the orientation is unknown: an axial identity is assumed. Pixel spacing falls back to
    ``fallback_spacing`` (e.g. field of view / columns).
    """
    import pydicom

    ds = pydicom.dcmread(str(path))
    pixels = ds.pixel_array
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    if slope != 1 or intercept != 0:
        pixels = np.round(pixels * slope + intercept).astype(np.int16)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    data = pixels.T if frames == 1 else pixels.transpose(2, 1, 0)
    data = data[:, :, None] if frames == 1 else data[:, :, None, :]
    spacing = ds.get("PixelSpacing") or [fallback_spacing] * 2
    row_mm, col_mm = float(spacing[0]), float(spacing[1])
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    ipp = [float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]
    normal = np.cross(iop[:3], iop[3:])
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(iop[:3]) * col_mm
    affine[:3, 1] = np.asarray(iop[3:]) * row_mm
    affine[:3, 2] = normal * float(ds.get("SliceThickness", 1) or 1)
    affine[:3, 3] = ipp
    return np.ascontiguousarray(data), LPS_TO_RAS @ affine


# ---------------------------------------------------------------- label rules


def mni_tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Tissue rule: 1 = brain (T1 > 0.2 max), 2 = GM (gm > wm and gm > 0.5), 3 = WM (likewise).

    ``gm`` and ``wm`` are probability maps in any scale (uint8 0..255 in nilearn).
    """
    gm = gm.astype(np.float32) / float(gm.max())
    wm = wm.astype(np.float32) / float(wm.max())
    labels = np.zeros(t1.shape, np.uint8)
    labels[t1 > 0.2 * float(t1.max())] = 1
    labels[(gm > wm) & (gm > 0.5)] = 2
    labels[(wm >= gm) & (wm > 0.5)] = 3
    return labels


def lung_mask(hu: np.ndarray, threshold: float = -400.0) -> np.ndarray:
    """Lung rule: HU < threshold, drop components touching the in-plane border (outside
    air), keep the 2 largest, fill holes per axial slice. Axes are (x, y, z)."""
    comp, count = ndimage.label(hu < threshold)
    border = np.unique(np.concatenate([
        comp[0].ravel(), comp[-1].ravel(), comp[:, 0].ravel(), comp[:, -1].ravel()
    ]))
    sizes = np.bincount(comp.ravel(), minlength=count + 1)
    sizes[0] = 0
    sizes[border] = 0
    keep = [i for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0]
    mask = np.isin(comp, keep)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask


def lung_labels(hu: np.ndarray, nodule: np.ndarray) -> np.ndarray:
    """1 = lung, 2 = nodule (the nodule label wins where they overlap)."""
    labels = lung_mask(hu).astype(np.uint8)
    labels[nodule > 0] = 2
    return labels
