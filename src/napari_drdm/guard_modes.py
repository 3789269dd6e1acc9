"""How the fold guard is applied to a generation: its methods, the argument that picks one, and
the hooks that put it into the reverse loop.

The guard itself (making a field fold-free) is :func:`napari_drdm.core.foldguard.guard_field`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .core.foldguard import guard_field
from .errors import InputError

__all__ = ["GUARD_MODES", "DEFAULT_GUARD_MODE", "guard_mode", "GuardHooks"]

#: fold-guard methods (core/foldguard.py; README "Fold-free deformations"):
#: "final" corrects the recovered field (and each displayed frame) once; "step" also corrects every
#: reverse step's field before it is composed; "chain" corrects the accumulated field after every step.
GUARD_MODES = ("final", "step", "chain")
#: the method ``fold_guard=True`` selects (chosen by benchmarks/fold_guard.py)
DEFAULT_GUARD_MODE = "final"


def guard_mode(value) -> Optional[str]:
    """Normalise a ``fold_guard`` argument: False/None/"off" -> None, True -> the default method.

    Args:
        value: False, None, "off", True, "on" or one of :data:`GUARD_MODES`.
    """
    if value is None or value is False or value == "off":
        return None
    if value is True or value == "on":
        return DEFAULT_GUARD_MODE
    if isinstance(value, str) and value in GUARD_MODES:
        return value
    raise InputError(f"fold_guard must be True, False or one of {GUARD_MODES}, got {value!r}")


class GuardHooks:
    """The fold guard's place in the reverse loop for one method, and its bookkeeping."""

    def __init__(self, mode: Optional[str]):
        self.mode = mode
        self.step_folded = 0          # pixels corrected inside the loop ("step", "chain")

    def _count(self, u):
        out, rep = guard_field(u)
        self.step_folded += sum(rep.folded_before)
        return out

    def kwargs(self) -> dict:
        """The keyword arguments that put this method into :func:`napari_drdm.core.recovery.recover`."""
        if self.mode == "step":
            return {"step_guard": self._count}
        if self.mode == "chain":
            return {"field_guard": self._count}
        return {}

    def finish(self, phi: torch.Tensor, side: int):
        """Guard the recovered field; returns (field, report dict with per-sample lists)."""
        out, rep = guard_field(phi)
        npx = float(np.prod(phi.shape[2:]))
        return out, {"method": self.mode, "side": side,
                     "folded_pct_before": [100.0 * c / npx for c in rep.folded_before],
                     "changed_pct": [100.0 * c / npx for c in rep.changed], "fallback_scale": rep.fallback,
                     "corrected_in_loop_px": self.step_folded}
