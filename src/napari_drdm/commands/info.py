"""``drdm info``: which device and inference path this machine gets, and why."""
from __future__ import annotations

import json
import platform

from ..errors import InputError
from ..validate import arg_type, check_threads


def _tune_tag(value: str, name: str = "--tune"):
    """'2d256' -> (2, 256); one clear line on anything else.

    Args:
        value: the tag.
        name: option name for the message.
    """
    t = str(value).strip().lower()
    if len(t) < 3 or t[0] not in "23" or t[1] != "d" or not t[2:].isdigit() or int(t[2:]) % 8 or int(t[2:]) < 8:
        raise InputError(f"{name}: expected a size like 2d256 or 3d64 (side divisible by 8), got {value!r}")
    return int(t[0]), int(t[2:])


def add_parser(sub):
    p = sub.add_parser("info", help="show the device, library versions and the inference path in use")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--tune", nargs="+", metavar="SIZE", type=arg_type(_tune_tag, "--tune"), default=None,
                   help="choose the CPU path for these input sizes now (e.g. 2d256 3d64; measured once, "
                        "about a second each, then cached) and show the decisions")
    p.add_argument("--batch", type=arg_type(check_threads, "--batch"), default=1,
                   help="batch size for --tune (default 1, the reverse loop's)")
    p.add_argument("--threads", type=arg_type(check_threads, "--threads"), default=None,
                   help="CPU threads for torch (default: torch's choice; decisions are per thread count)")
    return p


def _tuned(ndim: int, size: int, batch: int) -> dict:
    """The path decision for (batch, 1, size^ndim) with the network's architecture (measured if new)."""
    import torch

    from ..core.fast import InferenceEngine
    from ..core.network import DRDMNet
    torch.manual_seed(0)
    eng = InferenceEngine(DRDMNet(ndim).eval())
    d = eng.path_decision((batch, 1) + (size,) * ndim, torch.device("cpu"))
    out = {"size": f"{ndim}d{size}", "batch": batch, "path": d.path, "source": d.source, "reason": d.reason}
    if d.medians_ms:
        out["median_ms"] = d.medians_ms
    if d.cost_s is not None:
        out["measuring_cost_s"] = d.cost_s
    return out


def _cached_decisions() -> list:
    """Stored decisions measured on this CPU model (newest first)."""
    from ..core import autotune
    model = autotune.cpu_model()
    rows = []
    for rec in autotune.read_cache().values():
        key = rec.get("key") or {}
        if key.get("cpu_model") != model:
            continue
        shape = [str(s) for s in key.get("shape") or []]
        side = shape[0] if len(set(shape)) == 1 else "x".join(shape)
        rows.append({"size": f"{key.get('ndim')}d{side}", "batch": key.get("batch"),
                     "threads": key.get("threads"), "torch": key.get("torch"), "path": rec.get("path"),
                     "median_ms": rec.get("medians_ms"), "measured_at": rec.get("measured_at")})
    return sorted(rows, key=lambda r: str(r.get("measured_at")), reverse=True)


def collect(tune=None, batch: int = 1) -> dict:
    """Everything ``drdm info`` shows.

    Args:
        tune: (ndim, size) pairs to decide the CPU path for now (measured once, then cached).
        batch: batch size of those decisions.
    """
    import torch

    from .. import OPENMP_WAIT, __version__
    from ..core import autotune, native_build
    from ..core.onednn_ops import mkldnn_fusion_available
    from ..model import pick_device

    dev = pick_device(None)
    info = {
        "napari_drdm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(dev),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_model": autotune.cpu_model(),
        "cpu_capability": native_build.cpu_capability() or None,
        "torch_threads": torch.get_num_threads(),
        "openmp_wait": OPENMP_WAIT,
        "onednn_fused_convolutions": mkldnn_fusion_available(),
    }
    built = native_build.load() is not None
    used, why = native_build.auto_enabled()
    info["native_kernels"] = {"built": built, "status": native_build.status(),
                              "cpu_flag_rule": ("would use them" if used else "would not use them") + f" ({why})"}
    if dev.type == "cpu" and mkldnn_fusion_available():
        if not built:
            info["inference_path"] = "oneDNN"
        else:
            info["inference_path"] = ("oneDNN, or oneDNN + native kernels where measured faster (per input size, "
                                      "batch and thread count; see path_decisions)")
    elif dev.type == "cpu":
        info["inference_path"] = "generic PyTorch"
    else:
        info["inference_path"] = f"generic PyTorch on {dev.type} (channels-last, float32)"
    info["autotune"] = {"enabled": autotune.enabled(), "cache_file": str(autotune.cache_file())}
    if tune:
        info["path_decisions"] = [_tuned(nd, S, batch) for nd, S in tune]
    info["cached_path_decisions"] = _cached_decisions()
    from ..core.environment import describe
    info["environment"] = {v["name"]: (v["value"] if v["set_as"] in (None, v["name"]) else
                                       f"{v['value']} (from the deprecated {v['set_as']})")
                           for v in describe()}
    return info


def _show(val) -> str:
    return json.dumps(val) if isinstance(val, (dict, list)) else str(val)


def run(args) -> int:
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    info = collect(args.tune, args.batch)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, val in info.items():
        if isinstance(val, dict):
            print(f"{key}:")
            for k, v in val.items():
                print(f"    {k}: {_show(v)}")
        elif isinstance(val, list):
            print(f"{key}:{'' if val else ' none yet (measured on first use)'}")
            for row in val:
                print("    " + ", ".join(f"{k} {_show(v)}" for k, v in row.items() if v is not None))
        else:
            print(f"{key}: {val}")
    return 0
