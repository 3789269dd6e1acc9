"""Starting weights of a training run (``init``) and the initial scale of the output head.

``init`` fine-tunes from a weights file, a training checkpoint or a bundled model (2D weights may
seed a 3D network, training/inflate.py); without it, ``optim.head_init_scale`` shrinks the fresh
network's output convolution.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from .checkpointing import load_training_checkpoint
from .data import ensure_core
from .settings import model_config

ensure_core()

from napari_drdm.core.network import DRDMNet  # noqa: E402

__all__ = ["InitError", "load_init", "scale_head"]


class InitError(ValueError):
    """Starting weights (``init``) that cannot seed the configured network."""


def load_init(model: DRDMNet, source, inflate: str = "centre", weights: str = "raw") -> Dict[str, Any]:
    """Load starting weights into ``model`` (strict: every tensor present, same shapes).

    Args:
        model: the freshly built network of the run's ``model`` configuration.
        source: a weights file (``.safetensors``, reference ``.pth``, or a training checkpoint
            ``step_*.pt``) or the name of a bundled model (``cmr2d``, ``brain2d``...).
        inflate: how 2D weights seed a 3D model (``init_inflate``: ``centre`` or ``spread``,
            training/inflate.py).
        weights: for a training checkpoint, ``raw`` (the trained weights) or ``ema`` (its weight
            average; ``init_weights`` in the configuration).  Weights files hold one set.

    Returns:
        The provenance of the starting weights (source, sha256, their own config and provenance),
        stored in every checkpoint of the run and carried into the export.
    """
    from napari_drdm.checkpoint import CheckpointError, file_sha256, read_checkpoint
    path = Path(str(source))
    if not path.exists():
        try:
            from napari_drdm.weights import resolve_weights
            path = Path(resolve_weights(str(source))[0])
        except (LookupError, OSError):
            raise InitError(f"init: {source!r} is neither a weights file nor a bundled model name") from None
    try:
        if path.suffix == ".pt" and path.name.startswith("step_"):
            ck = load_training_checkpoint(path)
            if weights == "ema" and not ck.get("ema"):
                raise InitError(f"init: {path} holds no weight average (init_weights: ema); use init_weights: raw")
            state = ck["ema"]["state"] if weights == "ema" else ck["model"]
            icfg = model_config(ck["config"]).to_dict()
            iprov = {"training_checkpoint": path.name, "steps": int(ck["step"]), "weights": weights}
        else:
            state, c, iprov = read_checkpoint(path)
            icfg = c.to_dict()
    except CheckpointError as e:
        raise InitError(f"init: {e}") from None
    own = model.state_dict()
    head = state.get("conv_out.weight")
    if model.ndim == 3 and head is not None and head.dim() == 4:       # 2D weights for a 3D model
        from .inflate import inflate_state_dict
        try:
            state = inflate_state_dict(state, model, inflate)
        except ValueError as e:
            raise InitError(f"init: {path} cannot be inflated to the configured 3D network: {e}") from None
        iprov = dict(iprov, inflated_2d_to_3d=inflate)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        parts = ([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {unexpected[:3]}"] if unexpected
                                                                    else []) + ([f"shape {bad[:3]}"] if bad else [])
        raise InitError(f"init: {path} does not fit the configured network (model.ndim/channels/n_steps): "
                        + "; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return {"source": str(source), "file": path.name, "sha256": file_sha256(path), "config": icfg,
            "provenance": iprov}


def scale_head(model: DRDMNet, scale: float):
    """Multiply the output convolution's initial weights and bias by ``scale`` (``optim.head_init_scale``).

    With PyTorch's default initialisation the untrained network predicts displacements of tens of
    pixels while one forward step moves pixels by less than two: the ``dist`` ratio starts near
    1e4 and the first thousands of steps only shrink the output, with gradient-norm spikes of
    1e5-1e8.  A small head (1e-3) starts the ratio at 1 (the "predict nothing" solution) and keeps
    the gradient norm near 1e3 (training/README.md, "Initialisation").  1.0 leaves the default.
    """
    if scale != 1.0:
        with torch.no_grad():
            model.conv_out.weight.mul_(scale)
            model.conv_out.bias.mul_(scale)
