"""Environment variables: every setting the package reads from the environment, in one place.

All names share the prefix ``NAPARI_DRDM_`` (the package's name).  A few settings were once read
under a shorter ``DRDM_`` prefix; those old names still work, with a one-time message (a
``FutureWarning``) saying which name to use instead.  When both are set, the new name wins.

Values are read at each call (never cached), so a test or a long-lived viewer sees a change at
once.  :data:`VARIABLES` documents each one; :func:`describe` lists them with their current values
(``drdm info`` shows it).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

__all__ = ["PREFIX", "Variable", "VARIABLES", "get", "flag", "describe"]

#: prefix of every variable
PREFIX = "NAPARI_DRDM_"


@dataclass(frozen=True)
class Variable:
    """One setting: its key (the name without :data:`PREFIX`), what it does, and an old name."""

    key: str
    help: str
    legacy: Optional[str] = None         # deprecated full name still read

    @property
    def name(self) -> str:
        return PREFIX + self.key


VARIABLES: Dict[str, Variable] = {v.key: v for v in (
    Variable("WEIGHTS_DIR", "extra folders (os.pathsep-separated) whose *.safetensors files load by their stem name",
             legacy="DRDM_WEIGHTS_DIR"),
    Variable("CACHE", "cache folder for the native kernels and the autotuner (default ~/.cache/napari-drdm)"),
    Variable("NATIVE", "1 forces the native C kernels on, 0 off (default: measured per shape)"),
    Variable("AUTOTUNE", "0 turns measuring off (the CPU-flag rule decides the CPU path)"),
    Variable("AUTOTUNE_FILE", "file holding the autotuner's decisions (default: autotune.json in the cache)"),
    Variable("KIT_CACHE", "download cache of the training data kit (default ~/.cache/napari-drdm/kit)",
             legacy="DRDM_CACHE"),
    Variable("REFERENCE_DIR", "folder of the reference arrays used by the golden tests and benchmarks",
             legacy="DRDM_REFERENCE_DIR"),
)}

_warned: set = set()
_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")


def _variable(key: str) -> Variable:
    try:
        return VARIABLES[key]
    except KeyError:
        raise LookupError(f"{PREFIX}{key} is not a napari-drdm setting; known: "
                          f"{', '.join(v.name for v in VARIABLES.values())}") from None


def _read(var: Variable):
    """(value, name it came from) of a variable, without any message; (None, None) when unset."""
    for name in (var.name, var.legacy):
        if name and os.environ.get(name):
            return os.environ[name], name
    return None, None


def get(key: str, default: Optional[str] = None) -> Optional[str]:
    """The value of ``NAPARI_DRDM_<key>`` (or of its deprecated old name), else ``default``.

    An empty value counts as unset.  Reading a value from an old name warns once per process.

    Args:
        key: the name without the prefix, e.g. ``"WEIGHTS_DIR"`` (one of :data:`VARIABLES`).
        default: returned when the variable is unset or empty.
    """
    var = _variable(key)
    value, name = _read(var)
    if value is None:
        return default
    if name != var.name and name not in _warned:
        _warned.add(name)
        warnings.warn(f"the environment variable {name} is deprecated: set {var.name} instead (it is read for now)",
                      FutureWarning, stacklevel=2)
    return value


def flag(key: str) -> Optional[bool]:
    """A yes/no setting: True for 1/on/true/yes, False for 0/off/false/no, None when unset or other.

    Args:
        key: the name without the prefix (one of :data:`VARIABLES`).
    """
    v = (get(key) or "").strip().lower()
    return True if v in _TRUE else False if v in _FALSE else None


def describe() -> List[dict]:
    """Every setting with its current value (None when unset), for ``drdm info``."""
    out = []
    for var in VARIABLES.values():
        value, name = _read(var)
        out.append({"name": var.name, "value": value, "set_as": name, "legacy": var.legacy, "help": var.help})
    return out
