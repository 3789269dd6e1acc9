"""Training configuration: defaults, YAML loading, ``--set`` overrides, the model part as DRDMConfig.

Sections (every key is described in training/README.md): ``name``, ``model`` (any
:class:`~napari_drdm.core.config.DRDMConfig` field; unspecified ones take
``DRDMConfig.default(ndim)``), ``data``, ``augment``, ``loss``, ``optim``, ``train``,
``validation``, ``budget``.

A config file may start from another: ``base: general2d_s256_teacher.yaml`` (a path relative to
the file) takes that file, itself resolved the same way, and the keys given here replace its
keys.  A mapping replaces key by key (a key not given keeps the base's value; a list or value is
replaced whole), so a variant lists only what it changes.  The run folder's ``config.yaml`` is
always the resolved configuration, without ``base``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import yaml

from .classic_augment import AUGMENT_DEFAULTS, check_augment
from .data import ensure_core
from .evaluate_hook import VALIDATION_DEFAULTS, check_validation

ensure_core()

from napari_drdm.core.config import DRDMConfig  # noqa: E402

__all__ = ["DEFAULTS", "apply_overrides", "load_config", "model_config", "read_config_file"]

DEFAULTS: Dict[str, Any] = {
    "name": "run",
    "init": None,                           # start weights: a checkpoint file or a bundled name (fine-tuning)
    "init_weights": "raw",                  # init from a training checkpoint: raw | ema (its weight average)
    "init_inflate": "centre",               # 2D init of a 3D model: centre | spread (training/inflate.py)
    "model": {"ndim": 2, "size": 128},     # any DRDMConfig field; the rest are DRDMConfig.default(ndim)
    "data": {"kind": "kit", "kit_dir": "cache/kit", "prepared": None, "axes": [0, 1, 2],
             "min_foreground": 0.15, "bg_threshold": 0.08, "max_mb": 40, "max_upsample": 2.0,
             "n_synthetic": 64, "seed": 0},
    "augment": dict(AUGMENT_DEFAULTS),
    "loss": {"padding": "zeros", "image_padding": "zeros", "w_dist": 1.0, "w_ang": 1.0, "w_reg": 10.0, "true_negdet_weight": 0.1,
             "w_anchor": 0.0, "anchor": None,        # w_anchor * sum (theta - anchor)^2; anchor None: the init
             "w_teacher": 0.0, "teacher": None,      # training/pulls.py: a pull on the estimates; teacher None: the init
             "teacher_batch": 2, "teacher_augment": {},
             "teacher_edge_px": 0, "teacher_edge_floor": 0.5},  # the teacher's estimates tapered at the border
    "optim": {"lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 0, "grad_clip": 0.0,
              "head_init_scale": 1.0},
    "train": {"steps": 100000, "batch_size": 16, "seed": 0, "device": "auto", "amp": "auto", "threads": 0,
              "channels_last": "auto", "ema_decay": 0.0, "checkpoint_every": 500, "keep_checkpoints": 3, "log_every": 10,
              "overfit_batch": False},
    "validation": dict(VALIDATION_DEFAULTS),
    "budget": {"max_minutes": None},
}


# ------------------------------------------------------------------------------------- config
def _merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(cfg: Dict[str, Any], sets: Sequence[str]) -> Dict[str, Any]:
    """``["train.steps=2000", "budget.max_minutes=90"]`` -> cfg with those keys replaced (YAML values)."""
    cfg = copy.deepcopy(cfg)
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE (e.g. train.steps=1000), got {item!r}")
        key, val = item.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(val)
    return cfg


#: ``loss.image_padding``: how I_t = I_0 o psi_{t:1} is sampled outside the image in training
IMAGE_PADDINGS = ("zeros", "border")


def read_config_file(path, _chain: Sequence[Path] = ()) -> Dict[str, Any]:
    """The mapping of a YAML config file with its ``base:`` chain resolved (see the module docstring).

    Args:
        path: the YAML file.

    Raises:
        ValueError: one line naming the file, when it is not a mapping, its ``base`` is not a
            file name, the base file does not exist, or the chain of bases loops.
    """
    p = Path(path)
    key = p.resolve()
    if key in _chain:
        raise ValueError(f"{path}: the chain of 'base' files loops back to {p.name}")
    user = yaml.safe_load(p.read_text())
    if user is None:
        return {}
    if not isinstance(user, dict):
        raise ValueError(f"{path}: expected a mapping of config sections, got {type(user).__name__}")
    parent = user.pop("base", None)
    if parent is None:
        return user
    if not isinstance(parent, str) or not parent.strip():
        raise ValueError(f"{path}: base must be the file name of another config, got {parent!r}")
    bp = p.parent / parent
    if not bp.is_file():
        raise ValueError(f"{path}: base {parent!r} not found (looked for {bp})")
    return _merge(read_config_file(bp, tuple(_chain) + (key,)), user)


def load_config(path: Optional[str] = None, sets: Sequence[str] = (), base: Optional[Dict] = None) -> Dict[str, Any]:
    """DEFAULTS <- YAML file (its ``base:`` chain first) or ``base`` <- ``--set`` overrides; validated."""
    user = base if base is not None else (read_config_file(path) if path else {})
    if isinstance(user, dict) and "base" in user:
        raise ValueError("'base' names another config file; it is read from a config file only")
    cfg = apply_overrides(_merge(DEFAULTS, user or {}), sets)
    model_config(cfg)  # validates the model part
    ema = cfg["train"].get("ema_decay") or 0.0
    if not isinstance(ema, (int, float)) or isinstance(ema, bool) or not 0.0 <= float(ema) < 1.0:
        raise ValueError(f"train.ema_decay must be a number in [0, 1) (0: no weight average), got {ema!r}")
    if cfg.get("init_weights") not in ("raw", "ema"):
        raise ValueError(f"init_weights must be 'raw' or 'ema', got {cfg.get('init_weights')!r}")
    if cfg["data"]["kind"] not in ("kit", "synthetic"):
        raise ValueError(f"data.kind must be 'kit' or 'synthetic', got {cfg['data']['kind']!r}")
    if cfg["loss"].get("image_padding") not in IMAGE_PADDINGS:
        raise ValueError(f"loss.image_padding must be one of {list(IMAGE_PADDINGS)}, "
                         f"got {cfg['loss'].get('image_padding')!r}")
    check_augment(cfg["augment"])
    check_validation(cfg["validation"])
    from .pulls import check_teacher  # not at the top: pulls imports this module (through init_weights)
    check_teacher(cfg)
    return cfg


def model_config(cfg: Dict[str, Any]) -> DRDMConfig:
    """The ``model`` part of a training config as a :class:`DRDMConfig`."""
    m = dict(cfg["model"])
    ndim, size = int(m.pop("ndim", 2)), m.pop("size", None)
    unknown = sorted(set(m) - set(DRDMConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; valid: {sorted(DRDMConfig.__dataclass_fields__)}")
    mc = DRDMConfig.default(ndim, size=size).replace(**m)
    try:
        mc.field_factor()
    except (TypeError, ValueError):
        raise ValueError(f"model.field_scale must be 'reference', 'geometric' or a number, "
                         f"got {mc.field_scale!r}") from None
    return mc
