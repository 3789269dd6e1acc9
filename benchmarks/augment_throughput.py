"""Dataset-export throughput: DRDM samples per second, 2D and 3D, batch 1 versus batched.

    python benchmarks/augment_throughput.py                    # 2D S=128 and 3D S=64, T'=45, paper loop
    python benchmarks/augment_throughput.py --dims 3 --t-prime 4 --samples 2 --json

Uses the bundled weights (``brain2d``, ``brain3d``) at their own side; where they are missing it
falls back to randomly initialised weights of the same architecture and side (the speed is the
same; the output says so).  What is timed is ``DRDM.generate_model_grid`` (the forward field +
the reverse loop, batched), i.e. the network-bound part of ``drdm augment``; ``--end-to-end``
also times the whole export (reading, rendering on the original grid, NIfTI writing, manifest).
Prints the device, threads and versions with the figures.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIDES = {2: 128, 3: 64}
NAMES = {2: "brain2d", 3: "brain3d"}


def get_model(ndim: int, weights, device):
    from napari_drdm.core.config import DRDMConfig
    from napari_drdm.core.network import DRDMNet
    from napari_drdm.model import DRDM, load_model
    name = weights or NAMES[ndim]
    try:
        return load_model(name, device=device), f"weights {name!r}"
    except (KeyError, FileNotFoundError, ValueError) as e:
        if weights:
            raise
        torch.manual_seed(0)
        model = DRDM(DRDMNet(ndim), DRDMConfig.default(ndim, size=SIDES[ndim]), device, name=f"random{ndim}d")
        return model, f"RANDOM weights (bundled {name!r} not available: {str(e).splitlines()[0][:80]}...)"


def phantom(ndim: int, size: int) -> np.ndarray:
    g = np.meshgrid(*[np.linspace(-1, 1, size)] * ndim, indexing="ij")
    r2 = sum(x ** 2 for x in g)
    return (np.exp(-3 * r2) + 0.3 * (g[0] > 0.2)).astype(np.float32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generation(model, x, samples: int, batch: int, t_prime: int, schedule):
    """Seconds for ``samples`` generations in calls of ``batch`` samples."""
    sync(model.device)
    t0 = time.perf_counter()
    done = 0
    while done < samples:
        b = min(batch, samples - done)
        model.generate_model_grid(x.expand(b, *x.shape[1:]).contiguous(), t_prime, list(range(done, done + b)),
                                  schedule=schedule)
        done += b
    sync(model.device)
    return time.perf_counter() - t0


def end_to_end(model, ndim, samples, batch, t_prime, schedule):
    import nibabel as nib

    from napari_drdm.export import ExportOptions, run_export
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in"
        src.mkdir()
        img = (phantom(ndim, model.size) * 1000).astype(np.int16)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(src / "case.nii.gz"))
        nib.save(nib.Nifti1Image((img > 500).astype(np.uint8), np.eye(4)), str(src / "case_label.nii.gz"))
        opts = ExportOptions(per_image=samples, t_prime=str(t_prime), schedule=schedule, batch=batch)
        t0 = time.perf_counter()
        run_export(src, Path(d) / "out", opts, model=model)
        return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--t-prime", type=int, default=45)
    p.add_argument("--schedule", choices=["paper", "reference"], default="paper")
    p.add_argument("--samples", type=int, default=8, help="generations per measurement (default 8)")
    p.add_argument("--batch", type=int, default=4, help="batched measurement: samples per network pass")
    p.add_argument("--weights2d", default=None)
    p.add_argument("--weights3d", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--end-to-end", action="store_true", help="also time the whole export (files, manifest)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import napari_drdm
    from napari_drdm.core.recovery import reverse_timesteps
    from napari_drdm.model import pick_device
    device = pick_device(args.device)
    info = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else (platform.processor() or platform.machine()), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "numpy": np.__version__, "napari_drdm": napari_drdm.__version__,
            "python": platform.python_version(), "t_prime": args.t_prime, "schedule": args.schedule,
            "samples": args.samples, "batch": args.batch, "results": []}
    if not args.json:
        print(f"device {info['device']} ({info['device_name']}), {info['torch_threads']} threads, torch "
              f"{info['torch']}, napari-drdm {info['napari_drdm']}; T'={args.t_prime}, {args.schedule} loop")
    for nd in args.dims:
        model, source = get_model(nd, getattr(args, f"weights{nd}d"), device)
        steps = len(reverse_timesteps(args.t_prime, model.config.n_steps, args.schedule))
        x = model.prepare(phantom(nd, model.size), None)[1]
        model.generate_model_grid(x, 1, [0], schedule="paper")           # warm-up
        res = {"ndim": nd, "size": model.size, "weights": source, "reverse_steps": steps}
        for label, b in (("batch1", 1), (f"batch{args.batch}", args.batch)):
            secs = time_generation(model, x, args.samples, b, args.t_prime, args.schedule)
            res[label] = {"samples_per_s": args.samples / secs, "s_per_sample": secs / args.samples,
                          "s_per_reverse_step_per_sample": secs / args.samples / max(1, steps)}
        res["batched_speedup"] = res["batch1"]["s_per_sample"] / res[f"batch{args.batch}"]["s_per_sample"]
        if args.end_to_end:
            secs = end_to_end(model, nd, args.samples, args.batch, args.t_prime, args.schedule)
            res["end_to_end"] = {"samples_per_s": args.samples / secs, "s_per_sample": secs / args.samples}
        info["results"].append(res)
        if not args.json:
            print(f"{nd}D S={model.size} [{source}], {steps} reverse steps/sample:")
            for k in ("batch1", f"batch{args.batch}", "end_to_end"):
                if k in res:
                    r = res[k]
                    print(f"  {k:<11} {r['samples_per_s']:9.4f} samples/s  ({r['s_per_sample']:.2f} s/sample)")
            print(f"  batched speed-up x{res['batched_speedup']:.2f}")
    if args.json:
        print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
