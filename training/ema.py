"""An exponential moving average of the network's weights (``train.ema_decay``).

After every optimiser step the averaged copy moves towards the trained weights:
``w_avg <- decay * w_avg + (1 - decay) * w`` for every floating-point tensor of the state dict
(the frozen time table included; it never changes).  The average forgets with a half-life of
``ln 2 / -ln(decay)`` steps: 69 for 0.99, 138 for 0.995, 693 for 0.999.

Why: on two CPU cores the batches are tiny (2-8 images), so each Adam step moves the weights by
a noisy amount, and the reverse loop (T' network calls, each composed into the field) amplifies
that noise (SPEC section 6: the loop is chaotic).  Averaging the weights over the last few hundred
steps removes most of the step-to-step noise without changing what is learned.  Diffusion
trainers commonly generate with such an average.

There is no warm-up: the average starts as a copy of the weights at the step it was switched on
(for a fine-tuning run, the starting weights; for a resumed run, the weights it resumed with), so
early on it leans towards them.  That is what fine-tuning wants; for a run from scratch, switch it
on after the first few thousand steps (resume with ``--set train.ema_decay=0.999``).

The average lives on the main process only (every rank holds the same weights); it is saved in
the checkpoint (``"ema"``), validated beside the trained weights (``val_ema/...`` keys in the log)
and exported by default (``python -m training export --weights ema|raw``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional

import torch

__all__ = ["WeightAverage", "half_life", "start_average", "validation_weights"]


def half_life(decay: float) -> float:
    """Steps after which a weight's share in the average has halved (inf for decay 1)."""
    return math.log(0.5) / math.log(decay) if 0.0 < decay < 1.0 else math.inf


class WeightAverage:
    """The averaged copy of ``model`` (its own module, in eval mode, without gradients).

    Args:
        model: the network being trained (unwrapped, not the DistributedDataParallel wrapper).
        decay: the averaging factor in (0, 1).
        updates: how many updates the average already holds (for the log and the provenance).
    """

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        decay = float(decay)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) (0 switches it off), got {decay!r}")
        self.decay, self.updates, self.start_updates = decay, int(updates), int(updates)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One averaging step towards ``model``'s current weights."""
        src = model.state_dict()
        for name, avg in self.module.state_dict().items():
            cur = src[name]
            if avg.is_floating_point():
                avg.lerp_(cur.to(avg.dtype), 1.0 - self.decay)
            else:
                avg.copy_(cur)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state": self.module.state_dict()}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Restore a saved average (its own decay is kept only if none was configured)."""
        self.module.load_state_dict(sd["state"])
        self.updates = self.start_updates = int(sd.get("updates", 0))


def start_average(tcfg, model, ck, step: int, main: bool, say) -> Optional[WeightAverage]:
    """The run's :class:`WeightAverage` (main process, ``train.ema_decay`` > 0), restored from the
    checkpoint ``ck`` or started from ``model``'s weights at ``step``; None otherwise."""
    decay = float(tcfg.get("ema_decay") or 0.0)
    saved = ck.get("ema") if ck is not None else None
    if decay <= 0.0:
        if saved:
            say(f"note: the checkpoint's weight average ({saved['updates']} updates) is not continued "
                "(train.ema_decay is 0)")
        return None
    if not main:
        return None
    ema = WeightAverage(model, decay)
    if saved:
        ema.load_state_dict(saved)
        if float(saved["decay"]) != decay:
            say(f"weight average: decay {float(saved['decay']):g} -> {decay:g} (train.ema_decay)")
        stored = f", from its {saved['stored_dtype']} copy" if saved.get("stored_dtype") else ""
        say(f"weight average resumed ({ema.updates} updates, decay {decay:g}{stored})")
    else:
        say(f"weight average starts at step {step} (decay {decay:g}, half-life {half_life(decay):.0f} steps)")
    return ema


def validation_weights(vcfg, ema) -> List[str]:
    """Which weights a validation runs on: ``validation.weights`` (``auto``: both when averaging)."""
    want = vcfg.get("weights", "auto")
    if want in (None, "auto"):
        return ["raw", "ema"] if ema is not None else ["raw"]
    want = [want] if isinstance(want, str) else list(want)
    bad = sorted(set(want) - {"raw", "ema"})
    if bad:
        raise ValueError(f"validation.weights must be auto, raw, ema or a list of them, got {bad}")
    return [w for w in want if w == "raw" or ema is not None]
