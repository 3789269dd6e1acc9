#!/usr/bin/env python
"""Network passes of the native kernel builds against each other, interleaved in one process.

    python benchmarks/native_builds.py                          # 2d256, 1 thread, 15 rounds
    python benchmarks/native_builds.py --sizes 2d128,2d256,3d64 --threads 2 --rounds 21

Candidates (one engine each, every round times each once, in turn; medians and minima):

* ``cpu_build``  this CPU's build (native_build.simd_level) on its stages (native.stages_for);
* ``avx2``       the AVX2/FMA build on the finest two levels (what AVX2 CPUs get; only where this
                 CPU's build is the AVX-512 one);
* ``onednn``     the oneDNN path without native kernels;
* ``plain``      the eager DRDMNet modules.

2D uses the bundled cmr2d weights, 3D random ones (timing does not depend on them).  The max
difference of each path's pass from the plain one is printed too.  Set NAPARI_DRDM_CACHE to a
private folder to leave the user's kernel cache alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import napari_drdm  # noqa: E402,F401  (before torch: its OpenMP wait policy)

# isort: split
import torch  # noqa: E402

from napari_drdm.core import native, native_build  # noqa: E402
from napari_drdm.core.fast import InferenceEngine  # noqa: E402
from napari_drdm.core.network import DRDMNet  # noqa: E402


def parse_sizes(text: str):
    out = []
    for tag in text.split(","):
        tag = tag.strip().lower()
        if len(tag) < 3 or tag[0] not in "23" or tag[1] != "d" or not tag[2:].isdigit() or int(tag[2:]) % 8:
            raise argparse.ArgumentTypeError(f"{tag!r} is not a size like 2d256 or 3d64 (side divisible by 8)")
        out.append((tag, int(tag[0]), int(tag[2:])))
    return out


def network(nd: int):
    if nd == 2:
        from napari_drdm import load_model
        return load_model("cmr2d", device="cpu").net
    torch.manual_seed(0)
    return DRDMNet(3).eval()


def engine_with(net, lib):
    """A native engine running ``lib`` on the stages that build gets."""
    eng = InferenceEngine(net, native=True)
    eng.path_decision((1, 1, 16, 16) if net.ndim == 2 else (1, 1, 8, 8, 8))      # makes its runner
    eng._runner.lib, eng._runner.stages = lib, native.stages_for(lib)
    eng._runner.reset()
    return eng


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=parse_sizes, default=parse_sizes("2d256"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-plain", action="store_true", help="leave out the eager modules (slow in 3D)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds: expected positive integers")
    torch.set_num_threads(args.threads)
    lib = native_build.load()
    if lib is None:
        sys.exit(f"native kernels unavailable here: {native_build.status()}")
    libs = {"cpu_build": lib}
    if native_build.simd_level() >= 2:
        libs["avx2"] = native_build.build_library(simd=1)
    print(f"threads {args.threads}; {native_build.status()}")
    for tag, nd, S in args.sizes:
        net = network(nd)
        x = torch.rand((1, 1) + (S,) * nd, generator=torch.Generator().manual_seed(0)) - 0.5
        t = torch.full((1,), 40, dtype=torch.int64)
        with torch.inference_mode():
            paths = {k: engine_with(net, v) for k, v in libs.items()}      # each has .single_pass
            paths["onednn"] = InferenceEngine(net, native=False)
            if not args.no_plain:
                paths["plain"] = net
            ref = net.single_pass(x, t)
            diffs = {k: float((p.single_pass(x, t) - ref).abs().max()) for k, p in paths.items()}  # + warm-up
            times = {k: [] for k in paths}
            for _ in range(args.rounds):
                for k, p in paths.items():
                    t0 = time.perf_counter()
                    p.single_pass(x, t)
                    times[k].append(time.perf_counter() - t0)
        first = statistics.median(times["cpu_build"])
        for k, v in times.items():
            m = statistics.median(v)
            print(f"{tag} {k:10s} median {m * 1e3:8.1f} ms  min {min(v) * 1e3:8.1f} ms  "
                  f"/ cpu_build {m / first:6.3f}  max |diff| from plain {diffs[k]:.1e}")


if __name__ == "__main__":
    main()
