"""Forward-field size and folding against the field scale, in 2D and 3D (training/README.md).

The forward process's fields are drawn on a 64-point control grid in fractions of the grid and
multiplied by ``field_scale`` (the reference uses S/64: 4 at 256^2, 2 at 128^3).  A 3D model at
S = 64 with the reference factor 1 (or the 2.0 that brain3d used) has almost no folding at any
T', so T' means little there.  This prints, for each dimension/side/scale, the forward field's
maximum and mean displacement (% of the side) and folding (% of pixels, det <= 0) at T' = 30,
45, 70 over N seeds, so that a 3D scale can be chosen whose forward folding matches 2D's.

    python benchmarks/forward_scale.py --json benchmarks/results/forward_scale.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_drdm.core.config import DRDMConfig
from napari_drdm.core.forward import ForwardSampler
from napari_drdm.core.metrics import field_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402


def measure(ndim, size, scale, t_primes, seeds):
    cfg = DRDMConfig.default(ndim, size=size, field_scale=scale)
    sampler = ForwardSampler(cfg)
    out = {}
    for tp in t_primes:
        rows = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            psi = sampler.sample(int(tp), batch=1, draws=sampler.draw(1, g), return_step=False).forward_ddf
            rows.append(field_metrics(psi[0], side=size))
        out[tp] = {k: {"mean": float(np.mean([r[k] for r in rows])), "sd": float(np.std([r[k] for r in rows], ddof=1))}
                   for k in ("max_disp_pct", "mean_disp_pct", "folding_pct")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["2d128:4", "2d256:4", "3d64:2", "3d64:3", "3d64:4",
                                                         "3d64:5", "3d64:6"],
                    help="NdS:SCALE items (e.g. 3d64:4)")
    ap.add_argument("--t-prime", type=int, nargs="+", default=[30, 45, 70])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--json", default=None)
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    torch.set_grad_enabled(False)
    rec = {"t_primes": a.t_prime, "seeds": a.seeds, "rows": []}
    print("| dim, S | field_scale | T' | max disp % | mean disp % | folding % |\n| --- | --- | --- | --- | --- | --- |")
    for item in a.configs:
        dims, scale = item.split(":")
        ndim, size = int(dims[0]), int(dims[2:])
        t0 = time.perf_counter()
        res = measure(ndim, size, float(scale), a.t_prime, range(a.seeds))
        rec["rows"].append({"ndim": ndim, "size": size, "field_scale": float(scale), "results": res,
                            "seconds": time.perf_counter() - t0})
        for tp, r in res.items():
            print(f"| {ndim}D, {size} | {float(scale):g} | {tp} | "
                  f"{r['max_disp_pct']['mean']:.1f} ± {r['max_disp_pct']['sd']:.1f} "
                  f"| {r['mean_disp_pct']['mean']:.2f} ± {r['mean_disp_pct']['sd']:.2f} "
                  f"| {r['folding_pct']['mean']:.2f} ± {r['folding_pct']['sd']:.2f} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
