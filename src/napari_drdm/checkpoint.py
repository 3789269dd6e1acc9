"""Checkpoint files: safe to load (never executes code), carrying their configuration.

Formats recognised by :func:`read_checkpoint`:

* ``.safetensors`` written by :func:`write_checkpoint` (the project's format): tensors plus
  metadata ``drdm_config`` (JSON of :class:`~napari_drdm.core.config.DRDMConfig`) and
  ``provenance`` (JSON: data hashes, command, steps, wall time...).
* ``.pth``/``.pt``: loaded with ``torch.load(weights_only=True)``; either a plain state_dict in the
  reference implementation's naming (the authors' published checkpoints; 2D or 3D is read from
  the tensor shapes) or a dict ``{"state_dict": ..., "config": {...}}``.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .core.config import DRDMConfig
from .errors import CheckpointError, WeightsNotFoundError

__all__ = ["CheckpointError", "check_finite_state", "read_checkpoint", "write_checkpoint", "file_sha256", "infer_reference_config"]


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def check_finite_state(state: Dict[str, torch.Tensor], path="weights") -> None:
    """Refuse weights holding NaN or infinite values (a diverged training run or a corrupt file).

    Args:
        state: the state_dict.
        path: the file, for the message.

    Raises:
        CheckpointError: naming the file and the first non-finite tensor.
    """
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} holds {n} NaN or infinite values; the weights are "
                                  f"unusable (corrupt file or diverged training)")


def infer_reference_config(state: Dict[str, torch.Tensor], size: Optional[int] = None) -> DRDMConfig:
    """Config for a reference-format state_dict (dimension and widths from tensor shapes)."""
    try:
        w0 = state["b1.0.conv0.weight"]
        temb = state["time_embed.weight"]
        head = state["conv_out.weight"]
    except KeyError as e:
        raise CheckpointError(f"not a DRDM network state_dict: missing tensor {e.args[0]!r}") from None
    ndim = w0.dim() - 2
    if ndim not in (2, 3) or head.shape[0] != ndim:
        raise CheckpointError(f"unexpected network shapes: b1.0.conv0.weight {tuple(w0.shape)}, "
                              f"conv_out.weight {tuple(head.shape)}")
    chans = (int(w0.shape[0]), int(state["b2.0.conv0.weight"].shape[0]), int(state["b3.0.conv0.weight"].shape[0]))
    cfg = DRDMConfig.default(ndim, size=size, n_steps=int(temb.shape[0]), time_dim=int(temb.shape[1]),
                             in_channels=int(w0.shape[1]), channels=chans)
    cfg.extra = {"source": "reference-format state_dict"}
    return cfg


def read_checkpoint(path, size: Optional[int] = None) -> Tuple[Dict[str, torch.Tensor], DRDMConfig, Dict[str, Any]]:
    """Return (state_dict, config, provenance) from a weights file, without executing code.

    Args:
        path: a ``.safetensors``, ``.pth`` or ``.pt`` file.
        size: the model side S to record in the config (None: the file's own).

    Raises:
        WeightsNotFoundError: the file does not exist.
        CheckpointError: the file is corrupt, needs code to load, or holds no DRDM network.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsNotFoundError(f"weights file not found: {p}")
    if not p.is_file():
        raise WeightsNotFoundError(f"weights path is not a file: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(p), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {p} as safetensors: {e}") from None
        if "drdm_config" not in meta:
            cfg = infer_reference_config(state, size)
        else:
            try:
                cfg = DRDMConfig.from_dict(json.loads(meta["drdm_config"]))
            except Exception as e:
                raise CheckpointError(f"{p}: invalid drdm_config metadata: {e}") from None
        prov = json.loads(meta.get("provenance", "{}"))
        return state, cfg, prov
    try:
        with warnings.catch_warnings():      # torch warns about pickle protocols on stderr: the error says it all
            warnings.simplefilter("ignore")
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"cannot read {p} as a PyTorch weights file: it is corrupt or not a weights file, or it "
                              f"holds objects that need code to load (read with weights_only=True: weights never run "
                              f"code)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict) \
            and all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values()):
        state = obj["state_dict"]
        if isinstance(obj.get("config"), dict):
            try:
                cfg = DRDMConfig.from_dict(obj["config"])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{p}: invalid config: {e}") from None
        else:
            cfg = infer_reference_config(state, size)
        prov = obj.get("provenance", {}) if isinstance(obj.get("provenance"), dict) else {}
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
        cfg = infer_reference_config(state, size)
        prov = {"format": "reference state_dict"}
    else:
        raise CheckpointError(f"{p} does not hold a DRDM state_dict (found {type(obj).__name__})")
    if size is not None:
        cfg.size = int(size)
    return state, cfg, prov


def write_checkpoint(path, state: Dict[str, torch.Tensor], config: DRDMConfig,
                     provenance: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> str:
    """Write a self-describing ``.safetensors`` checkpoint atomically; returns its sha256."""
    from safetensors.torch import save_file
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"drdm_config": config.to_json(), "provenance": json.dumps(provenance or {}, sort_keys=True),
            "format": "napari-drdm/1"}
    tmp = p.with_name(p.name + ".part")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return file_sha256(p)
