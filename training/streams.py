"""The random streams of a training process: one set per rank, their states for a checkpoint.

Every random draw of a step comes from a named generator (forward-field draws, augmentation and,
off the CPU, time steps), seeded from the run's seed and the rank; saving and restoring their
states (with torch's global CPU / CUDA states) is what makes a resumed run bit-identical.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from .data import ensure_core

ensure_core()

from napari_drdm.core.config import DRDMConfig  # noqa: E402

__all__ = ["generators", "draws", "rng_state", "set_rng_state"]


def rng_state(gens: Dict[str, torch.Generator], device) -> Dict[str, Any]:
    """The states of ``gens`` and of torch's global generators (CPU, and CUDA on ``device``)."""
    st = {k: g.get_state() for k, g in gens.items()}
    st["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(gens: Dict[str, torch.Generator], st: Dict[str, Any], device):
    """Restore states saved by :func:`rng_state` (streams missing from ``st`` keep theirs)."""
    for k, g in gens.items():
        if k in st:
            g.set_state(st[k])
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def generators(seed: int, rank: int, device) -> Dict[str, torch.Generator]:
    """Per-rank streams: 'field' (forward draws, on the device), 'aug' (augmentation, on the device)
    and, off the CPU, 't' (time steps, on the host so the sampler's schedule needs no device sync;
    on the CPU the time steps come from 'field')."""
    out = {}
    names = ("field", "aug") if torch.device(device).type == "cpu" else ("field", "aug", "t")
    for i, name in enumerate(names):
        g = torch.Generator(device="cpu" if name == "t" else device)
        g.manual_seed(int(seed) * 1_000_003 + rank * 7919 + i * 104_729 + 17)
        out[name] = g
    return out


def draws(mcfg: DRDMConfig, B: int, g: torch.Generator, device) -> List[torch.Tensor]:
    """The sampler's 8 standard-normal fields (ForwardSampler.draw order), drawn on ``device``."""
    return [torch.randn((B, mcfg.ndim) + (s,) * mcfg.ndim, generator=g, device=device)
            for _ in range(2) for s in mcfg.scales]
