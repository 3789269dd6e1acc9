#!/usr/bin/env python
"""DRDM against the random elastic deformations a user would otherwise pick, on the same images.

    python benchmarks/peers.py                      # 2D brain (S=128) and 3D brain (S=64)
    python benchmarks/peers.py --json peers.json --samples 8 --samples-3d 2

Peers (public libraries, called through their public transforms):

* MONAI ``Rand2DElastic`` (control grid with uniform random offsets, bicubic upsampling) and
  ``Rand3DElastic`` (per-voxel uniform random offsets smoothed by a Gaussian), affine parts off;
* TorchIO ``RandomElasticDeformation`` (cubic B-spline on a coarse control grid, SimpleITK).

Each peer runs with the settings of its documentation (``example``: MONAI's tutorial values
scaled to the image size, TorchIO's defaults) and with its magnitude scaled so that its median
maximum displacement equals DRDM's on the same image (``matched``).  For every method and
image: time per sample (the transform applied to the image, as a user calls it; DRDM: a whole
generation at T' = 45, batch 1, the model's default loop), maximum and mean displacement in %
of the image side and folding % (det(I + grad u) <= 0, central differences), the paper's
Table 1 protocol (napari_drdm.core.metrics.field_metrics).

Displacement fields of the peers: MONAI's sampling grid is read where the transform hands it to
its resampler; TorchIO's B-spline is rebuilt from the control points it records in the subject's
history and evaluated densely with SimpleITK.  Both are checked by re-warping the image with the
recovered field (``field_check_max_abs``: largest difference to the peer's own output, inside).

Images: the bundled sample data (MNI152 brain, 2D slice and 3D volume) resampled to the bundled
models' grids; the model weights are the bundled early checkpoints (see the README: their
Table 1 figures are not the paper's).  When the shared reference data is found (``--reference DIR``), the
published 2D cardiac checkpoint on ten ACDC slices (256^2) is added: trained weights, paper-like
figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from napari_drdm.core import environment  # noqa: E402
from napari_drdm.core.metrics import field_metrics  # noqa: E402
from napari_drdm.core.spatial import warp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

T_PRIME = 45
METRICS = ("max_disp_pct", "mean_disp_pct", "folding_pct")


# ---------------------------------------------------------------------------- peers
class MonaiElastic:
    name = "MONAI Rand2DElastic / Rand3DElastic"

    def __init__(self, nd, S, scale=1.0):
        from monai.transforms import Rand2DElastic, Rand3DElastic
        self.nd = nd
        if nd == 2:
            # MONAI's 2D transforms tutorial: spacing (30, 30), magnitude (5, 6) on a ~256 image
            f = S / 256
            self.params = {"spacing": (30 * f, 30 * f), "magnitude_range": (5 * f * scale, 6 * f * scale)}
            self.t = Rand2DElastic(prob=1.0, spacing=self.params["spacing"],
                                   magnitude_range=self.params["magnitude_range"], padding_mode="zeros")
        else:
            # MONAI's 3D transforms tutorial: sigma (5, 8), magnitude (100, 200)
            self.params = {"sigma_range": (5, 8), "magnitude_range": (100 * scale, 200 * scale)}
            self.t = Rand3DElastic(prob=1.0, sigma_range=(5, 8), magnitude_range=self.params["magnitude_range"],
                                   padding_mode="zeros")
        self._grid = None
        inner = self.t.resampler

        def capture(img, grid=None, *a, **kw):        # read the grid the transform resamples with
            self._grid = grid
            return inner(img, grid, *a, **kw)
        self.t.resampler = capture

    def seed(self, s):
        self.t.set_random_state(seed=s)

    def __call__(self, img):           # img: (1, S...) float tensor -> deformed (1, S...)
        return self.t(img)

    def field(self, img):
        """Pixel displacement (d, S...) in array-axis order of the last call."""
        from monai.transforms.utils import create_grid
        g = torch.as_tensor(self._grid)[: self.nd].float()
        ident = torch.as_tensor(create_grid(spatial_size=img.shape[1:], backend="torch"))[: self.nd].float()
        return (g - ident).cpu()


class TorchioElastic:
    name = "TorchIO RandomElasticDeformation"

    def __init__(self, nd, S, scale=1.0):
        import torchio as tio
        self.nd, self.tio = nd, tio
        self.params = {"num_control_points": 7, "max_displacement": 7.5 * scale, "locked_borders": 2}
        self.t = tio.RandomElasticDeformation(num_control_points=7, max_displacement=7.5 * scale, locked_borders=2)
        self._last = None

    def seed(self, s):
        torch.manual_seed(s)

    def _subject(self, img):
        x = img if self.nd == 3 else img[..., None]          # (1, W, H, 1) for 2D
        return self.tio.Subject(img=self.tio.ScalarImage(tensor=x, affine=np.eye(4)))

    def __call__(self, img):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                   # its "folding may occur" warning
            out = self.t(self._subject(img))
        self._last = out
        y = out["img"].data
        return y if self.nd == 3 else y[..., 0]

    def field(self, img):
        """Dense displacement of the last call, from the B-spline it recorded, in voxels."""
        import SimpleITK as sitk
        from torchio.data.io import nib_to_sitk
        from torchio.transforms.augmentation.spatial.random_elastic_deformation import ElasticDeformation
        applied = self._last.get_composed_history()
        ed = [t for t in applied if isinstance(t, ElasticDeformation)][0]
        x = img if self.nd == 3 else img[..., None]
        ref = nib_to_sitk(x.numpy(), np.eye(4), force_3d=True)
        bspline = ed.get_bspline_transform(ref)
        disp = sitk.TransformToDisplacementField(bspline, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                                 ref.GetSpacing(), ref.GetDirection())
        d = sitk.GetArrayFromImage(disp)                      # (k, j, i, 3), physical (LPS)
        d = np.transpose(d, (2, 1, 0, 3))                     # (i, j, k, 3): the tensor's axes
        M = np.array(ref.GetDirection()).reshape(3, 3) @ np.diag(ref.GetSpacing())
        idx = d @ np.linalg.inv(M).T                          # index units, sitk index order
        u = torch.from_numpy(np.moveaxis(idx, -1, 0).astype(np.float32))
        return u[:3] if self.nd == 3 else u[:2, ..., 0]


# ---------------------------------------------------------------------------- DRDM
def load_cases(args):
    from napari_drdm._sample_data import load_sample
    from napari_drdm.model import load_model
    cases = []
    for nd, key, model_name in ((2, "brain2d", "brain2d"), (3, "brain3d", "brain3d")):
        if (args.samples if nd == 2 else args.samples_3d) <= 0:
            continue
        model = load_model(model_name, device=args.device)
        s = load_sample(key)
        _, x, _, _ = model.prepare(np.asarray(s["image"]), s.get("spacing"))
        cases.append({"tag": f"{key} ({nd}D, S={model.size}, bundled '{model_name}' weights)", "nd": nd,
                      "model": model, "images": x.cpu(), "n": args.samples if nd == 2 else args.samples_3d})
    ref = args.reference
    if ref and os.path.exists(os.path.join(ref, "upstream_cmr2d.pth")) and args.samples > 0:
        from napari_drdm.model import DRDM
        model = DRDM.from_checkpoint(os.path.join(ref, "upstream_cmr2d.pth"), device=args.device, size=256)
        a = np.load(os.path.join(ref, "acdc_slices256.npz"))["images"].astype(np.float32)
        xs = torch.stack([model.prepare(im)[1][0].cpu() for im in a])
        cases.append({"tag": "ACDC cardiac slices (2D, S=256, published reference checkpoint)", "nd": 2,
                      "model": model, "images": xs, "n": args.samples})
    return cases


def run_drdm(case, args, log):
    model = case["model"]
    S = model.size
    rows, times = [], []
    for i in range(case["n"]):
        x = case["images"][i % len(case["images"])][None].to(model.device)
        t0 = time.perf_counter()
        phi, psi = model.generate_model_grid(x, T_PRIME, seeds=[i])
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        m = field_metrics(phi[0], side=S)
        mf = field_metrics(psi[0], side=S)
        rows.append({"recovered": {k: float(m[k]) for k in METRICS}, "forward": {k: float(mf[k]) for k in METRICS}})
    return rows, times


def run_peer(peer, case, args):
    nd = case["nd"]
    S = case["model"].size
    rows, times, checks = [], [], []
    for i in range(case["n"]):
        img = case["images"][i % len(case["images"])].float()          # (1, S...)
        peer.seed(i)
        t0 = time.perf_counter()
        out = peer(img)
        times.append(time.perf_counter() - t0)
        u = peer.field(img)
        m = field_metrics(u, side=S)
        rows.append({k: float(m[k]) for k in METRICS})
        # self-check: our warp with the recovered field reproduces the peer's output (inside)
        rew = warp(img[None], u[None], "linear", "zeros")[0]
        inside = rew.new_ones(rew.shape, dtype=torch.bool)
        pos = u + torch.stack(torch.meshgrid(*[torch.arange(S, dtype=torch.float32)] * nd, indexing="ij"))
        for c in range(nd):
            inside &= (pos[c] >= 1) & (pos[c] <= S - 2)
        checks.append(float((rew - torch.as_tensor(out).float())[inside].abs().max()))
    return rows, times, checks


def agg(rows):
    return {k: {"median": float(statistics.median(r[k] for r in rows)), "min": float(min(r[k] for r in rows)),
                "max": float(max(r[k] for r in rows))} for k in METRICS}


def fmt_row(name, a, t):
    return (f"  {name:44s} {t * 1e3:10.1f} ms   max {a['max_disp_pct']['median']:6.2f} %   "
            f"mean {a['mean_disp_pct']['median']:6.2f} %   folding {a['folding_pct']['median']:7.3f} %")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8, help="2D samples (seeds) per method")
    ap.add_argument("--samples-3d", type=int, default=2, help="3D samples per method (0: skip 3D)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reference", default=environment.get("REFERENCE_DIR", str(ROOT.parent / "shared" / "reference")),
                    help="folder with upstream_cmr2d.pth and acdc_slices256.npz (adds a cardiac case; "
                         "default: $NAPARI_DRDM_REFERENCE_DIR or ../shared/reference when present; '' to skip)")
    ap.add_argument("--json", default=None, metavar="PATH")
    add_force_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args.force, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    versions = {"torch": torch.__version__}
    peers = []
    for mod, cls in (("monai", MonaiElastic), ("torchio", TorchioElastic)):
        try:
            versions[mod] = __import__(mod).__version__
            peers.append(cls)
        except ImportError as e:
            log(f"{mod} is not installed ({e}): not measured")
    log(f"DRDM vs peers: torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "torch"))
    log(f"  medians over samples; time per sample; displacement in % of the image side; folding % of pixels "
        f"with det <= 0 (Table 1 protocol); DRDM: T'={T_PRIME}, batch 1")
    result = {"versions": versions, "threads": torch.get_num_threads(), "device": args.device, "cases": []}
    for case in load_cases(args):
        model = case["model"]
        log(f"\n{case['tag']}: {case['n']} samples, DRDM schedule '{model.config.schedule}'")
        res = {"case": case["tag"], "n": case["n"], "size": model.size, "ndim": case["nd"], "methods": {}}
        rows, times = run_drdm(case, args, log)
        d_rec = agg([r["recovered"] for r in rows])
        d_fwd = agg([r["forward"] for r in rows])
        t_med = statistics.median(times)
        res["methods"]["DRDM (recovered)"] = {"time_per_sample_s": t_med, **d_rec}
        res["methods"]["DRDM forward field only (no recovery)"] = {"time_per_sample_s": None, **d_fwd}
        log(fmt_row("DRDM (recovered)", d_rec, t_med))
        log(fmt_row("  DRDM forward field psi_{T':1} (input to recovery)", d_fwd, float("nan")))
        target = d_rec["max_disp_pct"]["median"]
        for P in peers:
            for setting in ("example", "matched"):
                scale = 1.0
                if setting == "matched":
                    base = res["methods"][f"{P.name} [example]"]["max_disp_pct"]["median"]
                    scale = target / base if base > 0 else 1.0
                peer = P(case["nd"], model.size, scale)
                peer(case["images"][0].float())            # warm-up
                prow, ptimes, checks = run_peer(peer, case, args)
                a = agg(prow)
                name = f"{P.name} [{setting}]"
                res["methods"][name] = {"time_per_sample_s": statistics.median(ptimes), "params": peer.params,
                                        "field_check_max_abs": max(checks), **a}
                log(fmt_row(name, a, statistics.median(ptimes)) + f"   (field check {max(checks):.1e})")
        result["cases"].append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        log(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
