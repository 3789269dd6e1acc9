"""Registry of bundled weights: ``registry.json`` beside this file maps names to files.

Each entry: ``file`` (relative to this folder), ``sha256``, ``ndim``, ``size``, ``description``,
``aliases``, ``provenance`` (how it was trained) and, on the best model of each dimensionality,
``default_for_ndim`` (2 or 3): the model used when none is named.  ``NAPARI_DRDM_WEIGHTS_DIR``
(os.pathsep-separated; read by :mod:`napari_drdm.core.environment`) adds folders whose
``*.safetensors`` files are also loadable by their stem name.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..errors import InputError, WeightsNotFoundError

__all__ = ["registry", "resolve_weights", "list_weights", "default_weights", "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).resolve().parent


def registry() -> Dict[str, dict]:
    reg_file = WEIGHTS_DIR / "registry.json"
    if not reg_file.exists():
        return {}
    with open(reg_file) as f:
        return json.load(f)


def _extra_dirs() -> List[Path]:
    from ..core.environment import get
    env = get("WEIGHTS_DIR", "")
    return [Path(p) for p in env.split(os.pathsep) if p]


def default_weights(ndim: int) -> str:
    """Name of the bundled model used for ``ndim``-dimensional images when none is named.

    Args:
        ndim: 2 or 3.

    Raises:
        InputError: ``ndim`` is not 2 or 3.
        WeightsNotFoundError: no bundled model is marked as the default for ``ndim``.
    """
    if ndim not in (2, 3):
        raise InputError(f"images must be 2D or 3D for a default model, got {ndim}D")
    for name, entry in registry().items():
        if entry.get("default_for_ndim") == ndim:
            return name
    raise WeightsNotFoundError(f"no bundled {ndim}D model is marked as the default; pass weights explicitly "
                      f"(see `drdm weights`)")


#: the configuration fields that say how a model generates (``drdm weights`` lists them)
INFERENCE_KEYS = ("schedule", "loop_extra", "k_recursions", "compose_padding", "input_padding", "background_margin",
                  "anatomy_fit", "keep_size")


def inference_settings(path) -> Optional[Dict[str, object]]:
    """The generation settings a ``.safetensors`` file stores (:data:`INFERENCE_KEYS`), read from its
    metadata without loading the tensors; None when the file has none or cannot be read."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        from ..core.config import DRDMConfig
        cfg = DRDMConfig.from_dict(json.loads(meta["drdm_config"]))
    except Exception:        # a foreign or damaged file: listed without them (loading it says why)
        return None
    return {k: getattr(cfg, k) for k in INFERENCE_KEYS}


def list_weights() -> List[dict]:
    """Bundled and user-folder weights, one dict per model (``inference``: the generation settings
    the file stores, :func:`inference_settings`)."""
    out = []
    for name, entry in registry().items():
        path = WEIGHTS_DIR / entry["file"]
        e = dict(entry, name=name, path=str(path), bundled=True,
                 default=entry.get("default_for_ndim") is not None, inference=inference_settings(path))
        out.append(e)
    for d in _extra_dirs():
        for p in sorted(d.glob("*.safetensors")):
            out.append({"name": p.stem, "path": str(p), "bundled": False, "inference": inference_settings(p)})
    return out


def resolve_weights(name_or_path: Union[str, Path]) -> Tuple[Path, str]:
    """A checkpoint path and a display name for a bundled name, alias or file path.

    Args:
        name_or_path: a bundled name or alias, the stem of a ``*.safetensors`` file in a folder of
            the weights-folder setting, or a path to a weights file.

    Raises:
        WeightsNotFoundError: an unknown name, or a path that does not exist.
    """
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.suffix.lower() in (".safetensors", ".pth", ".pt") or os.sep in s or p.exists():
        if not p.exists():
            raise WeightsNotFoundError(f"weights file not found: {p}")
        return p, p.stem
    reg = registry()
    for name, entry in reg.items():
        if s == name or s in entry.get("aliases", []):
            path = WEIGHTS_DIR / entry["file"]
            if not path.exists():
                raise WeightsNotFoundError(f"bundled weights {name!r} are registered but {path} is missing "
                                           f"(a broken installation?)")
            return path, name
    for d in _extra_dirs():
        cand = d / f"{s}.safetensors"
        if cand.exists():
            return cand, s
    known = sorted(list(reg) + [a for e in reg.values() for a in e.get("aliases", [])])
    raise WeightsNotFoundError(f"unknown weights {s!r}: not a file and not a bundled name; known names: "
                   f"{', '.join(known) or '(none bundled)'}")
