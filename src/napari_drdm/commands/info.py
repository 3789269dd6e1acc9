"""``drdm info``: which device and inference path this machine gets, and why."""
from __future__ import annotations

import json
import platform


def add_parser(sub):
    p = sub.add_parser("info", help="show the device, library versions and the inference path in use")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def collect() -> dict:
    import torch

    from .. import __version__
    from ..core import native
    from ..core.fast import _cpu_capability, mkldnn_fusion_available
    from ..model import pick_device

    dev = pick_device(None)
    info = {
        "napari_drdm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": _cpu_capability() or None,
        "torch_threads": torch.get_num_threads(),
        "onednn_fused_convolutions": mkldnn_fusion_available(),
    }
    built = native.load() is not None
    used, why = native.auto_enabled()
    info["native_kernels"] = {"built": built, "status": native.status(),
                              "used_by_default_on_cpu": used, "reason": why}
    if dev.type == "cpu":
        info["inference_path"] = ("oneDNN + native kernels" if used else "oneDNN") if mkldnn_fusion_available() \
            else "generic PyTorch"
    else:
        info["inference_path"] = f"generic PyTorch on {dev.type} (channels-last, float32)"
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, val in info.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for k, v in val.items():
                print(f"    {k}: {v}")
        else:
            print(f"{key}: {val}")
    return 0
