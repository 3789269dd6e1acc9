"""Change a weights file's inference settings, keeping its network, and record why.

``python -m training set-inference --weights brain3d --background-margin 2 --measured "..."``

The settings a model carries that only change how generation runs, not the network: the reverse
loop (its schedule, and where the paper loop starts), its composition padding, the mirrored frame
around the network's input, the background margin (core/background.py), the anatomy fit
(core/view.py) and the keep-size step (core/keep_size.py).  The weights are strict-loaded into their
own configuration with the new values first; the file's provenance gets one ``inference_changes``
entry per changed setting (from, to, and the measurement that chose it).  A bundled name (``drdm
weights``) is changed in place and its ``registry.json`` entry follows (sha256, and the setting in
its provenance); a file is written to ``--out`` (an existing one only with ``--overwrite``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .data import ensure_core

ensure_core()

from napari_drdm.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from napari_drdm.core.config import (  # noqa: E402
    BACKGROUND_OFF,
    COMPOSE_PADDINGS,
    SCHEDULE_NAMES,
    Schedule,
    check_loop_extra,
    keep_size_name,
    margin_as_option,
)
from napari_drdm.io import atomic_write  # noqa: E402
from napari_drdm.validate import (  # noqa: E402
    check_anatomy_fit_option,
    check_background_margin_option,
    check_compose_padding,
    check_input_padding_option,
    check_keep_size_option,
)

__all__ = ["INFERENCE_SETTINGS", "set_inference"]

#: the configuration fields this command may change (none of them changes the network)
INFERENCE_SETTINGS = ("schedule", "loop_extra", "compose_padding", "input_padding", "background_margin", "anatomy_fit",
                      "keep_size")
#: the settings whose "off" is None in a configuration
_OFF_IS_NONE = ("background_margin", "anatomy_fit")


def set_inference(weights, changes: Dict[str, Any], measured: str, out=None, overwrite: bool = False,
                  weights_dir: Optional[Path] = None, log=print) -> Dict[str, Any]:
    """Write ``weights`` with the inference settings in ``changes``; returns {"path", "sha256", "changed"}.

    Args:
        weights: a ``.safetensors`` file, or a bundled name (changed in place, registry included).
        changes: setting -> new value, settings from :data:`INFERENCE_SETTINGS`
            (``background_margin``, ``anatomy_fit``: pixels, or None / "off" for none; ``keep_size``:
            "on" / "off" or a bool; ``schedule``: "paper" / "reference"; ``loop_extra``: steps the
            paper loop starts above T', 0 to T).
        measured: what chose the new values (a benchmark and its figures), kept in the provenance.
        out: where to write a file's new version (required for a file, refused for a bundled name).
        overwrite: replace an existing ``out``.
        weights_dir: the bundled-weights folder (default: the package's).

    Raises:
        ValueError: an unknown setting, a bad value, a missing ``measured``, or nothing to change.
        FileNotFoundError / FileExistsError: the input is missing, or ``out`` exists.
    """
    from napari_drdm.core.network import DRDMNet
    from napari_drdm.weights import WEIGHTS_DIR
    unknown = sorted(set(changes) - set(INFERENCE_SETTINGS))
    if unknown:
        raise ValueError(f"{unknown}: not inference settings; the command changes {list(INFERENCE_SETTINGS)}")
    if not changes:
        raise ValueError("nothing to change: give --background-margin, --anatomy-fit, --keep-size, --input-padding, "
                         "--compose-padding, --schedule or --loop-extra")
    if not str(measured or "").strip():
        raise ValueError("--measured: say which measurement chose the new values (it is kept in the file)")
    wdir = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    reg_file = wdir / "registry.json"
    reg = json.loads(reg_file.read_text()) if reg_file.exists() else {}
    name = next((n for n, e in reg.items() if weights in (n, *e.get("aliases", []))), None)
    if name is not None:
        if out is not None:
            raise ValueError(f"{weights!r} is bundled: it is changed in place (no --out)")
        src = dest = wdir / reg[name]["file"]
    else:
        src = Path(weights)
        if not src.is_file():
            raise FileNotFoundError(f"--weights {weights}: no such file or bundled name")
        if out is None:
            raise ValueError("--out: where to write the new file (only a bundled name is changed in place)")
        dest = Path(out)
        if dest.exists() and not overwrite:
            raise FileExistsError(f"--out {dest} exists; pass --overwrite to replace it")
    state, cfg, prov = read_checkpoint(src)
    new = dict(changes)
    if "background_margin" in new:
        v = check_background_margin_option(new["background_margin"], cfg.size, "--background-margin")
        new["background_margin"] = None if v in (None, BACKGROUND_OFF) else v
    if "anatomy_fit" in new:
        v = check_anatomy_fit_option(new["anatomy_fit"], cfg.size, "--anatomy-fit")
        new["anatomy_fit"] = None if v in (None, BACKGROUND_OFF) else v
    if "keep_size" in new:
        v = check_keep_size_option(new["keep_size"], "--keep-size")
        if v is None:
            raise ValueError("--keep-size must be 'on', 'off' or 'inflation', got None")
        new["keep_size"] = v
    if "input_padding" in new:
        new["input_padding"] = check_input_padding_option(new["input_padding"], cfg.size, "--input-padding")
    if "compose_padding" in new:
        new["compose_padding"] = check_compose_padding(new["compose_padding"])
    if "schedule" in new:
        new["schedule"] = Schedule.parse(new["schedule"], "--schedule").value
    if "loop_extra" in new:
        try:
            new["loop_extra"] = check_loop_extra(_whole(new["loop_extra"]), cfg.n_steps)
        except ValueError as e:
            raise ValueError(f"--loop-extra: {e}") from None
    changed = {k: (getattr(cfg, k), v) for k, v in new.items() if getattr(cfg, k) != v}
    if not changed:
        raise ValueError(f"{weights}: already has " + ", ".join(f"{k}={v}" for k, v in new.items()))
    cfg = cfg.replace(**{k: v for k, (_, v) in changed.items()})
    record = list(prov.get("inference_changes") or [])
    record += [{"setting": k, "from": a, "to": b, "measured": measured.strip(),
                "by": "napari-drdm training/set_inference.py"} for k, (a, b) in changed.items()]
    prov = dict(prov, inference_changes=record)
    try:                                  # strict-loaded into the new configuration before anything is written
        DRDMNet.from_config(cfg).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"--weights {weights}: the weights do not fit their configuration: "
                         f"{str(e).splitlines()[0]}") from None
    sha = write_checkpoint(dest, state, cfg, prov, overwrite=True)
    if name is not None:
        entry = reg[name]
        entry["sha256"] = sha
        entry.setdefault("provenance", {})
        for k, (_a, b) in changed.items():
            entry["provenance"][k] = f"{_shown(k, b)} ({measured.strip()})"
        text = json.dumps(reg, indent=2) + "\n"
        atomic_write(reg_file, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    log(f"wrote {dest} (sha256 {sha[:12]}): " + ", ".join(
        f"{k} {_shown(k, a)} -> {_shown(k, b)}" for k, (a, b) in changed.items())
        + (f"; registry entry {name!r} updated" if name else ""))
    return {"path": str(dest), "sha256": sha, "changed": changed}


def _whole(value):
    """A number given on the command line as text, as an int where it is one (else as given)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def _shown(setting: str, value):
    """A setting's value as the command line writes it (a background margin or anatomy fit of None: off)."""
    if setting == "keep_size":
        return keep_size_name(value)
    return margin_as_option(value) if setting in _OFF_IS_NONE else value


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, help="a .safetensors file, or a bundled name (changed in place)")
    p.add_argument("--out", default=None, help="the new file (for a file; a bundled name is changed in place)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--background-margin", default=None, metavar="PX|off",
                   help="pixels kept around the anatomy before the field is extended, or off")
    p.add_argument("--anatomy-fit", default=None, metavar="PX|off",
                   help="pixels kept around the anatomy in the model's fitted view, or off (the whole image)")
    p.add_argument("--keep-size", default=None, metavar="on|inflation|off",
                   help="take the generated field's global zoom over the anatomy out (on) or keep it (off)")
    p.add_argument("--input-padding", default=None, metavar="PX", help="mirrored frame around the network's input")
    p.add_argument("--compose-padding", default=None, choices=COMPOSE_PADDINGS, help="reverse-loop composition padding")
    p.add_argument("--schedule", default=None, choices=SCHEDULE_NAMES,
                   help="the model's reverse loop: paper (T' steps) or reference (all T)")
    p.add_argument("--loop-extra", default=None, metavar="STEPS",
                   help="steps the paper loop starts above T' (0: the paper's Algorithm 2)")
    p.add_argument("--measured", required=True, help="the measurement that chose the values (kept in the file)")
    p.add_argument("--weights-dir", default=None, help="the folder with registry.json (default: the package's)")


def run(args) -> int:
    changes = {k: getattr(args, k) for k in INFERENCE_SETTINGS if getattr(args, k) is not None}
    try:
        set_inference(args.weights, changes, args.measured, args.out, args.overwrite,
                      Path(args.weights_dir) if args.weights_dir else None)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
