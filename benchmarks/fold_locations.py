"""Where a model's folds and largest displacements are: foreground or background, near the border or not.

For each image and seed: one generation at T' (the model's default loop, on its model grid, as
``drdm evaluate`` does), then

* folding (% of pixels/voxels with det <= 0) in the foreground and in the background (foreground:
  above min + 5 % of the range, as ``fg_out_of_view_pct``), and the foreground's share of the grid;
* the share of the folds that lie within ``--band`` pixels of the grid's border, beside the share
  of the grid that band covers (a fold pattern that ignores the border has the two equal);
* the share of the folds more than ``--band`` pixels away from any foreground;
* the maximum displacement (% of the side), its distance to the border and whether it is in the
  foreground; the maximum over the foreground alone; the 99th percentile.

    python benchmarks/fold_locations.py --weights cmr2d --images cache/eval/unseen2d_brain.npz --seeds 0,3
    python benchmarks/fold_locations.py --weights cache/variants/general3d_s400_raw.safetensors \\
        --images cache/kit/itk_kmeans_head/itk_kmeans_t1.nii.gz cache/kit/lung1/lung1_ct.nii.gz --seeds 0,1

``--images`` takes what ``drdm evaluate --images`` takes (files or folders; a 2D ``.npz`` stack
gives one image per slice, ``--max-images`` keeps the first N per file).  ``--json`` saves every row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402


def locate(phi: np.ndarray, image: np.ndarray, band: int) -> dict:
    """The location figures of one recovered field ``phi`` (d, *S) in pixels on ``image``'s grid."""
    from scipy import ndimage

    from napari_drdm.core.metrics import jacobian_determinant
    S = image.shape[0]
    fg = image > image.min() + 0.05 * (image.max() - image.min())
    fold = jacobian_determinant(phi) <= 0
    idx = np.indices(image.shape)
    to_border = np.minimum(idx, np.array(image.shape).reshape(-1, *[1] * image.ndim) - 1 - idx).min(0)
    from_fg = ndimage.distance_transform_edt(~fg) if fg.any() else np.full(image.shape, np.inf)
    mag = np.sqrt((phi.astype(np.float64) ** 2).sum(0)) / S * 100.0
    arg = int(mag.argmax())
    near = to_border < band
    n_fold = int(fold.sum())
    return {
        "folding_pct": 100.0 * float(fold.mean()),
        "folding_fg_pct": 100.0 * float(fold[fg].mean()) if fg.any() else float("nan"),
        "folding_bg_pct": 100.0 * float(fold[~fg].mean()) if (~fg).any() else float("nan"),
        "fg_share_pct": 100.0 * float(fg.mean()),
        "folds_in_band_pct": 100.0 * float(near[fold].mean()) if n_fold else float("nan"),
        "band_share_pct": 100.0 * float(near.mean()),
        "folds_away_from_fg_pct": 100.0 * float((from_fg[fold] > band).mean()) if n_fold else float("nan"),
        "max_disp_pct": float(mag.max()),
        "max_disp_to_border": int(to_border.flat[arg]),
        "max_disp_in_fg": bool(fg.flat[arg]),
        "max_disp_fg_pct": float(mag[fg].max()) if fg.any() else float("nan"),
        "disp_p99_pct": float(np.percentile(mag, 99)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", required=True, help="bundled model name or weights file")
    ap.add_argument("--images", nargs="+", required=True, help="images (as drdm evaluate --images)")
    ap.add_argument("--max-images", type=int, default=2, help="first N images of each file")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of the forward draw")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--band", type=int, default=8, help="border band and foreground distance, in pixels")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every row here")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    torch.set_num_threads(a.threads)
    from napari_drdm.commands.evaluate import collect_images
    from napari_drdm.model import load_model
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers, got {a.seeds!r}") from None
    model = load_model(a.weights, device="cpu")
    rows = []
    for path in a.images:
        if not Path(path).exists():
            raise SystemExit(f"--images: {path} not found")
        for n, (_, arr, spacing) in enumerate(collect_images([path], model.ndim)[:a.max_images]):
            x = model.prepare(arr, spacing)[1]
            for s in seeds:
                t0 = time.perf_counter()
                phi, _ = model.generate_model_grid(x, a.t_prime, [s])
                r = locate(phi[0].cpu().numpy(), x[0, 0].cpu().numpy(), a.band)
                r.update(image=f"{Path(path).name}[{n}]", seed=s, seconds=time.perf_counter() - t0)
                rows.append(r)
                print(f"{r['image']} seed {s}: folding {r['folding_pct']:.2f} % (foreground {r['folding_fg_pct']:.2f}, "
                      f"background {r['folding_bg_pct']:.2f}; foreground is {r['fg_share_pct']:.0f} % of the grid) | "
                      f"folds within {a.band} px of the border {r['folds_in_band_pct']:.0f} % (that band: "
                      f"{r['band_share_pct']:.0f} % of the grid), more than {a.band} px from any foreground "
                      f"{r['folds_away_from_fg_pct']:.0f} % | max displacement {r['max_disp_pct']:.1f} % at "
                      f"{r['max_disp_to_border']} px from the border ({'foreground' if r['max_disp_in_fg'] else 'background'}), "
                      f"in the foreground {r['max_disp_fg_pct']:.1f} %, 99th percentile {r['disp_p99_pct']:.1f} % "
                      f"({r['seconds']:.0f} s)", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"command": " ".join(["python"] + sys.argv), "weights": a.weights,
                                            "sha256": model.sha256, "t_prime": a.t_prime, "band": a.band,
                                            "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
