"""Inflate a 2D DRDM network's weights to 3D (a starting point for 3D models, ``init_inflate``).

Every 2D kernel w[o, i, a, b] becomes a 3D kernel over (depth, a, b), in one of two ways:

* ``centre``: w on the central depth tap(s), zero elsewhere (4-tap stride-2 convolutions hold w/2
  on each of the two central taps; transposed ones hold w on both, as each output sees only one);
* ``spread``: w divided evenly over the depth taps (w/3 for 3-tap kernels; w/4 for 4-tap
  convolutions and w/2 for 4-tap transposed convolutions, whose outputs each see two depth taps).

On a volume that is constant along depth, ``centre`` makes the 3D network reproduce the 2D one
exactly (up to float rounding, tested), ``spread`` away from the depth borders (where the zero
padding differs); they differ on real volumes, which is what ``benchmarks/inflation.py`` measures.  The
output head predicts d = 3 components instead of 2: the in-plane components (array axes 1 and 2)
take the 2D head's components for axes 0 and 1; the depth component takes the 2D axis-0
component's kernel with its own axis turned to depth (averaged over the two in-plane choices)
and its bias.  Norm, time-embedding and bias tensors have the same shapes in 2D and 3D and are
copied.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["INFLATE_MODES", "inflate_state_dict"]

INFLATE_MODES = ("centre", "spread")


def _depth(w: torch.Tensor, mode: str, transposed: bool) -> torch.Tensor:
    """(o, i, a, b) -> (o, i, k, a, b) with the kernel's own depth taps k = w.shape[-1]."""
    k = w.shape[-1]
    out = torch.zeros(w.shape[:2] + (k,) + w.shape[2:], dtype=w.dtype)
    if mode == "spread":
        share = 2 if (k == 4 and transposed) else k
        for j in range(k):
            out[:, :, j] = w / share
    elif k % 2:
        out[:, :, k // 2] = w
    else:   # 4 taps: a convolution's output reads both central taps, a transposed one's only one
        half = w if transposed else w / 2
        out[:, :, k // 2 - 1] = half
        out[:, :, k // 2] = half
    return out


def _turned(w: torch.Tensor, mode: str) -> torch.Tensor:
    """A 2D kernel (o, i, a, b) placed so that its first axis a runs along depth, averaged over the
    two in-plane axes for b and centred/spread over the remaining one."""
    k = w.shape[-1]
    on_w = _depth(w, mode, False).permute(0, 1, 3, 2, 4)     # (o, i, a->depth, centre/spread, b)
    on_h = on_w.permute(0, 1, 2, 4, 3)                        # (o, i, a->depth, b, centre/spread)
    assert on_w.shape[2:] == (k, k, k)
    return (on_w + on_h) / 2


def inflate_state_dict(state2d: Dict[str, torch.Tensor], model3d: torch.nn.Module,
                       mode: str = "centre") -> Dict[str, torch.Tensor]:
    """A state_dict for ``model3d`` (a 3D :class:`DRDMNet`) from a 2D network's state_dict.

    Args:
        state2d: the 2D network's tensors (same channel widths, steps and time dimension).
        model3d: the 3D network to fill (its own tensors give the target shapes).
        mode: ``"centre"`` or ``"spread"`` (module docstring).

    Raises:
        ValueError: an unknown mode, or tensors that do not correspond.
    """
    if mode not in INFLATE_MODES:
        raise ValueError(f"init_inflate must be one of {', '.join(INFLATE_MODES)}, got {mode!r}")
    own = model3d.state_dict()
    if set(own) != set(state2d):
        diff = sorted(set(own) ^ set(state2d))
        raise ValueError(f"the 2D and 3D networks do not have the same tensors (e.g. {diff[:3]})")
    transposed = {name for name, m in model3d.named_modules() if isinstance(m, torch.nn.ConvTranspose3d)}
    out = {}
    for key, target in own.items():
        w = state2d[key].to(target.dtype)
        if key == "conv_out.weight":
            if w.shape[0] != 2 or target.shape[0] != 3:
                raise ValueError(f"conv_out.weight: expected a 2D head with 2 outputs, got {tuple(w.shape)}")
            v = torch.stack([_turned(w[0:1], mode)[0], _depth(w[0:1], mode, False)[0],
                             _depth(w[1:2], mode, False)[0]])
        elif key == "conv_out.bias":
            v = torch.stack([w[0], w[0], w[1]])
        elif w.dim() == 4 and target.dim() == 5:
            v = _depth(w, mode, key.rsplit(".", 1)[0] in transposed)
        else:
            v = w
        if tuple(v.shape) != tuple(target.shape):
            raise ValueError(f"{key}: 2D {tuple(w.shape)} does not inflate to 3D {tuple(target.shape)}")
        out[key] = v
    return out
