#!/usr/bin/env python
"""Does DRDM augmentation help a segmentation model trained on a few labelled slices?

A reproducible, CPU-sized few-shot 2D segmentation experiment in the spirit of the paper's
Table 2: one small U-Net, the same for every augmentation arm, trained for a fixed number of
steps on K labelled slices, several seeds per cell, tested on slices that never touch a
training slice.

    python benchmarks/downstream_seg.py --data acdc,mni152 --k 2,5 --models cmr2d,general2d
    python benchmarks/downstream_seg.py --data my_slices.npz --split index:0-19/24-39 --k 2,5,10
    python benchmarks/downstream_seg.py --quick                  # a few minutes: smoke run

Data (``--data``, comma list): any ``.npz`` with ``images`` (N, H, W) and integer ``labels``
(N, H, W) (optional ``volumes`` (N,): which volume/subject each slice comes from; optional
``positions`` (N,): the slice's position in its volume, in any unit), or a built-in source:

* ``acdc``: the 10 ACDC slices of the shared reference data (one subject, one frame; labels 1 RV
  cavity, 2 myocardium, 3 LV cavity), found through ``$DRDM_REFERENCE_DIR`` or
  ``../shared/reference``; skipped with a message when absent.  Split: cross-slice.
* ``kmeans``: the data kit's ITK KmeansTest head (6 k-means tissue classes), coronal slices.
  Cross-slice.
* ``mni152``: the kit's MNI152 2009a T1 with its tissue labels (1 brain other/CSF, 2 grey matter,
  3 white matter), axial slices, every 4th millimetre.  Cross-slice.
* ``lung1``: the kit's chest CT (1 lung, 2 nodule), axial slices.  Cross-slice.
  The kit sources need ``python -m training kit --out cache/kit`` (``--kit DIR``); each is skipped
  with a message when its files are missing.  Every built-in source is a single subject, so its
  split is cross-slice; a cross-subject split needs an ``.npz`` with ``volumes`` and
  ``--split volume:...``.

Images are padded to a square (with their minimum) and scaled to [0, 1] per volume (0.5-99.5
percentiles); the U-Net sees them resized to ``--size`` (linear; labels by nearest neighbour).
DRDM deforms the square slices at their own resolution (as a user exports a dataset; the model
resamples to its grid) and the deformed pairs are then resized like the rest; the affine and
elastic fields are drawn at ``--size`` (displacements are compared in % of the side).

Split (``--split``; built-in sources have their own default, stated in the output):
``index:TRAIN/TEST`` (slice indices, e.g. ``1-5/7-9``), ``volume:TRAIN/TEST`` (values of
``volumes``: cross-subject) or ``blocks:N`` (the slices in position order cut into N blocks,
alternately train and test).  Test slices closer than ``--min-gap`` (in position units; default
twice the median slice step, i.e. never neighbours) to a training slice of the same volume are
dropped (``blocks``) or refused (``index``).  The K training slices are the middle slices of K
equal parts of the training slices in position order (the same for every seed and arm); seeds change the
network's initialisation, the batches and the augmentation draws.

Arms (``--arms``; the DRDM arms run once per model of ``--models``):

* ``none``: the K slices as they are.
* ``affine``: classic affine + intensity: rotation +-15 deg, isotropic scale 0.9-1.1, translation
  +-5 % of the side, then gamma 0.7-1.5, contrast 0.9-1.1, brightness +-0.1, Gaussian noise
  sd 0-0.03 (images in [0, 1]); drawn afresh for every sample.
* ``elastic``: MONAI ``Rand3DElastic``/``RandElasticd``-style random elastic deformation,
  re-implemented (MONAI is not a dependency): per pixel and axis uniform(-1, 1) noise, smoothed
  by a Gaussian of sigma drawn in ``--elastic-sigma`` (fraction of the side), multiplied by a
  magnitude drawn in [0.8, 1.2] x m.  m is calibrated on the training slices so that the median
  (over draws) of the maximum displacement equals the median maximum displacement of the first
  model's DRDM pool at the T' used; both are printed.  Drawn afresh for every sample.
* ``drdm-export``: DRDM through the dataset export (``drdm augment``, Algorithm 3,
  :func:`napari_drdm.export.run_export`): before training, ``--pool`` deformed (image, label)
  pairs per training slice are exported once per dataset and model (NIfTI files with a manifest,
  kept under ``--work``; a rerun resumes them) and training samples from this pool.
* ``drdm-otf``: DRDM through the on-the-fly transform
  (:class:`napari_drdm.transforms.DRDMTransform`), called inside the training loop.  Generation
  is the cost on a CPU (seconds per sample against milliseconds per step), so the transform fills
  a small pool (one draw per training slice before the first step) and is called again
  ``--otf-draws`` times during the run, evenly spaced, each time on the next training slice in
  turn (a slice keeps its two newest pairs); the generation time counts as training time.
* ``drdm-export+affine``: a pool pair from ``drdm-export``, then affine + intensity as above.

Every augmented arm augments a sample with probability ``--p-aug`` (otherwise the slice as it
is).  DRDM: ``--t-prime`` (default 45), the model's default loop unless ``--schedule``.

Training: a 2D U-Net (``--width`` channels at the first of 4 levels, GroupNorm, ReLU),
cross-entropy + soft Dice, Adam with a cosine-decayed learning rate, ``--steps`` steps of
``--batch`` samples.  Test: per slice and pooled over the test slices (true/false
positives summed), per foreground class: DSC, sensitivity, precision; the mean over classes.
Table: pooled metrics, mean +- SD over seeds.  Paired tests (Wilcoxon signed-rank and paired t)
between each DRDM arm and ``elastic`` over (seed, test slice) pairs of the slice's mean DSC
(classes absent from both truth and prediction are left out of a slice's mean; optimistic, as the
slices of one seed share a network), and over seeds (each seed's pooled mean DSC; the test to trust).

Outputs in ``--out``: ``downstream_seg.json`` (configuration, data, splits, augmentation
parameters, every run with per-slice results, summary, tests), ``downstream_seg.txt`` (the
table) and ``downstream_seg.png`` (mean DSC against K per arm, error bars = SD over seeds).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "src", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

DEFAULT_REFERENCE = Path(os.environ.get("DRDM_REFERENCE_DIR", str(ROOT.parent / "shared" / "reference")))
ALL_ARMS = ("none", "affine", "elastic", "drdm-export", "drdm-otf", "drdm-export+affine")
DRDM_ARMS = ("drdm-export", "drdm-otf", "drdm-export+affine")

# built-in sources: file(s), slicing axis, slice stride, default split, class names
KIT_SOURCES = {
    "kmeans": {"image": "itk_kmeans_head/itk_kmeans_t1.nii.gz", "labels": "itk_kmeans_head/itk_kmeans_seg.nii.gz",
               "axis": 1, "stride": 1, "split": "blocks:4", "min_fg": 0.05,
               "classes": {i: f"k-means class {i}" for i in range(1, 7)}},
    "mni152": {"image": "mni152_2009a/mni152_2009a_t1.nii.gz", "labels": "mni152_2009a/mni152_2009a_tissue.nii.gz",
               "axis": 2, "stride": 4, "split": "blocks:4", "min_fg": 0.05,
               "classes": {1: "brain other/CSF", 2: "grey matter", 3: "white matter"}},
    "lung1": {"image": "lung1/lung1_ct.nii.gz", "labels": "lung1/lung1_labels.nii.gz",
              "axis": 2, "stride": 1, "split": "blocks:4", "min_fg": 0.05, "classes": {1: "lung", 2: "nodule"}},
}
ACDC_CLASSES = {1: "RV cavity", 2: "myocardium", 3: "LV cavity"}


class BenchError(ValueError):
    """Unusable input or option: reported as one line."""


# ------------------------------------------------------------------------------------------ data
def _pad_square(img: np.ndarray, lab: np.ndarray):
    """Pad (N, H, W) to a square: image with its minimum, labels with 0."""
    n, h, w = img.shape
    s = max(h, w)
    pi = np.full((n, s, s), img.min(), dtype=np.float32)
    pl = np.zeros((n, s, s), dtype=np.int64)
    y0, x0 = (s - h) // 2, (s - w) // 2
    pi[:, y0:y0 + h, x0:x0 + w] = img
    pl[:, y0:y0 + h, x0:x0 + w] = lab
    return pi, pl


def resize_pair(img: np.ndarray, lab: np.ndarray, size: int):
    """Square (N, S0, S0) images (linear, antialiased when shrinking) and labels (nearest) to size x size."""
    import torch
    import torch.nn.functional as F
    s = img.shape[-1]
    if s == size:
        return img.astype(np.float32), lab.astype(np.int64)
    ti = F.interpolate(torch.as_tensor(img, dtype=torch.float32)[:, None], size=(size, size), mode="bilinear",
                       align_corners=False, antialias=s > size)
    tl = F.interpolate(torch.as_tensor(lab).float()[:, None], size=(size, size), mode="nearest")
    return ti[:, 0].numpy(), tl[:, 0].round().long().numpy()


def _normalise(img: np.ndarray, volumes: np.ndarray) -> np.ndarray:
    """Scale each volume to [0, 1] by its 0.5-99.5 percentiles (clipped)."""
    out = np.empty_like(img, dtype=np.float32)
    for v in np.unique(volumes):
        m = volumes == v
        lo, hi = np.percentile(img[m], [0.5, 99.5])
        out[m] = np.clip((img[m] - lo) / max(hi - lo, 1e-6), 0, 1)
    return out


def _check_arrays(images, labels, where: str):
    if images.ndim != 3 or labels.shape != images.shape:
        raise BenchError(f"{where}: expected images (N, H, W) and labels of the same shape, got images "
                         f"{tuple(images.shape)} and labels {tuple(labels.shape)}")
    if images.shape[0] < 3:
        raise BenchError(f"{where}: {images.shape[0]} slices; at least 3 are needed (training and test)")
    if not np.issubdtype(images.dtype, np.number) or not np.all(np.isfinite(images)):
        raise BenchError(f"{where}: images must be finite numbers")
    if labels.dtype.kind not in "iub":
        if labels.dtype.kind != "f" or not np.all(labels == np.round(labels)):
            raise BenchError(f"{where}: labels must be integers (a label map per slice), got {labels.dtype}")
    if len(np.unique(labels)) < 2:
        raise BenchError(f"{where}: the labels hold a single value; nothing to segment")


def load_npz(path: Path) -> dict:
    """An ``.npz`` with images (N, H, W), integer labels (N, H, W), optional volumes and positions."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("images", "labels") if k not in z.files]
    if missing:
        raise BenchError(f"{path}: missing {', '.join(missing)} (keys: {', '.join(z.files)}); "
                         f"expected images (N, H, W) and integer labels (N, H, W)")
    images, labels = np.asarray(z["images"]), np.asarray(z["labels"])
    _check_arrays(images, labels, str(path))
    n = images.shape[0]
    volumes = np.asarray(z["volumes"]) if "volumes" in z.files else np.zeros(n, dtype=np.int64)
    positions = np.asarray(z["positions"], dtype=np.float64) if "positions" in z.files else np.arange(n, dtype=np.float64)
    for k, a in (("volumes", volumes), ("positions", positions)):
        if a.shape != (n,):
            raise BenchError(f"{path}: {k} must have shape ({n},), got {a.shape}")
    return {"name": path.stem, "source": str(path), "images": images.astype(np.float32), "labels": labels.astype(np.int64),
            "volumes": volumes.astype(str), "positions": positions, "classes": {}, "default_split": "blocks:4",
            "kind": "cross-subject (volume split)" if len(np.unique(volumes)) > 1 else "cross-slice"}


def load_acdc(ref: Path) -> dict:
    p = ref / "acdc_slices256.npz"
    if not p.exists():
        raise FileNotFoundError(f"ACDC slices not found: {p} (set DRDM_REFERENCE_DIR)")
    d = load_npz(p)
    d.update(name="acdc", classes=dict(ACDC_CLASSES), default_split="index:1-5/7-9",
             kind="cross-slice (one subject: patient001 frame 01, 10 short-axis slices 10 mm apart; "
                  "train 1-5 basal-mid, test 7-9 mid-apical, slice 6 left out, slice 0 has no labels)")
    return d


def load_kit_source(name: str, kit: Path) -> dict:
    from napari_drdm.io import read_image, squeeze_trailing
    spec = KIT_SOURCES[name]
    ip, lp = kit / spec["image"], kit / spec["labels"]
    if not ip.exists() or not lp.exists():
        raise FileNotFoundError(f"kit files not found under {kit} (build the kit: python -m training kit --out {kit})")
    vi, vl = read_image(ip), read_image(lp)
    img = np.moveaxis(squeeze_trailing(np.asarray(vi.data, dtype=np.float32)), spec["axis"], 0)
    lab = np.moveaxis(squeeze_trailing(np.asarray(vl.data)).astype(np.int64), spec["axis"], 0)
    step_mm = float(vi.spacing[spec["axis"]])
    fg = (lab > 0).mean(axis=(1, 2))
    keep = np.nonzero(fg >= spec["min_fg"])[0]
    keep = keep[::spec["stride"]]
    return {"name": name, "source": str(ip), "images": img[keep], "labels": lab[keep],
            "volumes": np.zeros(len(keep), dtype=str), "positions": keep * step_mm, "classes": dict(spec["classes"]),
            "default_split": spec["split"],
            "kind": f"cross-slice (one subject; slices along array axis {spec['axis']}, every {spec['stride']} "
                    f"x {step_mm:g} mm, with >= {spec['min_fg']:.0%} labelled pixels)"}


def load_dataset(name: str, args) -> dict:
    """A built-in source by name or an .npz path, prepared: square, ``args.size``, [0, 1], classes 0..C-1."""
    if name == "acdc":
        d = load_acdc(Path(args.reference))
    elif name in KIT_SOURCES:
        d = load_kit_source(name, Path(args.kit))
    else:
        p = Path(name)
        if not p.exists():
            raise BenchError(f"--data: {name!r} is neither a built-in source ({', '.join(['acdc', *KIT_SOURCES])}) "
                             f"nor an existing .npz file")
        d = load_npz(p)
    values = np.unique(d["labels"])
    if values[0] != 0:
        values = np.concatenate([[0], values])
    lut = {int(v): i for i, v in enumerate(values)}
    lab = np.searchsorted(values, d["labels"])
    img, lab = _pad_square(d["images"], lab)
    img = _normalise(img, d["volumes"])
    d["native"], d["native_labels"] = img, lab          # what DRDM deforms (its own grid, then resized)
    d["images"], d["labels"] = resize_pair(img, lab, args.size)
    d["n_classes"] = len(values)
    d["label_values"] = lut
    d["class_names"] = {str(lut[v]): d["classes"].get(v, f"label {v}") for v in values[1:].tolist()}
    return d


def _parse_indices(spec: str, n: int, what: str) -> list:
    out = []
    for part in filter(None, spec.split(",")):
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise BenchError(f"--split: {what} {spec!r} is not a list of indices or ranges (e.g. 0-4,7)") from None
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise BenchError(f"--split: {what} indices {bad[:5]} are outside 0..{n - 1}")
    return sorted(set(out))


def _gaps(ds: dict, train, test) -> np.ndarray:
    """For each test slice, the distance to the nearest training slice of the same volume (inf: none)."""
    pos, vol = ds["positions"], ds["volumes"]
    out = np.full(len(test), np.inf)
    for j, t in enumerate(test):
        same = [i for i in train if vol[i] == vol[t]]
        if same:
            out[j] = np.min(np.abs(pos[same] - pos[t]))
    return out


def make_split(ds: dict, spec: str, min_gap) -> dict:
    """Train and test slice indices from ``spec`` (see the module docstring)."""
    n = len(ds["images"])
    kind, _, body = spec.partition(":")
    order = np.lexsort((ds["positions"], ds["volumes"]))
    steps = [abs(ds["positions"][b] - ds["positions"][a]) for a, b in zip(order[:-1], order[1:])
             if ds["volumes"][a] == ds["volumes"][b]]
    steps = [s for s in steps if s > 0]
    gap = float(min_gap) if min_gap is not None else 2.0 * (float(np.median(steps)) if steps else 1.0)
    if kind == "index":
        tr, _, te = body.partition("/")
        train, test = _parse_indices(tr, n, "training"), _parse_indices(te, n, "test")
        if not train or not test:
            raise BenchError(f"--split {spec!r}: expected index:TRAIN/TEST, e.g. index:1-5/7-9")
        if set(train) & set(test):
            raise BenchError(f"--split {spec!r}: slices {sorted(set(train) & set(test))} are in both sets")
        g = _gaps(ds, train, test)
        if np.any(g < gap):
            near = [t for t, x in zip(test, g) if x < gap]
            raise BenchError(f"--split {spec!r}: test slices {near} lie within {gap:g} (--min-gap) of a training "
                             f"slice; leave a gap")
        how = "index"
    elif kind == "volume":
        tr, _, te = body.partition("/")
        trv, tev = set(filter(None, tr.split(","))), set(filter(None, te.split(",")))
        known = set(ds["volumes"].tolist())
        if not trv or not tev or (trv | tev) - known or trv & tev:
            raise BenchError(f"--split {spec!r}: expected volume:A,B/C with disjoint values of the npz's volumes "
                             f"({', '.join(sorted(known))})")
        train = [i for i in range(n) if ds["volumes"][i] in trv]
        test = [i for i in range(n) if ds["volumes"][i] in tev]
        how = "volume"
    elif kind == "blocks":
        try:
            nb = int(body)
        except ValueError:
            nb = 0
        if nb < 2:
            raise BenchError(f"--split {spec!r}: expected blocks:N with N >= 2")
        blocks = np.array_split(order, nb)
        train = sorted(int(i) for b in blocks[0::2] for i in b)
        test = sorted(int(i) for b in blocks[1::2] for i in b)
        g = _gaps(ds, train, test)
        test = [t for t, x in zip(test, g) if x >= gap]
        how = "blocks"
    else:
        raise BenchError(f"--split {spec!r}: expected index:TRAIN/TEST, volume:TRAIN/TEST or blocks:N")
    fg = [i for i in train if (ds["labels"][i] > 0).any()]
    if not test or not fg:
        raise BenchError(f"--split {spec!r} leaves {len(fg)} labelled training and {len(test)} test slices")
    return {"spec": spec, "how": how, "train": fg, "test": test, "min_gap": gap,
            "nearest_train_distance": float(np.min(_gaps(ds, fg, test))),
            "kind": "cross-subject" if how == "volume" else ds["kind"]}


def pick_k(ds: dict, train: list, k: int) -> list:
    """K training slices spread evenly over the training slices in (volume, position) order: the
    middle slice of each of K equal parts."""
    if k > len(train):
        raise BenchError(f"K = {k} but the split has only {len(train)} labelled training slices")
    order = sorted(train, key=lambda i: (ds["volumes"][i], ds["positions"][i]))
    idx = np.unique(((np.arange(k) + 0.5) * len(order) / k).astype(int))
    return [order[i] for i in idx]


# ------------------------------------------------------------------------------- augmentation
def affine_field(n: int, size: int, rng, rot_deg=15.0, scale=(0.9, 1.1), shift=0.05):
    """Pixel displacement fields (n, 2, S, S) ('ij' order) of random rotations, scalings, shifts."""
    import torch

    from napari_drdm.core.spatial import index_grid
    x = index_grid((size, size)).reshape(2, -1).double()
    c = (size - 1) / 2.0
    out = []
    for _ in range(n):
        a = math.radians(rng.uniform(-rot_deg, rot_deg))
        s = rng.uniform(*scale)
        m = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64) * s
        t = torch.tensor(rng.uniform(-shift, shift, 2) * size, dtype=torch.float64)[:, None]
        src = m @ (x - c) + c + t
        out.append((src - x).reshape(2, size, size))
    return torch.stack(out).float()


def intensity(img, rng):
    """Gamma, contrast, brightness and Gaussian noise on (n, 1, S, S) images in [0, 1]."""
    import torch
    out = []
    for i in range(img.shape[0]):
        x = img[i].clamp(0, 1) ** rng.uniform(0.7, 1.5)
        x = x * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        x = x + torch.randn(x.shape, generator=g) * rng.uniform(0.0, 0.03)
        out.append(x)
    return torch.stack(out)


def gauss_kernel(sigma: float):
    """A normalised 1D Gaussian of ``sigma`` pixels, radius ceil(3 sigma) (at least 1), float32."""
    import torch
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def elastic_field(n: int, size: int, rng, sigma_range, magnitude_range):
    """``Rand3DElastic``-style fields (n, 2, S, S) in pixels: uniform(-1, 1) noise per pixel and axis,
    Gaussian-smoothed (sigma in pixels, drawn per field), times a magnitude drawn per field."""
    import torch
    import torch.nn.functional as F
    out = []
    for _ in range(n):
        sigma = rng.uniform(*sigma_range)
        mag = rng.uniform(*magnitude_range)
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        u = torch.rand((2, 1, size, size), generator=g) * 2 - 1
        k = gauss_kernel(sigma)
        r = (len(k) - 1) // 2
        u = F.conv2d(F.pad(u, (r, r, 0, 0), mode="reflect" if r < size else "replicate"), k.view(1, 1, 1, -1))
        u = F.conv2d(F.pad(u, (0, 0, r, r), mode="reflect" if r < size else "replicate"), k.view(1, 1, -1, 1))
        out.append(u[:, 0] * mag)
    return torch.stack(out)


def field_stats(fields, side: int) -> dict:
    """Median max / mean displacement (% of side) and folding % over fields (n, 2, S, S) in pixels."""
    from napari_drdm.core.metrics import field_metrics
    ms = [field_metrics(f.numpy() if hasattr(f, "numpy") else f, side=side) for f in fields]
    return {k: float(np.median([m[k] for m in ms])) for k in ("max_disp_pct", "mean_disp_pct", "folding_pct")}


def calibrate_elastic(size: int, target_max_pct: float, sigma_frac, seed: int, draws: int = 48) -> dict:
    """Magnitude m (pixels) so that the median max displacement of the fields equals ``target_max_pct``."""
    sig = (sigma_frac[0] * size, sigma_frac[1] * size)
    unit = elastic_field(draws, size, np.random.default_rng(seed), sig, (0.8, 1.2))
    base = field_stats(unit, size)["max_disp_pct"]
    m = target_max_pct / base
    check = field_stats(elastic_field(draws, size, np.random.default_rng(seed + 1), sig, (0.8 * m, 1.2 * m)), size)
    return {"sigma_px": list(sig), "sigma_frac": list(sigma_frac), "magnitude_px": m,
            "magnitude_range_px": [0.8 * m, 1.2 * m], "target_max_disp_pct": target_max_pct,
            "achieved": check, "draws": draws}


def warp_pair(img, lab, ddf):
    """Warp images (n, 1, S, S) linearly and labels (n, 1, S, S) by nearest neighbour with pixel fields."""
    from napari_drdm.core.spatial import warp, warp_labels
    return warp(img, ddf, "linear", "zeros"), warp_labels(lab, ddf, "nearest")


def export_pool(ds: dict, slices: list, model: str, args, log) -> dict:
    """DRDM pool through the dataset export: ``args.pool`` pairs per slice (resumed when present)."""
    from napari_drdm.export import ArrayInput, ExportOptions, load_manifest, run_export
    from napari_drdm.io import read_image, squeeze_trailing
    tag = Path(str(model)).stem
    out = Path(args.work) / f"{ds['name']}_{tag}_T{args.t_prime}_{args.schedule or 'default'}_P{args.pool}_S{args.size}"
    opts = ExportOptions(per_image=args.pool, t_prime=str(args.t_prime), seed=args.pool_seed, weights=model,
                         schedule=args.schedule, batch=args.drdm_batch, device="cpu",
                         resume=(out / "manifest.json").exists())
    ltype = np.uint8 if ds["n_classes"] < 256 else np.int16
    inputs = [ArrayInput(f"s{i:04d}", ds["native"][i], ds["native_labels"][i].astype(ltype)) for i in slices]
    t0 = time.perf_counter()
    try:
        summary = run_export(inputs, out, opts)
    except ValueError as e:
        raise BenchError(f"DRDM export into {out}: {str(e).splitlines()[0]} (delete the folder to regenerate)") from None
    dt = time.perf_counter() - t0
    if summary.get("skipped"):
        raise BenchError(f"DRDM export with {model!r} skipped inputs: {summary['skipped'][0]}")
    rows = load_manifest(out)["rows"]
    pool = {i: [] for i in slices}
    stats = []
    for r in rows:
        i = int(r["name"][1:])
        if i not in pool:
            continue
        img = squeeze_trailing(np.asarray(read_image(out / r["image"]).data, dtype=np.float32))
        lab = squeeze_trailing(np.asarray(read_image(out / r["labels"]).data)).astype(np.int64)
        img, lab = resize_pair(img[None], lab[None], args.size)
        pool[i].append((img[0], lab[0]))
        stats.append({k: r[k] for k in ("max_disp_pct", "mean_disp_pct", "folding_pct")})
    n = sum(len(v) for v in pool.values())
    med = {k: float(np.median([s[k] for s in stats])) for k in ("max_disp_pct", "mean_disp_pct", "folding_pct")}
    log(f"  DRDM pool [{ds['name']}, {tag}]: {n} exported pairs ({args.pool} per slice x {len(slices)} slices), "
        f"{'resumed' if opts.resume else 'generated'} in {dt:.1f} s; median max / mean displacement "
        f"{med['max_disp_pct']:.2f} / {med['mean_disp_pct']:.2f} % of the side, folding {med['folding_pct']:.2f} %")
    return {"pool": pool, "dir": str(out), "seconds": dt, "resumed": bool(opts.resume), "n": n,
            "median": med, "model": str(model), "written": summary.get("written")}


class OnTheFly:
    """A small pool of DRDM pairs refreshed inside the training loop by ``DRDMTransform``."""

    def __init__(self, model, ds: dict, slices: list, args, seed: int):
        from napari_drdm.transforms import DRDMTransform
        self.tf = DRDMTransform(model, image_keys=("image",), label_keys=("label",), t_prime=str(args.t_prime),
                                schedule=args.schedule, channel_dim=None, seed=seed, ddf_key="ddf")
        self.ds, self.slices, self.seconds, self.calls, self.size = ds, list(slices), 0.0, 0, args.size
        self.pool = {i: [] for i in self.slices}
        self.maxima = []
        self.next = 0

    def draw(self):
        i = self.slices[self.next % len(self.slices)]
        self.next += 1
        t0 = time.perf_counter()
        out = self.tf({"image": self.ds["native"][i], "label": self.ds["native_labels"][i]})
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        from napari_drdm.core.metrics import displacement_pct
        self.maxima.append(displacement_pct(out["ddf"])[0])
        img, lab = resize_pair(np.asarray(out["image"], np.float32)[None], np.asarray(out["label"])[None],
                               self.size)
        self.pool[i].append((img[0], lab[0]))
        if len(self.pool[i]) > 2:           # keep the two newest pairs of each slice
            self.pool[i].pop(0)


# ------------------------------------------------------------------------------------- network
def make_unet(n_classes: int, width: int):
    import torch.nn as nn

    def block(i, o):
        g = max(1, min(8, o // 4))
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(g, o), nn.ReLU(inplace=True),
                             nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(g, o), nn.ReLU(inplace=True))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            c = [width, 2 * width, 4 * width, 8 * width]
            self.down = nn.ModuleList([block(1, c[0]), block(c[0], c[1]), block(c[1], c[2]), block(c[2], c[3])])
            self.up = nn.ModuleList([nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2) for i in range(3)])
            self.dec = nn.ModuleList([block(2 * c[i], c[i]) for i in range(3)])
            self.head = nn.Conv2d(c[0], n_classes, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            import torch
            skips = []
            for i, d in enumerate(self.down):
                x = d(x if i == 0 else self.pool(x))
                skips.append(x)
            x = skips.pop()
            for i in (2, 1, 0):
                x = self.dec[i](torch.cat([self.up[i](x), skips[i]], 1))
            return self.head(x)

    return UNet()


def seg_loss(logits, target, n_classes: int):
    import torch
    import torch.nn.functional as F
    ce = F.cross_entropy(logits, target)
    p = logits.softmax(1)[:, 1:]
    oh = F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (p * oh).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + oh.sum((0, 2, 3)) + 1)
    return ce + (1 - dice.mean()) if n_classes > 1 else ce + torch.zeros(())


def make_batch(ds, slices, arm, pools, rng_batch, rng_aug, args, elastic):
    """One batch (images (B, 1, S, S), labels (B, S, S)) for ``arm``."""
    import torch
    idx = rng_batch.choice(slices, size=args.batch)
    aug = rng_aug.random(args.batch) < args.p_aug if arm != "none" else np.zeros(args.batch, bool)
    imgs, labs = [], []
    for i, a in zip(idx, aug):
        img, lab = ds["images"][i], ds["labels"][i]
        if a and arm.startswith("drdm"):
            choices = pools.get(int(i)) or []
            if choices:
                img, lab = choices[int(rng_aug.integers(len(choices)))]
        imgs.append(torch.as_tensor(img, dtype=torch.float32))
        labs.append(torch.as_tensor(lab, dtype=torch.int64))
    x, y = torch.stack(imgs)[:, None], torch.stack(labs)[:, None]
    sel = np.nonzero(aug)[0]
    if len(sel) and arm in ("affine", "elastic", "drdm-export+affine"):
        s = torch.as_tensor(sel)
        if arm == "elastic":
            ddf = elastic_field(len(sel), args.size, rng_aug, elastic["sigma_px"], elastic["magnitude_range_px"])
        else:
            ddf = affine_field(len(sel), args.size, rng_aug)
        xi, yi = warp_pair(x[s], y[s], ddf)
        if arm != "elastic":
            xi = intensity(xi, rng_aug)
        x[s], y[s] = xi, yi
    return x, y[:, 0]


def train_run(ds, slices, arm, pools, args, seed, elastic, otf=None):
    """Train one U-Net; returns (model, seconds, loss curve (every 10 steps))."""
    import torch
    torch.manual_seed(seed)
    net = make_unet(ds["n_classes"], args.width)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    rng_batch, rng_aug = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])
    losses = []
    t0 = time.perf_counter()
    if otf is not None:
        for _ in slices:
            otf.draw()
        every = max(1, args.steps // (args.otf_draws + 1))
        fresh = 0
        pools = otf.pool
    net.train()
    for step in range(args.steps):
        if otf is not None and step and step % every == 0 and fresh < args.otf_draws:
            otf.draw()
            fresh += 1
        x, y = make_batch(ds, slices, arm, pools, rng_batch, rng_aug, args, elastic)
        loss = seg_loss(net(x), y, ds["n_classes"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps - 1:
            losses.append(round(loss.item(), 4))
    return net, time.perf_counter() - t0, losses


def counts(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(C-1, 3) true positives, false positives, false negatives per foreground class."""
    out = np.zeros((n_classes - 1, 3), dtype=np.int64)
    for c in range(1, n_classes):
        p, t = pred == c, truth == c
        out[c - 1] = (np.sum(p & t), np.sum(p & ~t), np.sum(~p & t))
    return out


def scores(cnt: np.ndarray) -> dict:
    """DSC, sensitivity, precision per class from (C-1, 3) counts (NaN where undefined)."""
    tp, fp, fn = (cnt[:, i].astype(np.float64) for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        sens = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        prec = np.where(tp + fp > 0, tp / (tp + fp), np.where(tp + fn > 0, 0.0, np.nan))
    return {"dsc": dsc, "sensitivity": sens, "precision": prec}


def _nanmean(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    return float(np.nanmean(a)) if np.any(np.isfinite(a)) else float("nan")


def evaluate(net, ds, test: list) -> dict:
    import torch
    net.eval()
    with torch.inference_mode():
        x = torch.as_tensor(ds["images"][test])[:, None]
        pred = torch.cat([net(x[i:i + 8]).argmax(1) for i in range(0, len(test), 8)]).numpy()
    per, total = [], np.zeros((ds["n_classes"] - 1, 3), dtype=np.int64)
    for j, i in enumerate(test):
        c = counts(pred[j], ds["labels"][i], ds["n_classes"])
        total += c
        s = scores(c)
        per.append({"slice": int(i), "counts": c.tolist(), "dsc": [None if np.isnan(v) else round(float(v), 5) for v in s["dsc"]],
                    "mean_dsc": _nanmean(s["dsc"])})
    pooled = scores(total)
    return {"per_class": {k: [None if np.isnan(v) else float(v) for v in val] for k, val in pooled.items()},
            "mean": {k: _nanmean(val) for k, val in pooled.items()}, "per_slice": per}


# --------------------------------------------------------------------------------- reporting
def _ms(vals) -> tuple:
    v = np.asarray([x for x in vals if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: list) -> list:
    cells = {}
    for r in runs:
        cells.setdefault((r["dataset"], r["arm"], r["k"]), []).append(r)
    out = []
    for (dname, arm, k), rs in cells.items():
        ncls = len(rs[0]["metrics"]["per_class"]["dsc"])
        row = {"dataset": dname, "arm": arm, "k": k, "n_seeds": len(rs)}
        for m in ("dsc", "sensitivity", "precision"):
            row[m] = _ms([r["metrics"]["mean"][m] for r in rs])
            row[m + "_per_class"] = [_ms([r["metrics"]["per_class"][m][c] for r in rs]) for c in range(ncls)]
        row["train_s"] = _ms([r["train_s"] for r in rs])
        out.append(row)
    return out


def paired_tests(runs: list, baseline: str = "elastic") -> list:
    """Each DRDM arm against ``baseline``, two ways.

    * pairs = (seed, test slice) mean DSC: Wilcoxon signed-rank (zero differences dropped) and
      paired t.  The slices of one seed share one trained network, so these pairs are not
      independent and the p-values are optimistic.
    * pairs = seeds, each seed's pooled mean DSC (the table's figure): the replications are
      independent, so this is the test to trust (``seed_*`` keys; with 6 seeds the exact Wilcoxon
      p cannot go below 0.031, two-sided).
    """
    from scipy import stats
    cells = {}
    for r in runs:
        cells.setdefault((r["dataset"], r["arm"], r["k"]), {})[r["seed"]] = r
    out = []
    for (dname, arm, k), by_seed in sorted(cells.items()):
        base = cells.get((dname, baseline, k))
        if not arm.startswith("drdm") or not base:
            continue
        a, b = [], []
        for seed, r in by_seed.items():
            if seed not in base:
                continue
            ref = {p["slice"]: p["mean_dsc"] for p in base[seed]["metrics"]["per_slice"]}
            for p in r["metrics"]["per_slice"]:
                if np.isfinite(p["mean_dsc"]) and np.isfinite(ref.get(p["slice"], np.nan)):
                    a.append(p["mean_dsc"])
                    b.append(ref[p["slice"]])
        if len(a) < 2:
            continue
        d = np.asarray(a) - np.asarray(b)
        res = {"dataset": dname, "k": k, "arm": arm, "baseline": baseline, "n_pairs": len(d),
               "mean_difference": float(d.mean()), "sd_difference": float(d.std(ddof=1)),
               "wins": int(np.sum(d > 0)), "losses": int(np.sum(d < 0)), "wilcoxon_p": 1.0, "paired_t_p": 1.0}
        if np.any(d != 0):
            res["wilcoxon_p"] = float(stats.wilcoxon(a, b).pvalue)
            res["paired_t_p"] = float(stats.ttest_rel(a, b).pvalue)
        res.update(_seed_test(by_seed, base))
        out.append(res)
    return out


def _seed_test(by_seed: dict, base: dict) -> dict:
    """The per-seed comparison of :func:`paired_tests`: one difference of pooled mean DSC per seed
    both arms ran."""
    from scipy import stats
    d = np.asarray([by_seed[s]["metrics"]["mean"]["dsc"] - base[s]["metrics"]["mean"]["dsc"]
                    for s in sorted(by_seed) if s in base], dtype=np.float64)
    d = d[np.isfinite(d)]
    res = {"seeds": int(len(d)), "seed_mean_difference": float(d.mean()) if len(d) else float("nan"),
           "seed_wins": int(np.sum(d > 0)), "seed_losses": int(np.sum(d < 0)),
           "seed_wilcoxon_p": 1.0, "seed_t_p": 1.0}
    if len(d) >= 2 and np.any(d != 0):
        res["seed_wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
        # the same difference in every seed leaves no t statistic: reported as nan, not as 0
        res["seed_t_p"] = float(stats.ttest_1samp(d, 0.0).pvalue) if np.std(d) > 0 else float("nan")
    return res


def merge_results(results: list, baselines=("elastic",)) -> dict:
    """Finished runs' records as one: the same datasets and splits (else :class:`BenchError`), their
    runs together (a (dataset, arm, K, seed) cell in two records is refused), the summary recomputed
    and each DRDM arm tested against every arm named in ``baselines`` that the records hold."""
    first = results[0]["config"]
    for r in results[1:]:
        for key in ("steps", "batch", "size", "width", "lr", "pool", "t_prime", "p_aug"):
            if r["config"].get(key) != first.get(key):
                raise BenchError(f"the records trained with different {key}: {first.get(key)} and {r['config'].get(key)}")
    merged = {"config": dict(first, n_seeds=None),          # per cell in the summary
              "configs": [r["config"] for r in results], "datasets": {}, "runs": [], "skipped": {}}
    seen = set()
    for r in results:
        for name, info in r["datasets"].items():
            have = merged["datasets"].setdefault(name, info)
            if have["split"] != info["split"]:
                raise BenchError(f"{name}: the records were run on different splits")
        for run_ in r["runs"]:
            cell = (run_["dataset"], run_["arm"], run_["k"], run_["seed"])
            if cell in seen:
                raise BenchError(f"{cell[0]} {cell[1]} K={cell[2]} seed {cell[3]}: in more than one record")
            seen.add(cell)
            merged["runs"].append(run_)
    merged["summary"] = summarise(merged["runs"])
    arms = {r["arm"] for r in merged["runs"]}
    merged["paired_tests"] = [t for b in baselines if b in arms for t in paired_tests(merged["runs"], b)
                              if t["arm"] != b]
    return merged


def _f(ms, scale=100.0, digits=1) -> str:
    m, s = (np.nan if v is None else v for v in ms)
    return "—" if not np.isfinite(m) else f"{m * scale:.{digits}f}±{s * scale:.{digits}f}"


def format_table(result: dict) -> str:
    lines = []
    for dname, dinfo in result["datasets"].items():
        names = list(dinfo["class_names"].values())
        lines.append(f"\n{dname}: {dinfo['split']['kind']}; {len(dinfo['split']['test'])} test slices; "
                     f"DSC / sensitivity / precision in %, mean±SD over seeds (pooled over the test slices)")
        head = ["arm", "K"] + [f"DSC {n}" for n in names] + ["mean DSC", "sens", "prec", "train s"]
        rows = [head]
        for s in result["summary"]:
            if s["dataset"] != dname:
                continue
            rows.append([s["arm"], str(s["k"])] + [_f(c) for c in s["dsc_per_class"]]
                        + [_f(s["dsc"]), _f(s["sensitivity"]), _f(s["precision"]), _f(s["train_s"], 1.0, 1)])
        w = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines += ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows[:1]]
        lines.append("| " + " | ".join("-" * x for x in w) + " |")
        lines += ["| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |" for r in rows[1:]]
        tests = [t for t in result["paired_tests"] if t["dataset"] == dname]
        for t in tests:
            lines.append(f"  {t['arm']} - {t['baseline']}, K={t['k']}: mean DSC difference "
                         f"{100 * t['mean_difference']:+.1f} points over {t['n_pairs']} (seed, slice) pairs "
                         f"({t['wins']} better, {t['losses']} worse); Wilcoxon p = {t['wilcoxon_p']:.3g}, "
                         f"paired t p = {t['paired_t_p']:.3g}")
            if t.get("seeds", 0) >= 2:      # records written before the per-seed test lack it
                lines.append(f"    per seed: {100 * t['seed_mean_difference']:+.1f} points over {t['seeds']} seeds "
                             f"({t['seed_wins']} better, {t['seed_losses']} worse); Wilcoxon p = "
                             f"{t['seed_wilcoxon_p']:.3g}, paired t p = {t['seed_t_p']:.3g}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    for ax, dname in zip(axes[0], names):
        arms = sorted({s["arm"] for s in result["summary"] if s["dataset"] == dname},
                      key=lambda a: [x["arm"] for x in result["summary"]].index(a))
        for j, arm in enumerate(arms):
            ss = sorted((s for s in result["summary"] if s["dataset"] == dname and s["arm"] == arm), key=lambda s: s["k"])
            ks = np.array([s["k"] for s in ss], dtype=float) + 0.05 * (j - (len(arms) - 1) / 2)
            m = np.array([np.nan if s["dsc"][0] is None else 100 * s["dsc"][0] for s in ss])
            e = np.array([np.nan if s["dsc"][1] is None else 100 * s["dsc"][1] for s in ss])
            ax.errorbar(ks, m, yerr=e, marker="o", capsize=3, label=arm)
        ks = sorted({s["k"] for s in result["summary"] if s["dataset"] == dname})
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("K labelled training slices")
        ax.set_ylabel("mean DSC (%)")
        seeds = sorted({s["n_seeds"] for s in result["summary"] if s["dataset"] == dname})
        n_seeds = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        ax.set_title(f"{dname} ({result['config']['steps']} steps, {n_seeds} seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------- main
QUICK = {"k": "2", "seeds": "0,1,2", "steps": 40, "pool": 2, "otf_draws": 2, "width": 8, "size": 64,
         "data": "acdc", "batch": 4}
FULL = {"k": "2,5", "seeds": "0,1,2", "steps": 200, "pool": 6, "otf_draws": 4, "width": 8, "size": 128,
        "data": "acdc,mni152", "batch": 8}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="comma list: acdc, kmeans, mni152, lung1 or .npz paths (default acdc,mni152)")
    ap.add_argument("--split", action="append", default=[],
                    help="per dataset, in --data order (one value: all): index:TRAIN/TEST, volume:TRAIN/TEST, "
                         "blocks:N (default: the source's own)")
    ap.add_argument("--min-gap", type=float, help="smallest distance (position units) from a test slice to a "
                                                  "training slice (default: twice the median slice step)")
    ap.add_argument("--k", help="comma list of K (default 2,5)")
    ap.add_argument("--seeds", help="comma list of seeds (default 0,1,2)")
    ap.add_argument("--arms", default=",".join(ALL_ARMS), help=f"comma list of {', '.join(ALL_ARMS)}")
    ap.add_argument("--models", default="auto", help="DRDM weights for the DRDM arms, comma list of bundled names "
                                                     "or files (auto: the default 2D model)")
    ap.add_argument("--t-prime", default="45", help="T' of the DRDM arms (a number or a spec such as 40:52:2)")
    ap.add_argument("--schedule", choices=("paper", "reference"), help="DRDM loop (default: the model's)")
    ap.add_argument("--pool", type=int, help="exported DRDM pairs per training slice (default 6)")
    ap.add_argument("--otf-draws", type=int, help="on-the-fly DRDM draws during a run after the initial one per "
                                                  "slice (default 4)")
    ap.add_argument("--drdm-batch", type=int, default=4, help="DRDM generation batch of the export")
    ap.add_argument("--pool-seed", type=int, default=0, help="seed of the exported pool")
    ap.add_argument("--p-aug", type=float, default=0.8, help="probability that a training sample is augmented")
    ap.add_argument("--elastic-sigma", default="0.05,0.07", help="sigma range of the elastic arm, fraction of side")
    ap.add_argument("--size", type=int, help="training image side (default 128)")
    ap.add_argument("--steps", type=int, help="training steps per run (default 200)")
    ap.add_argument("--batch", type=int, help="training batch (default 8)")
    ap.add_argument("--width", type=int, help="U-Net channels at the first level (default 8)")
    ap.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (cosine-decayed to 0)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--reference", default=str(DEFAULT_REFERENCE), help="folder with acdc_slices256.npz")
    ap.add_argument("--kit", default=str(ROOT / "cache" / "kit"), help="the data kit folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "downstream_seg"))
    ap.add_argument("--work", help="where the exported DRDM pools go (default OUT/pools)")
    ap.add_argument("--replot", metavar="JSON", nargs="+",
                    help="only print the table of a finished run's JSON and plot it into --out (a .png path); "
                         "several JSONs (runs with the same splits, e.g. one model each) are merged, and the "
                         "merged record is written beside the plot (.json)")
    ap.add_argument("--baselines", default="elastic",
                    help="with --replot: comma list of arms each DRDM arm is tested against (default elastic)")
    ap.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    add_force_arg(ap)
    args = ap.parse_args(argv)
    if args.replot:
        plot_out = Path(args.out)
        check_outputs(ap, args.force, plot_out, plot_out.with_suffix(".json") if len(args.replot) > 1 else None)
    else:
        check_outputs(ap, args.force, *(Path(args.out) / f"downstream_seg.{ext}" for ext in ("json", "txt", "png")))
    base = QUICK if args.quick else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        args.k_list = sorted({int(x) for x in str(args.k).split(",") if x})
        args.seed_list = [int(x) for x in str(args.seeds).split(",") if x]
        args.sigma = tuple(float(x) for x in args.elastic_sigma.split(","))
    except ValueError:
        ap.error("--k, --seeds and --elastic-sigma take comma lists of numbers")
    args.arm_specs = []
    for tok in (a for a in args.arms.split(",") if a):
        base, _, rest = tok.partition("[")
        model = rest[:-1] if rest.endswith("]") else (None if not rest else "")
        if base not in ALL_ARMS or model == "" or (model and base not in DRDM_ARMS):
            ap.error(f"--arms: {tok!r} is not one of {', '.join(ALL_ARMS)} (a DRDM arm may name one model: "
                     f"drdm-otf[cmr2d])")
        args.arm_specs.append((base, model))
    args.arm_list = [b for b, _ in args.arm_specs]
    for name, v, lo in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--pool", args.pool, 1),
                        ("--width", args.width, 2), ("--size", args.size, 16), ("--threads", args.threads, 1),
                        ("--otf-draws", args.otf_draws, 0)):
        if v < lo:
            ap.error(f"{name}: expected an integer >= {lo}, got {v}")
    if args.size % 8:
        ap.error(f"--size: expected a multiple of 8 (the U-Net halves it three times), got {args.size}")
    if not args.k_list or min(args.k_list) < 1 or not args.seed_list:
        ap.error("--k and --seeds need at least one value (K >= 1)")
    if len(args.sigma) != 2 or not 0 < args.sigma[0] <= args.sigma[1]:
        ap.error(f"--elastic-sigma: expected LOW,HIGH fractions of the side, got {args.elastic_sigma!r}")
    if not 0 <= args.p_aug <= 1:
        ap.error(f"--p-aug: expected a probability in [0, 1], got {args.p_aug}")
    args.work = args.work or str(Path(args.out) / "pools")
    return args


def _resolve_models(args) -> list:
    from napari_drdm.weights import default_weights
    names = [m for m in args.models.split(",") if m]
    return [default_weights(2) if m == "auto" else m for m in names]


def run(args, log=print) -> dict:
    import torch

    import napari_drdm  # noqa: F401  (OpenMP wait policy before torch)
    from napari_drdm.export import parse_t_prime
    torch.set_num_threads(args.threads)
    try:
        parse_t_prime(args.t_prime, 1)
    except ValueError as e:
        raise BenchError(f"--t-prime: {e}") from None
    models = _resolve_models(args) if any(a in DRDM_ARMS for a in args.arm_list) else []
    if any(a in DRDM_ARMS for a in args.arm_list) and not models:
        raise BenchError("--models: the DRDM arms need at least one model (a bundled name or a weights file)")
    loaded = {}
    for m in models:
        from napari_drdm.model import load_model
        try:
            loaded[m] = load_model(m, device="cpu")
        except (LookupError, FileNotFoundError, ValueError, OSError) as e:
            raise BenchError(f"--models: cannot load {m!r}: {e}") from None
        if loaded[m].ndim != 2:
            raise BenchError(f"--models: {m!r} is a {loaded[m].ndim}D model; 2D weights are needed")
    names = [d for d in args.data.split(",") if d]
    splits = args.split if len(args.split) != 1 else args.split * len(names)
    if splits and len(splits) != len(names):
        raise BenchError(f"--split given {len(splits)} times for {len(names)} datasets; give one, or one per dataset")
    t_start = time.perf_counter()
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("k", "seeds", "elastic_sigma")},
              "datasets": {}, "augmentation": {}, "runs": [], "skipped": {}}
    result["config"].update(models=models, n_seeds=len(args.seed_list), torch=torch.__version__,
                            threads_used=torch.get_num_threads(), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                            load_average_start=list(os.getloadavg()))
    arms = []
    for a, only in args.arm_specs:
        if a not in DRDM_ARMS:
            arms.append((a, a, None))
            continue
        if only is not None and not any(only in (m, Path(m).stem) for m in models):
            raise BenchError(f"--arms: {a}[{only}] names a model that is not in --models ({', '.join(models)})")
        arms += [(f"{a}[{Path(m).stem}]", a, m) for m in models if only is None or only in (m, Path(m).stem)]
    log(f"arms: {', '.join(a for a, _, _ in arms)}; K {args.k_list}; seeds {args.seed_list}; {args.steps} steps of "
        f"batch {args.batch} at {args.size}^2; torch threads {torch.get_num_threads()}")
    for di, dname in enumerate(names):
        try:
            ds = load_dataset(dname, args)
        except FileNotFoundError as e:
            log(f"[{dname}] skipped: {e}")
            result["skipped"][dname] = str(e)
            continue
        split = make_split(ds, splits[di] if splits else ds["default_split"], args.min_gap)
        kslices = {k: pick_k(ds, split["train"], k) for k in args.k_list}
        used = sorted({i for v in kslices.values() for i in v})
        dname = ds["name"]
        log(f"[{dname}] {len(ds['images'])} slices, {ds['n_classes'] - 1} classes ({', '.join(ds['class_names'].values())}); "
            f"split {split['spec']}: {split['kind']}; train {split['train']}, test {split['test']} "
            f"(nearest test-train distance {split['nearest_train_distance']:g}, min gap {split['min_gap']:g})")
        for k, v in kslices.items():
            log(f"  K={k}: training slices {v}")
        result["datasets"][dname] = {"source": ds["source"], "n_slices": len(ds["images"]), "size": args.size,
                                     "class_names": ds["class_names"], "label_values": ds["label_values"],
                                     "split": split, "k_slices": {str(k): v for k, v in kslices.items()},
                                     "positions": ds["positions"].tolist(), "volumes": ds["volumes"].tolist()}
        aug = result["augmentation"].setdefault(dname, {})
        pools = {}
        for m in models:
            if any(a in ("drdm-export", "drdm-export+affine") and mm == m for _, a, mm in arms) \
                    or (m == models[0] and "elastic" in args.arm_list):
                pools[m] = export_pool(ds, used, m, args, log)
                aug[f"drdm_export[{Path(m).stem}]"] = {k: v for k, v in pools[m].items() if k != "pool"}
        elastic = None
        if "elastic" in args.arm_list:
            if pools:
                target, basis = pools[models[0]]["median"]["max_disp_pct"], f"DRDM pool of {Path(models[0]).stem}"
            else:
                target, basis = 10.0, "no DRDM model: 10 % of the side"
            elastic = calibrate_elastic(args.size, target, args.sigma, seed=12345)
            elastic["matched_to"] = basis
            aug["elastic"] = elastic
            log(f"  elastic (RandElasticd-style): sigma {elastic['sigma_px'][0]:.1f}-{elastic['sigma_px'][1]:.1f} px, "
                f"magnitude {elastic['magnitude_range_px'][0]:.1f}-{elastic['magnitude_range_px'][1]:.1f} px; median max "
                f"displacement {elastic['achieved']['max_disp_pct']:.2f} % of the side (target {target:.2f} %: {basis}, "
                f"same images, T'={args.t_prime}); mean {elastic['achieved']['mean_disp_pct']:.2f} %, folding "
                f"{elastic['achieved']['folding_pct']:.2f} %")
        for k in args.k_list:
            for label, arm, m in arms:
                for seed in args.seed_list:
                    otf = OnTheFly(loaded[m], ds, kslices[k], args, seed) if arm == "drdm-otf" else None
                    pool = pools[m]["pool"] if m is not None and arm != "drdm-otf" else {}
                    net, dt, losses = train_run(ds, kslices[k], arm, pool, args, seed, elastic, otf)
                    met = evaluate(net, ds, split["test"])
                    run_rec = {"dataset": dname, "arm": label, "base_arm": arm, "model": m and Path(m).stem, "k": k,
                               "seed": seed, "train_s": dt, "steps": args.steps, "loss_every_10": losses,
                               "metrics": met}
                    if otf is not None:
                        run_rec.update(otf_calls=otf.calls, otf_generation_s=otf.seconds,
                                       otf_max_disp_pct_median=float(np.median(otf.maxima)))
                    result["runs"].append(run_rec)
                    log(f"  {label:<28} K={k:<2} seed {seed}: mean DSC {100 * met['mean']['dsc']:5.1f} "
                        f"(classes {', '.join('—' if v is None else f'{100 * v:.0f}' for v in met['per_class']['dsc'])}) "
                        f"in {dt:.1f} s" + (f" ({otf.calls} DRDM draws, {otf.seconds:.1f} s)" if otf else ""))
    result["summary"] = summarise(result["runs"])
    result["paired_tests"] = paired_tests(result["runs"]) if "elastic" in args.arm_list else []
    result["config"]["total_s"] = time.perf_counter() - t_start
    result["config"]["load_average_end"] = list(os.getloadavg())
    return result


def _json_safe(o):
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    return o


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.replot:
            records = [json.loads(Path(p).read_text()) for p in args.replot]
            baselines = [b for b in args.baselines.split(",") if b]
            result = records[0] if len(records) == 1 and baselines == ["elastic"] else merge_results(records, baselines)
            print(format_table(result))
            plot(result, Path(args.out))
            written = [args.out]
            if len(records) > 1:
                merged = Path(args.out).with_suffix(".json")
                merged.write_text(json.dumps(_json_safe(dict(result, merged_from=list(args.replot))), indent=1))
                written.append(str(merged))
            print(f"wrote {', '.join(map(str, written))}")
            return 0
        result = run(args)
        if not result["runs"]:
            raise BenchError("no dataset could be used: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = format_table(result)
        print(table)
        print(f"\ntotal {result['config']['total_s'] / 60:.1f} min; DRDM pools are pre-generated per dataset and model "
              f"(drdm-export*) or refreshed in the loop (drdm-otf), see the module docstring")
        (out / "downstream_seg.json").write_text(json.dumps(_json_safe(result), indent=1))
        (out / "downstream_seg.txt").write_text(table + "\n")
        plot(result, out / "downstream_seg.png")
        print(f"wrote {out / 'downstream_seg.json'}, {out / 'downstream_seg.txt'}, {out / 'downstream_seg.png'}")
    except (BenchError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"downstream_seg: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
