"""Training checkpoints on disk: the format tag, finding the latest, reading, writing atomically.

A checkpoint is ``RUN/checkpoints/step_XXXXXXXX.pt``: a dict tagged ``format: CKPT_FORMAT`` holding
tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it (no pickled
objects, no code).  :func:`plain` makes a value of that kind; the trainer assembles the dict.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import torch

__all__ = ["CKPT_FORMAT", "latest_checkpoint", "load_training_checkpoint", "save_atomic", "plain", "git_commit"]

CKPT_FORMAT = "napari-drdm-train/1"


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The checkpoint of the highest step in ``run_dir/checkpoints``, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    return ckpts[-1] if ckpts else None


def load_training_checkpoint(path) -> Dict[str, Any]:
    """Read a checkpoint of this trainer (``weights_only``); ValueError for any other file."""
    ck = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this trainer")
    return ck


def save_atomic(obj: Dict[str, Any], path: Path, keep: int):
    """Write ``obj`` to ``path`` through a temporary file, then keep only the newest ``keep`` checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-max(int(keep), 1)]:
        old.unlink()


def plain(o):
    """Plain Python values only (what torch.load(weights_only=True) accepts besides tensors)."""
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [plain(v) for v in o]
    if isinstance(o, torch.Tensor) or o is None:
        return o
    for kind in (bool, int, float, str):
        if isinstance(o, kind):
            return kind(o)
    return o.item() if hasattr(o, "item") else str(o)


def git_commit() -> Optional[str]:
    """The repository's HEAD (``+dirty`` when src/ or training/ have changes), recorded in the run history."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "training"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None
