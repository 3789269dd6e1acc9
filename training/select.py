"""``python -m training select``: rank a run's checkpoints on its validation.

A fine-tune's weights wander from checkpoint to checkpoint by more than the held-out tables can
tell apart (docs/weights.md, sessions 21-22), so measuring only the last state leaves good states
unused.  ``select`` validates the checkpoints asked for (each one's weight average by default) on
the run's validation images with the settings given (``--set``, as ``validate`` takes them; e.g.
the engine's inference settings and more images), ranks them by one figure, lowest first, and
prints the ranking; ``--json`` keeps it, ``--append`` adds each validation to the run's log so the
learning curves show it.  No held-out image is read: the held-out tables then measure only the
state it picks.

    python -m training select --run runs/general2d_s256_teacher_self2 --steps 1050 1350 1650 --threads 1 \\
        --by T45/cues/reference/max_disp_pct --set validation.n_images=8 --set validation.anatomy_fit=16 \\
        --set validation.background_margin=8 --set "validation.t_primes=[45]" --json cache/select.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["select_checkpoints", "checkpoint_paths"]


def checkpoint_paths(run_dir, steps: Sequence[int] = (), checkpoints: Sequence[str] = ()) -> List[Path]:
    """The checkpoint files asked for: ``steps`` of the run (``checkpoints/step_XXXXXXXX.pt``) and
    ``checkpoints`` given as paths; every one must exist (one line naming the first missing)."""
    from .checkpointing import checkpoint_path
    paths = [checkpoint_path(run_dir, s) for s in steps] + [Path(c) for c in checkpoints]
    if not paths:
        raise ValueError("select needs --steps or --checkpoints (at least one checkpoint)")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such checkpoint")
    return paths


def select_checkpoints(run_dir, paths: Sequence[Path], by: str, weights: str = "ema", sets: Sequence[str] = (),
                       append: bool = False, device: Optional[str] = None, log=print) -> Dict[str, Any]:
    """Validate each checkpoint and rank them by ``by``, lowest first.

    Args:
        run_dir: the run folder (its ``config.yaml``).
        paths: the checkpoints (:func:`checkpoint_paths`).
        by: the validation figure without its ``val/`` or ``val_ema/`` prefix, e.g.
            ``T45/cues/reference/max_disp_pct``.
        weights: ``ema`` (the weight average), ``raw`` or ``auto`` (see ``training.export.pick_weights``).
        sets: validation overrides, as ``python -m training validate --set`` takes them.
        append: add each validation to the run's ``train_log.jsonl``.
        device: ``cpu``/``cuda`` (default: CUDA when present).

    Returns:
        ``{"run", "by", "weights", "overrides", "ranking": [{"checkpoint", "step", "weights", "value",
        "figures"}...], "best"}``; ``ranking`` is sorted by ``value``.

    Raises:
        ValueError: ``by`` is not a figure of the validation (the message lists the ones there are).
    """
    from .export import validate_run
    rows = []
    for p in paths:
        row = validate_run(run_dir, None, str(p), weights, append, None, device, log=log, sets=sets)
        prefix = "val_ema/" if row["weights"] == "ema" else "val/"
        figures = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
        if by not in figures:
            raise ValueError(f"--by {by!r} is not a validation figure here; there are: {', '.join(sorted(figures))}")
        rows.append({"checkpoint": str(p), "step": int(row["step"]), "weights": row["weights"],
                     "value": float(figures[by]), "figures": figures})
    ranking = sorted(rows, key=lambda r: r["value"])
    return {"run": str(run_dir), "by": by, "weights": weights, "overrides": list(sets), "ranking": ranking,
            "best": ranking[0]["checkpoint"]}


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory (its config.yaml gives the images and settings)")
    p.add_argument("--steps", type=int, nargs="*", default=[], help="checkpoints of the run, by step")
    p.add_argument("--checkpoints", nargs="*", default=[], help="checkpoint files (step_*.pt)")
    p.add_argument("--by", default="T45/reference/max_disp_pct",
                   help="the figure to rank by, lowest first (without val/ or val_ema/; default %(default)s)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="ema",
                   help="each checkpoint's weight average (default), trained weights, or auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="validation settings for these validations, as validate takes them; repeatable")
    p.add_argument("--append", action="store_true", help="add each validation to the run's train_log.jsonl")
    p.add_argument("--json", default=None, metavar="FILE", help="write the ranking here (an existing file is kept)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")


def run(args) -> int:
    from .init_weights import InitError
    if args.json and Path(args.json).exists():
        print(f"error: --json {args.json} exists; choose another file or remove it", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        paths = checkpoint_paths(args.run, args.steps, args.checkpoints)
        res = select_checkpoints(args.run, paths, args.by, args.weights, args.set, args.append, args.device)
    except (FileNotFoundError, ValueError, InitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ranked by {res['by']} ({res['weights']} weights), lowest first:")
    for r in res["ranking"]:
        print(f"  step {r['step']:>7}  {r['value']:8.3f}  {r['checkpoint']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0
