"""``python -m training soup``: the average of several weights files of one network (a "weight soup").

Fine-tunes that start from the same weights and differ in a loss weight or a seed usually stay in
one basin of the loss, where the average of their weights behaves like a model of its own, often
better than each of them on images none was trained on (Wortsman et al., 2022, "Model soups").
The average is taken tensor by tensor over floating-point tensors; every file must hold the same
tensors with the same shapes and describe the same network (``DRDMConfig`` fields that shape the
network or the forward process must agree).  The first file's configuration, inference settings
included, is the soup's; its provenance lists every ingredient with its sha256 and weight.

    python -m training soup --weights general2d cache/variants/a.safetensors cache/variants/b.safetensors \\
        --out cache/variants/soup.safetensors --note "..."
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .data import ensure_core

ensure_core()

import torch  # noqa: E402

from napari_drdm.checkpoint import file_sha256, read_checkpoint, write_checkpoint  # noqa: E402

__all__ = ["soup", "NETWORK_KEYS"]

#: configuration fields that must agree between the ingredients (the network and its forward process)
NETWORK_KEYS = ("ndim", "size", "n_steps", "in_channels", "channels", "time_dim", "control_grid", "scales", "sigma",
                "noise_ratio", "alpha", "beta", "max_compositions", "field_scale", "sampler_padding")


def _resolve(item: str) -> Path:
    """A weights file, or a bundled name's file (``napari_drdm.weights.resolve_weights``)."""
    from napari_drdm.weights import WeightsNotFoundError, resolve_weights
    try:
        return Path(resolve_weights(item)[0])
    except WeightsNotFoundError:
        raise FileNotFoundError(f"--weights {item}: no such file or bundled name") from None


def soup(items: Sequence[str], out, weights: Optional[Sequence[float]] = None, note: str = "",
         overwrite: bool = False, log=print) -> Dict[str, Any]:
    """Write the weighted average of the weights files ``items`` to ``out``; returns {"path", "sha256"}.

    Args:
        items: two or more ``.safetensors`` files or bundled names of one network.
        out: the file to write.
        weights: one positive number per item (normalised to sum 1); default: uniform.
        note: why the soup was made (kept in its provenance).
        overwrite: replace an existing ``out``.

    Raises:
        ValueError: fewer than two items, bad weights, or ingredients of different networks.
        FileNotFoundError / FileExistsError: an input is missing, or ``out`` exists.
    """
    if len(items) < 2:
        raise ValueError("--weights: give at least two weights files to average")
    w = [1.0] * len(items) if weights is None else [float(v) for v in weights]
    if len(w) != len(items) or any(not 0 < v < math.inf for v in w):
        raise ValueError(f"--coef: one positive finite number per weights file ({len(items)}), got {list(weights or [])}")
    total = sum(w)
    w = [v / total for v in w]
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"--out {dest} exists; pass --overwrite to replace it")
    paths = [_resolve(i) for i in items]
    first_state, cfg, first_prov = read_checkpoint(paths[0])
    acc = {k: (v.double() * w[0] if v.is_floating_point() else v.clone()) for k, v in first_state.items()}
    ingredients: List[Dict[str, Any]] = []
    for i, (item, path) in enumerate(zip(items, paths)):
        state, c, prov = read_checkpoint(path) if i else (first_state, cfg, first_prov)
        diff = [k for k in NETWORK_KEYS if getattr(c, k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"--weights {item}: another network than {items[0]} ({', '.join(diff)} differ)")
        if set(state) != set(acc) or any(state[k].shape != acc[k].shape for k in state):
            raise ValueError(f"--weights {item}: its tensors differ from those of {items[0]}")
        if i:
            for k, v in state.items():
                if v.is_floating_point():
                    acc[k] += v.double() * w[i]
                elif not torch.equal(v, acc[k]):
                    raise ValueError(f"--weights {item}: integer tensor {k} differs from {items[0]}'s")
        ingredients.append({"weights": str(item), "file": path.name, "sha256": file_sha256(path), "coef": w[i],
                            "init": (prov or {}).get("init"), "steps": (prov or {}).get("steps")})
    state = {k: (v.to(first_state[k].dtype) if first_state[k].is_floating_point() else v) for k, v in acc.items()}
    prov = {"soup_of": ingredients, "note": note.strip(), "by": "napari-drdm training/soup.py",
            "inference": "the first ingredient's configuration and inference settings"}
    sha = write_checkpoint(dest, state, cfg, prov, overwrite=True)
    log(f"wrote {dest} (sha256 {sha[:12]}): the average of " + ", ".join(
        f"{i} ({c:.3f})" for i, c in zip(items, w)))
    return {"path": str(dest), "sha256": sha}


def add_arguments(p) -> None:
    p.add_argument("--weights", nargs="+", required=True, help="two or more .safetensors files or bundled names")
    p.add_argument("--out", required=True, help="the soup's .safetensors file")
    p.add_argument("--coef", type=float, nargs="+", default=None, help="one weight per file (default: uniform)")
    p.add_argument("--note", default="", help="why (kept in the provenance)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    try:
        soup(args.weights, args.out, args.coef, args.note, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
