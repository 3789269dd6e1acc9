"""Image input/output keeping geometry: NIfTI, NRRD, DICOM, PNG/JPEG/TIFF, .npy, .npz in; NIfTI out.

Arrays keep the file's own axis order (NIfTI: i, j, k); no reorientation is applied.  Every
reader returns a :class:`Volume` with the 4x4 affine and the per-axis spacing in mm.
Writers are atomic (temporary name, then rename) and never overwrite unless asked.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .errors import InputError

__all__ = ["Volume", "read_image", "read_stack", "write_nifti", "is_readable", "IMAGE_SUFFIXES", "atomic_write",
           "squeeze_trailing", "stem_of"]

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff",
                  ".npy", ".npz", ".mha", ".mhd")


@dataclass
class Volume:
    data: np.ndarray
    affine: np.ndarray
    spacing: tuple
    path: str = ""
    header: Any = None                      # nibabel header for NIfTI inputs
    meta: Dict[str, Any] = field(default_factory=dict)


def stem_of(path) -> str:
    """A file's name without its image suffix (``case01.nii.gz`` -> ``case01``; a folder: its name).

    Args:
        path: a file or DICOM-series folder.
    """
    name = Path(str(path).rstrip("/\\")).name
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def squeeze_trailing(a):
    """Drop trailing singleton axes beyond the second (a 2D NIfTI read as (x, y, 1), a vector of one)."""
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a[..., 0]
    return a


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_readable(path) -> bool:
    p = Path(path)
    return p.is_file() and _suffix(p) in IMAGE_SUFFIXES or (p.is_dir() and any(p.glob("*.dcm")))


def _affine_from_spacing(spacing: Sequence[float]) -> np.ndarray:
    aff = np.eye(4)
    for i, s in enumerate(list(spacing)[:3]):
        aff[i, i] = float(s)
    return aff


def _read_nifti(p: Path) -> Volume:
    import nibabel as nib
    img = nib.load(str(p))
    data = np.asanyarray(img.dataobj)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: data.ndim])
    return Volume(data, np.asarray(img.affine, dtype=np.float64), zooms, str(p), img.header)


def _read_nrrd(p: Path) -> Volume:
    import nrrd
    data, hdr = nrrd.read(str(p))
    nd = data.ndim
    dirs = hdr.get("space directions")
    aff = np.eye(4)
    spacing = [1.0] * nd
    if dirs is not None:
        dirs = [np.asarray(d, dtype=float) for d in dirs if d is not None and not np.any(np.isnan(np.asarray(d, float)))]
        for i, d in enumerate(dirs[:3]):
            aff[: len(d), i] = d
            spacing[i] = float(np.linalg.norm(d))
    elif hdr.get("spacings") is not None:       # no world space: per-axis spacings (NaN on non-spatial axes)
        for i, sp in enumerate(np.asarray(hdr["spacings"], dtype=float)[:nd]):
            if np.isfinite(sp) and sp > 0:
                spacing[i] = float(sp)
                if i < 3:
                    aff[i, i] = float(sp)
    origin = hdr.get("space origin")
    if origin is not None:
        aff[: len(origin), 3] = np.asarray(origin, dtype=float)
    if str(hdr.get("space", "")).lower().startswith(("left-posterior", "lps")):
        aff[:2] *= -1  # LPS -> RAS, as NIfTI expects
    return Volume(data, aff, tuple(spacing), str(p), meta={"nrrd_header": {k: str(v) for k, v in hdr.items()}})


def _dcmread_all(paths: List[Path]):
    """Read every file of a series, naming the first one that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    out = []
    for q in paths:
        try:
            out.append(pydicom.dcmread(str(q)))
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError) as e:
            raise InputError(f"{q}: not a readable DICOM file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                             f"; remove it from the series folder") from None
    return out


def _one_series(slices, paths: List[Path], series: Optional[str]):
    """The slices of one series: a folder holding several series needs ``series`` (a SeriesInstanceUID)."""
    groups: Dict[str, list] = {}
    for ds, q in zip(slices, paths):
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "") or ""), []).append((ds, q))
    if series is not None:
        if series not in groups:
            raise InputError(f"{paths[0].parent}: no DICOM series {series!r} (found {', '.join(sorted(groups))})")
        return groups[series]
    if len(groups) > 1:
        desc = "; ".join(f"{uid or '(no UID)'}: {len(v)} files, e.g. {v[0][1].name}" for uid, v in sorted(groups.items()))
        raise InputError(f"{paths[0].parent} holds {len(groups)} DICOM series ({desc}); put each series in its own "
                         f"folder, or read one with read_image(folder, series=UID)")
    return next(iter(groups.values()))


def _read_dicom_series(paths: List[Path], series: Optional[str] = None) -> Volume:
    slices = _dcmread_all(paths)
    if len(slices) > 1 or series is not None:
        pairs = _one_series(slices, paths, series)
        slices, paths = [d for d, _ in pairs], [q for _, q in pairs]
    if len(slices) == 1:
        ds = slices[0]
        arr = ds.pixel_array
        if getattr(ds, "SamplesPerPixel", 1) != 1:
            raise InputError(f"{paths[0]}: colour DICOM (SamplesPerPixel={ds.SamplesPerPixel}) is not supported")
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        ps = [float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])]
        slope, inter = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
        data = arr * slope + inter if (slope, inter) != (1.0, 0.0) else arr
        spacing = ([float(getattr(ds, "SliceThickness", 1.0) or 1.0)] if frames > 1 else []) + ps
        return Volume(np.asarray(data), _affine_from_spacing(spacing), tuple(spacing), str(paths[0]),
                      meta={"frames": frames})
    def pos(ds):
        ipp = getattr(ds, "ImagePositionPatient", None)
        return float(ipp[2]) if ipp is not None else float(getattr(ds, "InstanceNumber", 0))
    order = sorted(range(len(slices)), key=lambda i: pos(slices[i]))
    slices, paths = [slices[i] for i in order], [paths[i] for i in order]
    shapes = {}
    for ds, q in zip(slices, paths):
        shapes.setdefault(tuple(ds.pixel_array.shape), q)
    if len(shapes) > 1:
        raise InputError(f"{paths[0].parent}: the DICOM slices have different sizes ("
                         + ", ".join(f"{'x'.join(map(str, k))} e.g. {q.name}" for k, q in shapes.items())
                         + "); one series must have one slice size")
    data = np.stack([s.pixel_array * float(getattr(s, "RescaleSlope", 1) or 1)
                     + float(getattr(s, "RescaleIntercept", 0) or 0) for s in slices])
    ps = [float(v) for v in getattr(slices[0], "PixelSpacing", [1.0, 1.0])]
    dz = abs(pos(slices[1]) - pos(slices[0])) or float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    spacing = (dz, *ps)
    return Volume(data, _affine_from_spacing(spacing), spacing, str(paths[0].parent), meta={"n_slices": len(slices)})


def _grey(im, p: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA"):
        arr = np.asarray(im.convert("RGB"))
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise InputError(f"{p}: colour image (mode {mode}); DRDM needs a single-channel grey-level image")
        return arr[..., 0]
    return np.asarray(im)


def _read_picture(p: Path) -> Volume:
    """A grey-level picture; a multi-page one (a TIFF stack) is a volume of its pages (page, row, column)."""
    from PIL import Image
    with Image.open(str(p)) as im:
        pages = []
        for i in range(int(getattr(im, "n_frames", 1) or 1)):
            im.seek(i)
            pages.append(_grey(im, p))
    if len({(a.shape, a.dtype) for a in pages}) > 1:
        raise InputError(f"{p}: its {len(pages)} pages differ in size or type; a stack needs one page size")
    data = pages[0] if len(pages) == 1 else np.stack(pages)
    return Volume(data, np.eye(4), (1.0,) * data.ndim, str(p))


def read_image(path, key: str = "image", series: Optional[str] = None) -> Volume:
    """Read one image file (or a folder holding a DICOM series).

    A folder holding several DICOM series (different SeriesInstanceUID) is refused with the
    list of series unless ``series`` names the one to read; a file in it that is not DICOM, or
    slices of different sizes, are refused naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if p.is_dir():
        dcm = sorted(p.glob("*.dcm"))
        if not dcm:
            raise InputError(f"{p} is a folder without DICOM files; give an image file")
        try:
            return _read_dicom_series(dcm, series)
        except ValueError:
            raise
        except Exception as e:
            raise InputError(f"cannot read the DICOM series {p}: {type(e).__name__}: {e}") from None
    suf = _suffix(p)
    try:
        if suf in (".nii", ".nii.gz"):
            return _read_nifti(p)
        if suf in (".nrrd", ".nhdr"):
            return _read_nrrd(p)
        if suf == ".dcm":
            return _read_dicom_series([p])
        if suf in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            return _read_picture(p)
        if suf == ".npy":
            data = np.load(str(p), allow_pickle=False)
            return Volume(data, np.eye(4), (1.0,) * data.ndim, str(p))
        if suf == ".npz":
            with np.load(str(p), allow_pickle=False) as z:
                if key not in z.files:
                    raise InputError(f"{p} has no array {key!r} (found: {', '.join(z.files)})")
                data = z[key]
                spacing = tuple(float(s) for s in z["spacing"]) if "spacing" in z.files else (1.0,) * data.ndim
                aff = np.asarray(z["affine"], float) if "affine" in z.files else _affine_from_spacing(spacing)
            return Volume(data, aff, spacing, str(p))
        if suf in (".mha", ".mhd"):
            try:
                import SimpleITK as sitk  # optional
            except ImportError:
                raise InputError(f"{p}: MetaImage needs the optional SimpleITK package") from None
            im = sitk.ReadImage(str(p))
            data = sitk.GetArrayFromImage(im)
            spacing = tuple(float(s) for s in reversed(im.GetSpacing()))
            return Volume(data, _affine_from_spacing(spacing), spacing, str(p))
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:
        raise InputError(f"cannot read {p}: {type(e).__name__}: {e}") from None
    raise InputError(f"{p}: unsupported file type {suf!r}; supported: {', '.join(IMAGE_SUFFIXES)}")


def read_stack(path) -> List[Volume]:
    """Read a file that may hold several images: an .npz with ``images`` (N, *spatial) and optional
    ``labels``; otherwise one image.  Each Volume's ``meta['labels']`` holds its label array if any."""
    p = Path(path)
    if _suffix(p) == ".npz":
        with np.load(str(p), allow_pickle=False) as z:
            if "images" in z.files:
                ims = z["images"]
                labs = z["labels"] if "labels" in z.files else None
                if labs is not None and labs.shape != ims.shape:
                    raise InputError(f"{p}: labels shape {labs.shape} differs from images shape {ims.shape}")
                spacing = tuple(float(s) for s in z["spacing"]) if "spacing" in z.files else (1.0,) * (ims.ndim - 1)
                return [Volume(ims[i], _affine_from_spacing(spacing), spacing, f"{p}[{i}]",
                               meta={"labels": labs[i] if labs is not None else None}) for i in range(len(ims))]
            if "image" in z.files:
                v = read_image(p, "image")
                v.meta["labels"] = z["labels"] if "labels" in z.files else None
                return [v]
    return [read_image(p)]


def atomic_write(path: Path, write_fn, overwrite: bool = False, root=None) -> Path:
    """Call ``write_fn(tmp_path)`` then rename to ``path``; clean up and explain a full disk.

    Every file this package writes goes through here.  With ``root`` the target is first
    resolved by :func:`napari_drdm.paths.confine`: absolute paths elsewhere, ``..`` and symlinks
    leading outside ``root`` are refused before anything is written.
    """
    if root is not None:
        from .paths import confine
        path = confine(root, path)
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; refusing to overwrite it (use --overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    tmp = path.with_name(f".{name}.part-{os.getpid()}" + (".nii.gz" if name.endswith(".nii.gz") else path.suffix))
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if tmp.exists():
            tmp.unlink()
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"disk full while writing {path}; nothing partial was left behind") from None
        raise
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def write_nifti(path, data: np.ndarray, affine: Optional[np.ndarray] = None, header=None,
                overwrite: bool = False, intent: Optional[str] = None, root=None) -> Path:
    """Write a NIfTI file atomically with the given affine (and a copy of the source header).

    The data type is made one NIfTI holds (:func:`napari_drdm.output_checks.writable_array`: float16
    becomes float32, 64-bit integers are narrowed when their values fit); ``root`` confines the
    target (see :func:`atomic_write`)."""
    import nibabel as nib

    from .output_checks import writable_array
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    arr = writable_array(data, str(path))
    hdr = None
    if header is not None and isinstance(header, nib.Nifti1Header):
        hdr = header.copy()
        hdr.set_data_dtype(arr.dtype)
        hdr.set_data_shape(arr.shape)
        hdr.set_slope_inter(None, None)
    img = nib.Nifti1Image(arr, aff, header=hdr, dtype=arr.dtype if arr.dtype.itemsize == 8 and arr.dtype.kind in "iu" else None)
    img.set_sform(aff, code=int(header["sform_code"]) if hdr is not None and int(header["sform_code"]) > 0 else 1)
    img.set_qform(aff, code=int(header["qform_code"]) if hdr is not None and int(header["qform_code"]) > 0 else 1)
    if intent:
        img.header.set_intent(intent)
    return atomic_write(Path(path), lambda tmp: nib.save(img, str(tmp)), overwrite=overwrite, root=root)
