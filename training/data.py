"""Training data: kit records -> one compact prepared file -> the arrays a run trains on.

``prepare(cfg)`` turns the data kit (NIfTI volumes, see ``training/kit.py``) into a single
``.npz`` holding uint8 images already preprocessed for the model grid (paper Algorithm 1's input;
the per-volume steps are in ``training/preprocess.py``):

* every volume is scaled robustly (0.5-99.5 percentiles -> [0, 1]), its background removed
  (threshold, largest connected component, holes filled slice-wise), cropped to the foreground
  bounding box, and resampled isotropically (physical spacing, anti-aliased) into a cube of side
  S covering the largest physical extent, centred, zero padded;
* 2D: every slice of that cube along the configured axes whose foreground covers at least
  ``min_foreground`` of the slice, min-max to [0, 1] per slice; if the training set would exceed
  ``max_mb`` (compressed file size) the training slices are subsampled with a constant stride (recorded in the
  metadata);
* 3D: the cube itself, min-max to [0, 1] per volume.

Splits follow the kit's subjects (``load_kit(kit_dir, split)``).  ``data: {kind: synthetic}``
builds smooth random blob images instead, so tests never download anything.  The metadata
records the kit's source sha256s; the prepared file's own sha256 goes to ``<file>.json``.
:func:`dataset` gives a run its prepared data (preparing synthetic data on first use).

The batches a run draws from these arrays come from :class:`~training.batches.SliceBank`.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from .batches import SliceBank  # noqa: F401  (re-exported: ``from training.data import SliceBank``)
from .preprocess import foreground_slices, minmax_u8, preprocess_volume

__all__ = ["ensure_core", "preprocess_volume", "synthetic_images", "prepare", "load_prepared",
           "prepared_info", "dataset", "SliceBank", "file_sha256"]

SPLITS = ("train", "val")


def ensure_core():
    """Make ``napari_drdm`` importable from a source checkout (``src/`` layout, not installed)."""
    try:
        import napari_drdm  # noqa: F401
    except ImportError:
        src = Path(__file__).resolve().parents[1] / "src"
        if (src / "napari_drdm").is_dir():
            sys.path.insert(0, str(src))


ensure_core()

from napari_drdm.checkpoint import file_sha256  # noqa: E402  (one implementation for the project)


# ----------------------------------------------------------------------------------------------
# synthetic data (tests / CI): smooth random blobs
# ----------------------------------------------------------------------------------------------
def synthetic_images(n: int, size: int, ndim: int, seed: int = 0) -> np.ndarray:
    """n smooth random 'anatomies' (uint8, (n, S^d)): an ellipsoidal body with Gaussian blobs."""
    rng = np.random.RandomState(seed)
    ax = np.linspace(-1, 1, size, dtype=np.float32)
    X = np.stack(np.meshgrid(*([ax] * ndim), indexing="ij"), 0)
    out = np.empty((n,) + (size,) * ndim, dtype=np.uint8)
    for k in range(n):
        radii = rng.uniform(0.55, 0.9, ndim)
        centre = rng.uniform(-0.08, 0.08, ndim)
        r2 = sum(((X[i] - centre[i]) / radii[i]) ** 2 for i in range(ndim))
        body = 1.0 / (1.0 + np.exp((r2 - 1.0) * 25.0))
        img = 0.35 * body
        for _ in range(rng.randint(3, 8)):
            c = centre + rng.uniform(-0.5, 0.5, ndim) * radii
            w = rng.uniform(0.06, 0.25)
            d2 = sum((X[i] - c[i]) ** 2 for i in range(ndim))
            img = img + rng.uniform(-0.3, 0.6) * np.exp(-d2 / (2 * w * w)) * body
        img = np.clip(img, 0, None) * (body > 0.05)
        out[k] = minmax_u8(img)
    return out


# ----------------------------------------------------------------------------------------------
# kit access
# ----------------------------------------------------------------------------------------------
def _field(rec: Any, *names, default=None):
    for name in names:
        if isinstance(rec, dict) and name in rec:
            return rec[name]
        if hasattr(rec, name):
            return getattr(rec, name)
    return default


def _load_kit(kit_dir: str, split: str):
    try:
        from . import kit as kit_mod
    except ImportError as e:
        raise RuntimeError(f"training/kit.py is not available ({e}); build the kit first or use "
                           f"`data: {{kind: synthetic}}`") from None
    return list(kit_mod.load_kit(kit_dir, split))


def _manifest_sources(kit_dir: str) -> Dict[str, Any]:
    """The kit manifest's sha256 and, for every train/val image, its own and its sources' sha256."""
    p = Path(kit_dir) / "manifest.json"
    if not p.exists():
        return {"manifest": None, "files": []}
    man = json.loads(p.read_text())
    files = []
    for r in man.get("files", []):
        if r.get("role", "image") != "image" or r.get("split") not in SPLITS:
            continue
        src = r.get("source") or {}
        files.append({"path": r.get("path"), "sha256": r.get("sha256"), "subject": r.get("subject"),
                      "split": r.get("split"), "package": src.get("package"), "version": src.get("version"),
                      "client": src.get("client"), "archive_sha256": src.get("archive_sha256"),
                      "inputs": r.get("inputs"), "never_ship": r.get("never_ship")})
    return {"manifest": str(p), "manifest_sha256": file_sha256(p), "kit_version": man.get("kit_version"),
            "splits": man.get("splits"), "files": files}


def _read_image(path: str):
    """(array with singleton axes dropped, spacing of the kept axes) from a NIfTI file."""
    import nibabel as nib
    img = nib.load(str(path))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    zooms = list(img.header.get_zooms()) + [1.0] * arr.ndim
    keep = [i for i, n in enumerate(arr.shape) if n != 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: image of shape {arr.shape} is neither 2D nor 3D")
    return arr, [float(zooms[i]) for i in keep]


# ----------------------------------------------------------------------------------------------
# prepare
# ----------------------------------------------------------------------------------------------
def _prepare_split(records, dcfg, ndim: int, size: int, log) -> Dict[str, Any]:
    ims, src, axs, idxs, sources = [], [], [], [], []
    for r in records:
        path = _field(r, "image_path", "image")
        arr, hdr_sp = _read_image(path)
        rec_sp = _field(r, "spacing")
        sp = [float(v) for v in rec_sp] if rec_sp is not None and len(rec_sp) == arr.ndim else hdr_sp
        entry = {"image": str(path), "subject": str(_field(r, "subject", default="")), "shape": list(arr.shape),
                 "spacing": [float(s) for s in sp]}
        if ndim == 3 and arr.ndim != 3:
            log(f"  skip {path}: {arr.ndim}D image for a 3D model")
            continue
        up = size * min(sp) / max(n * s for n, s in zip(arr.shape, sp))
        if up > float(dcfg.get("max_upsample") or float("inf")):
            log(f"  skip {path}: would be upsampled {up:.1f}x (> data.max_upsample)")
            continue
        cube, fg = preprocess_volume(arr, sp, size, dcfg["bg_threshold"])
        if cube is None:
            log(f"  skip {path}: no foreground")
            continue
        k = len(sources)
        sources.append(entry)
        if ndim == 3:
            ims.append(minmax_u8(cube))
            src.append(k)
            axs.append(-1)
            idxs.append(0)
            log(f"  {Path(path).name}: {arr.shape} @ {tuple(round(s, 3) for s in sp)} mm -> 1 volume")
            continue
        s_ims, s_ax, s_ix = foreground_slices(cube, fg, dcfg["axes"], dcfg["min_foreground"])
        ims += s_ims
        src += [k] * len(s_ims)
        axs += s_ax
        idxs += s_ix
        log(f"  {Path(path).name}: {arr.shape} @ {tuple(round(s, 3) for s in sp)} mm -> {len(s_ims)} slices")
    shape = (0,) + (size,) * ndim
    return {"images": np.stack(ims) if ims else np.zeros(shape, np.uint8), "source": np.asarray(src, np.int16),
            "axis": np.asarray(axs, np.int8), "index": np.asarray(idxs, np.int16), "sources": sources}


def prepare(cfg: Dict[str, Any], out: Optional[str] = None, log=print) -> str:
    """Build the prepared dataset file described by ``cfg['data']``; returns its path."""
    dcfg, mcfg = cfg["data"], cfg["model"]
    ndim, size = int(mcfg["ndim"]), int(mcfg["size"])
    out = Path(out or dcfg["prepared"])
    out.parent.mkdir(parents=True, exist_ok=True)
    meta: Dict[str, Any] = {"format": "napari-drdm-prepared/1", "ndim": ndim, "size": size, "kind": dcfg["kind"],
                            "data_config": dcfg}
    arrays: Dict[str, np.ndarray] = {}
    if dcfg["kind"] == "synthetic":
        n = int(dcfg.get("n_synthetic", 64))
        for i, split in enumerate(SPLITS):
            count = n if split == "train" else max(2, n // 8)
            arrays[f"{split}_images"] = synthetic_images(count, size, ndim, seed=int(dcfg.get("seed", 0)) * 7 + i)
        meta["sources"] = {"synthetic": {"seed": int(dcfg.get("seed", 0)), "n": n}}
    elif dcfg["kind"] == "kit":
        kit_dir = dcfg["kit_dir"]
        meta["kit"] = _manifest_sources(kit_dir)
        for split in SPLITS:
            recs = _load_kit(kit_dir, split)
            log(f"{split}: {len(recs)} kit records")
            res = _prepare_split(recs, dcfg, ndim, size, log)
            for key in ("images", "source", "axis", "index"):
                arrays[f"{split}_{key}"] = res[key]
            meta[f"{split}_sources"] = res["sources"]
    else:
        raise ValueError(f"data.kind must be 'kit' or 'synthetic', got {dcfg['kind']!r}")
    tmp = out.with_name(out.name + ".part.npz")
    _write(tmp, meta, arrays)
    limit = float(dcfg.get("max_mb", 40)) * 1e6
    n_tr = int(arrays["train_images"].shape[0])
    if tmp.stat().st_size > limit and n_tr > 1:
        # subsample the training images with a constant stride until the file fits; the
        # validation images and the metadata are kept whole, so measure what they take first
        full = tmp.stat().st_size
        _write(tmp, meta, {k: (v[:0] if k.startswith("train_") else v) for k, v in arrays.items()})
        fixed = tmp.stat().st_size
        if fixed >= limit:
            tmp.unlink()
            raise ValueError(f"data.max_mb={dcfg.get('max_mb', 40)}: the validation images alone take "
                             f"{fixed / 1e6:.1f} MB of the prepared file; expected a limit above that")
        per_image = max(full - fixed, 1) / n_tr
        stride = max(2, int(math.ceil(n_tr * per_image / (limit - fixed))))
        while True:
            sub = {k: (v[::stride] if k.startswith("train_") else v) for k, v in arrays.items()}
            meta["subsample"] = {"stride": stride, "before": n_tr, "after": int(sub["train_images"].shape[0]),
                                 "rule": "train images kept at indices 0, stride, 2*stride, ... of the kit order"}
            _write(tmp, meta, sub)
            if tmp.stat().st_size <= limit or stride >= n_tr:
                break
            stride = max(stride + 1, int(stride * tmp.stat().st_size / limit))
        log(f"subsampled train {n_tr} -> {meta['subsample']['after']} (stride {stride}) to stay under "
            f"{dcfg.get('max_mb', 40)} MB")
    os.replace(tmp, out)
    info = {"path": str(out), "sha256": file_sha256(out), "bytes": out.stat().st_size, "counts": meta["counts"],
            "kit_manifest_sha256": meta.get("kit", {}).get("manifest_sha256"), "subsample": meta.get("subsample")}
    Path(str(out) + ".json").write_text(json.dumps(info, indent=1, sort_keys=True))
    log(f"wrote {out} ({info['bytes'] / 1e6:.1f} MB, sha256 {info['sha256'][:16]}..., {meta['counts']})")
    return str(out)


def _write(path: Path, meta: Dict[str, Any], arrays: Dict[str, np.ndarray]):
    """A compressed .npz (np.load reads it) that is byte-for-byte reproducible: fixed member
    order and timestamps (numpy's savez stamps the current time, so its sha256 changes per write)."""
    import zipfile
    meta["counts"] = {s: int(arrays[f"{s}_images"].shape[0]) for s in SPLITS}
    members = dict(sorted(arrays.items()))
    members["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in members.items():
            zi = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(zi, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)


def images_sha256(data: Dict[str, Any]) -> str:
    """The sha256 of the training and validation images alone (shapes, dtypes and pixels, in split
    order): two prepared files whose metadata differ (another kit manifest, say) but whose images
    are the same have the same value."""
    import hashlib
    h = hashlib.sha256()
    for s in SPLITS:
        a = np.ascontiguousarray(data[s])
        h.update(f"{s}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def load_prepared(path: str) -> Dict[str, Any]:
    """{'train': uint8 array, 'val': uint8 array, 'meta': dict, 'sha256': str (the file's),
    'images_sha256': str (the images')} from a prepared file."""
    with np.load(path, allow_pickle=False) as z:
        out = {s: z[f"{s}_images"] for s in SPLITS}
        out["meta"] = json.loads(str(z["meta"].reshape(-1)[0]))
    out["sha256"] = file_sha256(path)
    out["images_sha256"] = images_sha256(out)
    return out


def prepared_info(data: Dict[str, Any]) -> Dict[str, Any]:
    """The provenance part of a prepared dataset (what a checkpoint should remember)."""
    m = data["meta"]
    return {"prepared_sha256": data["sha256"], "images_sha256": data.get("images_sha256"),
            "kind": m.get("kind"), "counts": m.get("counts"),
            "subsample": m.get("subsample"), "kit": m.get("kit"), "synthetic": m.get("sources"),
            "train_sources": m.get("train_sources"), "val_sources": m.get("val_sources")}


def dataset(cfg: Dict[str, Any], env=None) -> Dict[str, Any]:
    """The prepared data of a config (train / val uint8 arrays, sha256, metadata).

    Args:
        cfg: the run's configuration (``data`` and ``model`` sections are read).
        env: the process placement (:class:`training.distributed.Env`) when several processes
            share the data: only the main one prepares a missing synthetic file, the others wait.
    """
    d, m = cfg["data"], cfg["model"]
    if d.get("prepared"):
        p = Path(d["prepared"])
        if not p.exists():
            if d["kind"] != "synthetic":
                raise FileNotFoundError(f"prepared data {p} not found: run `python -m training prepare "
                                        f"--config <this config>` first")
            if env is None or env.main:
                prepare(cfg, log=lambda *_: None)
            if env is not None:
                env.barrier()
        return load_prepared(str(p))
    if d["kind"] != "synthetic":
        raise ValueError("data.prepared must name the prepared file for data.kind 'kit'")
    import hashlib
    n, seed = int(d.get("n_synthetic", 64)), int(d.get("seed", 0))
    tr = synthetic_images(n, int(m["size"]), int(m["ndim"]), seed=seed * 7)
    va = synthetic_images(max(2, n // 8), int(m["size"]), int(m["ndim"]), seed=seed * 7 + 1)
    sha = hashlib.sha256(tr.tobytes() + va.tobytes()).hexdigest()
    return {"train": tr, "val": va, "sha256": sha, "images_sha256": images_sha256({"train": tr, "val": va}),
            "meta": {"kind": "synthetic", "counts": {"train": n}, "sources": {"synthetic": {"seed": seed, "n": n}}}}
