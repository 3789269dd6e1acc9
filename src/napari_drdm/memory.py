"""Memory before work starts: what is available, what generating one output needs, and a refusal
naming the option that would fit.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["available_memory", "estimate_export_bytes", "check_memory"]


def available_memory() -> int:
    """Bytes of memory available to a new allocation (``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


#: bytes per voxel of the input grid: the input, its float32 copy, the field and the sampling grid
#: (d floats each), the warp temporaries, the output and its NIfTI layout
def _input_grid_bytes(n_vox: int, ndim: int, itemsize: int, labels: bool, inverse: bool, pairs: bool) -> int:
    per = itemsize + 4 * (3 + 4 * ndim)
    if labels:
        per += 8 * 3 + 4 * ndim          # int64 copies and the nearest-neighbour grid
    if inverse:
        per += 4 * 4 * ndim
    if pairs:
        per += 4 * (2 + 3 * ndim)        # composed field, fixed image
    return int(n_vox * per)


def estimate_export_bytes(shape: Sequence[int], itemsize: int, model_size: int, channels: Sequence[int],
                          batch: int, labels: bool = False, inverse: bool = False, pairs: bool = False,
                          frames: int = 0) -> dict:
    """Peak memory of generating one output of an image, split by what drives it.

    Args:
        shape: the input's spatial shape.
        itemsize: bytes per input voxel.
        model_size: the model's side S.
        channels: the network's channel widths.
        batch: samples per network pass.
        labels: a label map is warped too.
        inverse: the inverse field is computed.
        pairs: Algorithm 4 (a second field, a composed one and a fixed image).
        frames: frames kept (the explorer); each holds a field and an image on the input grid.

    Returns:
        ``{"input_grid": bytes, "model_grid": bytes, "frames": bytes, "total": bytes}``.
    """
    nd = len(shape)
    n_vox = int(np.prod([int(s) for s in shape], dtype=np.int64))
    inp = _input_grid_bytes(n_vox, nd, itemsize, labels, inverse, pairs)
    s_vox = int(model_size) ** nd
    # network activations (encoder + decoder, kept for the skips) + fields and their warps per sample
    per_sample = s_vox * 4 * (3 * sum(int(c) for c in channels) + 12 * nd + 8)
    model = int(per_sample * max(1, int(batch)))
    fr = int(frames) * n_vox * 4 * (nd + 1)
    return {"input_grid": inp, "model_grid": model, "frames": fr, "total": inp + model + fr}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def check_memory(est: dict, budget: int, what: str, batch: Optional[int] = None,
                 frames: Optional[int] = None) -> None:
    """Refuse before work when ``est`` (from :func:`estimate_export_bytes`) exceeds ``budget``.

    The message names the option that would fit: a smaller ``--batch``, fewer frames, or, when
    the input grid alone is too large, a downsampled input.

    Args:
        est: the estimate.
        budget: bytes available (``available_memory()`` or ``--max-memory``).
        what: the input, for the message.
        batch: the batch size used in ``est`` (to suggest a smaller one).
        frames: the number of frames kept in ``est`` (to suggest fewer).

    Raises:
        MemoryError: one line naming the input, the estimate, the budget and what to change.
    """
    if est["total"] <= budget:
        return
    fixed = est["input_grid"]
    hint = ""
    if batch and batch > 1:
        per = est["model_grid"] / batch
        fit = int((budget - fixed - est["frames"]) // per) if per else batch
        if 1 <= fit < batch:
            hint = f"; --batch {fit} would fit"
    if not hint and frames:
        per = est["frames"] / frames
        fit = int((budget - fixed - est["model_grid"]) // per) if per else frames
        if 0 <= fit < frames:
            hint = f"; keeping {fit} frames would fit"
    if not hint:
        if fixed + est["model_grid"] / max(1, batch or 1) > budget:
            hint = "; downsample or crop the image (or use a model with a smaller grid S) or use a machine " \
                   "with more memory"
        else:
            hint = "; use --batch 1"
    raise MemoryError(f"{what}: needs about {_gb(est['total'])} of memory (input grid {_gb(fixed)}, model grid "
                      f"{_gb(est['model_grid'])}{', frames ' + _gb(est['frames']) if est['frames'] else ''}) but "
                      f"{_gb(budget)} is available{hint}")
