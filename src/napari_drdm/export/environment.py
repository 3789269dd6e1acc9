"""What besides the weights, the inputs, the seeds and the batch decides an export's bits.

The network's float rounding depends on the device, the torch build, the number of threads and,
on a CPU, the vector instruction set torch dispatches to; the reverse loop amplifies a difference
in the last bit into a visibly different field (SPEC section 6).  Every row records these, so that
``drdm augment --reproduce`` can say why a file came out different.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

ENVIRONMENT_KEYS = ("device", "threads", "torch", "cpu_capability")


def run_environment(device) -> Dict[str, object]:
    """The environment of a computation on ``device``: its name, torch's thread count, the torch
    version and, on a CPU, the instruction set its kernels use (``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    import torch

    from ..core.native_build import cpu_capability
    dev = str(device)
    cap = (cpu_capability() or None) if torch.device(dev).type == "cpu" else None
    return {"device": dev, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_capability": cap}


def environment_differences(recorded: Mapping, now: Mapping) -> Dict[str, Tuple[object, object]]:
    """``{key: (recorded, now)}`` for the environment keys whose values differ.

    A row written before a key was recorded says nothing about it, and is not reported on it.
    """
    return {k: (recorded[k], now.get(k)) for k in ENVIRONMENT_KEYS
            if k in recorded and recorded[k] not in (None, "") and recorded[k] != now.get(k)}
