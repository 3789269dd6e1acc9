"""Register an exported model as one of the plugin's bundled weights.

``python -m training bundle --weights W.safetensors --name general3d --description "..." [--default]``

Copies the file to ``src/napari_drdm/weights/NAME.safetensors`` and writes its ``registry.json``
entry (sha256, ``ndim``, ``size``, description, aliases, and a provenance summary read from the
file's own record: what it was trained on, the starting weights, steps, hours, devices, the
command lines).  ``--default`` makes it the model used for its dimensionality when none is named
(the previous default keeps its entry).  Nothing registered is replaced without ``--replace``; the
file is strict-loaded into a fresh network first, and both writes are atomic.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .data import ensure_core

ensure_core()

from napari_drdm.checkpoint import file_sha256  # noqa: E402
from napari_drdm.io import atomic_write  # noqa: E402

__all__ = ["bundle_weights", "registry_provenance"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def registry_provenance(prov: Dict[str, Any]) -> Dict[str, Any]:
    """The short provenance record of a registry entry, from an exported file's full record."""
    data = prov.get("data") or {}
    init = prov.get("init") or {}
    out: Dict[str, Any] = {}
    counts = data.get("counts") or {}
    kind = data.get("kind") or "?"
    out["trained_on"] = (("napari-drdm data kit" if kind == "kit" else f"{kind} data")
                         + f", {counts.get('train', '?')} training images; prepared data sha256 "
                         + str(data.get("prepared_sha256") or "?")[:12])
    if init:
        out["init"] = f"{init.get('source', '?')} (sha256 {str(init.get('sha256') or '?')[:12]})"
    out["steps"] = int(prov.get("steps", 0))
    out["wall_time_h"] = round(float(prov.get("wall_time_s", 0.0)) / 3600.0, 2)
    if prov.get("weights") == "ema" and prov.get("ema"):
        e = prov["ema"]
        out["weights"] = f"the weight average (decay {e['decay']}, {e['updates']} updates)"
    elif prov.get("weights"):
        out["weights"] = "the trained weights"
    out["device"] = "; ".join(prov.get("devices") or []) + (f", torch {', '.join(prov['torch'])}"
                                                             if prov.get("torch") else "")
    if prov.get("commands"):
        out["command"] = " && ".join(prov["commands"])
    if data.get("prepared_sha256"):
        out["data_sha256"] = data["prepared_sha256"]
    return out


def bundle_weights(weights, name: str, description: str, aliases: Sequence[str] = (), default: bool = False,
                   replace: bool = False, weights_dir: Optional[Path] = None, log=print) -> Dict[str, Any]:
    """Copy ``weights`` into the bundled-weights folder and register it as ``name``.

    Args:
        weights: an exported ``.safetensors`` file (``python -m training export``).
        name: the bundled name users type (lower case, digits, ``_``; starts with a letter).
        description: the one-paragraph description ``drdm weights`` shows.
        aliases: other names for it; none may be another model's name or alias.
        default: make it the default model of its dimensionality (moved from the current one).
        replace: replace an existing entry of that name (and its file).
        weights_dir: the folder holding ``registry.json`` (default: the package's).

    Returns:
        the registry entry written.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: a bad name or alias, a name already registered (without ``replace``), an
            empty description, or weights that do not load into their own configuration.
    """
    from napari_drdm.weights import WEIGHTS_DIR

    from .export import check_loadable
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    src = Path(weights)
    if not src.is_file():
        raise FileNotFoundError(f"--weights {src}: no such file (an exported .safetensors was expected)")
    for word in (name, *aliases):
        if not _NAME.match(word):
            raise ValueError(f"{word!r}: a bundled name or alias is lower case letters, digits and _, "
                             "starting with a letter")
    if not description.strip():
        raise ValueError("--description: give the sentence `drdm weights` shows for this model")
    reg_file = wdir / "registry.json"
    reg: Dict[str, Any] = json.loads(reg_file.read_text()) if reg_file.exists() else {}
    if name in reg and not replace:
        raise ValueError(f"{name!r} is already bundled ({reg[name]['file']}); pass --replace to replace it")
    taken = {w: n for n, e in reg.items() if n != name for w in (n, *e.get("aliases", []))}
    for word in (name, *aliases):
        if word in taken:
            raise ValueError(f"{word!r} is already a name or alias of the bundled model {taken[word]!r}")
    try:
        cfg, prov, _ = check_loadable(src)
    except RuntimeError as e:
        raise ValueError(f"--weights {src}: the weights do not fit their own configuration: "
                         f"{str(e).splitlines()[0]}") from None
    dest = wdir / f"{name}.safetensors"
    old_file = reg.get(name, {}).get("file")
    if dest.exists() and not replace and old_file != dest.name:
        raise ValueError(f"{dest} exists and is not registered as {name!r}; remove it or pass --replace")
    if src.resolve() != dest.resolve():
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp), overwrite=True)
    entry: Dict[str, Any] = {
        "file": dest.name,
        "sha256": file_sha256(dest),
        "ndim": int(cfg.ndim),
        "size": int(cfg.size),
        "description": description.strip(),
        "aliases": list(aliases),
        "provenance": registry_provenance(prov),
    }
    if default:
        for other in reg.values():
            if other.get("default_for_ndim") == cfg.ndim:
                other.pop("default_for_ndim")
        entry["default_for_ndim"] = int(cfg.ndim)
    elif reg.get(name, {}).get("default_for_ndim"):
        entry["default_for_ndim"] = reg[name]["default_for_ndim"]
    reg[name] = entry                                # a replaced entry keeps its place
    text = json.dumps(reg, indent=2) + "\n"
    atomic_write(reg_file, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    if old_file and old_file != dest.name and (wdir / old_file).exists():
        (wdir / old_file).unlink()
    log(f"bundled {name} ({cfg.ndim}D, S={cfg.size}, sha256 {entry['sha256'][:12]}) as {dest}"
        + (f"; default for {cfg.ndim}D images" if entry.get("default_for_ndim") else ""))
    return entry


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, help="an exported .safetensors file (python -m training export)")
    p.add_argument("--name", required=True, help="the bundled name users type (e.g. general3d)")
    p.add_argument("--description", required=True, help="the description `drdm weights` shows")
    p.add_argument("--alias", action="append", default=[], help="another name for it (repeatable)")
    p.add_argument("--default", action="store_true", help="make it the default model of its dimensionality")
    p.add_argument("--replace", action="store_true", help="replace the entry (and file) of that name")
    p.add_argument("--weights-dir", default=None, help="the folder with registry.json (default: the package's)")


def run(args) -> int:
    import sys
    try:
        bundle_weights(args.weights, args.name, args.description, args.alias, args.default, args.replace,
                       Path(args.weights_dir) if args.weights_dir else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
