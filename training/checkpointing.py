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

__all__ = ["CKPT_FORMAT", "checkpoint_path", "latest_checkpoint", "load_training_checkpoint", "save_atomic", "plain", "git_commit",
           "compact_checkpoint"]

CKPT_FORMAT = "napari-drdm-train/1"


def checkpoint_path(run_dir, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in a run: ``run_dir/checkpoints/step_XXXXXXXX.pt``."""
    return Path(run_dir) / "checkpoints" / f"step_{int(step):08d}.pt"


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


def _write_atomic(obj: Dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file beside it (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def save_atomic(obj: Dict[str, Any], path: Path, keep: int):
    """Write ``obj`` to ``path`` through a temporary file, then keep only the newest ``keep`` checkpoints."""
    _write_atomic(obj, path)
    for old in sorted(path.parent.glob("step_*.pt"))[:-max(int(keep), 1)]:
        old.unlink()


def compact_checkpoint(src, dst, overwrite: bool = False) -> Dict[str, Any]:
    """Write a copy of a training checkpoint whose weight average is stored in float16.

    For committing a run to a repository with a per-file size limit: the trained weights, the
    optimiser and every random state stay exact (a resume continues the training bit for bit);
    only the average's tensors are rounded to float16 (relative error <= 2^-11, about 0.05 %),
    which halves their size.  On resume the average is read back into float32 and continues from
    there (``training/ema.py``; the run says it resumed from a float16 copy).

    Args:
        src: a ``step_*.pt`` of this trainer.
        dst: the file to write (its folder is created); an existing file is replaced only with
            ``overwrite``.
        overwrite: replace ``dst``.

    Returns:
        ``{"src_bytes", "dst_bytes", "ema_updates"}`` (``ema_updates`` None: no average to compact).
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite to replace it)")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: write the compact copy to another file than its source")
    ck = load_training_checkpoint(src)
    ema = ck.get("ema")
    if ema:
        ema = dict(ema)
        ema["state"] = {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in ema["state"].items()}
        ema["stored_dtype"] = "float16"
        ck["ema"] = ema
    _write_atomic(ck, dst)
    return {"src_bytes": src.stat().st_size, "dst_bytes": dst.stat().st_size,
            "ema_updates": int(ema["updates"]) if ema else None}


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
