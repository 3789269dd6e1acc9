"""Where a training process runs: rank, world size, device, autocast dtype, and the collectives.

One process (``WORLD_SIZE`` unset) or several started by ``torchrun`` (or :func:`training.train.spawn_local`):
the process group is nccl on CUDA, gloo on the CPU.  The collectives below are no-ops in a single process.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

__all__ = ["Env"]


def _channels_last(value, device: torch.device) -> bool:
    """``train.channels_last``: True/False, or "auto" = on for CPU training.

    On the CPU, oneDNN's convolution backward is about twice as fast with channels-last
    (NHWC / NDHWC) tensors (measured on a 3D S = 64 step, training/README.md "CPU layout"); on CUDA it
    has not been measured, so "auto" leaves the default layout there.
    """
    if value in (True, False):
        return bool(value)
    if value in ("auto", None):
        return device.type == "cpu"
    raise ValueError(f"train.channels_last must be true, false or 'auto', got {value!r}")


class Env:
    """Process placement: rank, world size, device, autocast dtype."""

    def __init__(self, tcfg: Dict[str, Any]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want = tcfg["device"]
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device(want)
        amp = "off" if tcfg["amp"] in (False, None, "off", "none") else str(tcfg["amp"])
        if amp not in ("off", "auto", "bf16"):
            raise ValueError(f"train.amp must be 'auto', 'bf16' or 'off', got {amp!r}")
        use_bf16 = amp == "bf16" or (amp == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        if int(tcfg.get("threads") or 0) > 0:
            torch.set_num_threads(int(tcfg["threads"]))
        self.channels_last = _channels_last(tcfg.get("channels_last", "auto"), self.device)
        self.distributed = self.world > 1
        if self.distributed and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            import datetime
            # rank 0 validates while the others wait in a barrier: allow long validations
            torch.distributed.init_process_group(backend=backend, rank=self.rank, world_size=self.world,
                                                 timeout=datetime.timedelta(hours=2))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    def autocast(self):
        """The network's autocast context: bf16 when ``train.amp`` asks for it, else disabled."""
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if self.device.type == "cuda":
            return f"{self.world} x {torch.cuda.get_device_name(self.device)}"
        return f"{self.world} x cpu ({torch.get_num_threads()} threads)"

    def any_flag(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.clone()
            torch.distributed.all_reduce(values)
            values /= self.world
        return values

    def gather(self, obj):
        if not self.distributed:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.distributed:
            torch.distributed.barrier()
