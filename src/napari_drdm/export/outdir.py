"""Output-folder rules of a dataset export, checked before any computation.

The output folder may not be an input, lie inside one or contain one (outputs would become
inputs); a non-empty folder is refused unless the run resumes (same settings, same inputs,
finished outputs verified by sha256) or overwrites; temporaries of killed writers are removed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import InputError
from ..output_lock import pid_alive
from ..paths import shown
from .discovery import ArrayInput
from .manifest import MANIFEST_CSV, MANIFEST_JSON, RUN_FILE, collect, verify_row

__all__ = ["IDENTITY_KEYS", "check_out_vs_inputs", "prepare_output_folder", "clean_partials"]

_SIDE_FILES = (RUN_FILE, MANIFEST_JSON, MANIFEST_CSV, ".manifest.lock")


IDENTITY_KEYS = ("mode", "per_image", "t_prime", "t_prime_syn", "seed", "schedule", "compose_padding",
                 "input_padding", "background_margin", "anatomy_fit", "keep_size", "k", "weights", "inverse",
                 "label_interp", "inverse_iterations", "fold_guard")
#: what a setting was before it was recorded (a run.json written by an older version lacks the key;
#: None: the model's own, which is what those runs used)
IDENTITY_DEFAULTS = {"fold_guard": False, "compose_padding": None, "input_padding": None,
                     "background_margin": None, "anatomy_fit": None, "keep_size": None}


def _setting(rec: dict, key: str, model_defaults: Optional[dict] = None):
    """``rec``'s value of an identity setting; None (the model's own) resolved to ``model_defaults``
    when the model's own value is known, so that an explicit value equal to it is the same setting."""
    value = rec.get(key, IDENTITY_DEFAULTS.get(key))
    if value is None and model_defaults:
        value = model_defaults.get(key)
    return value


def _model_defaults(prev: dict, settings: dict) -> Optional[dict]:
    """The model's own settings (``model_defaults`` in run.json), when both runs used the same
    weights file by sha256 and one of them recorded them; else None (nothing is resolved)."""
    a, b = prev.get("weights_sha256"), settings.get("weights_sha256")
    if a is None or a != b:
        return None
    return settings.get("model_defaults") or prev.get("model_defaults")


def _is_empty(out: Path) -> bool:
    """No files but temporaries, or only the bookkeeping of a run that wrote no output yet."""
    if not out.exists():
        return True
    names = [p.name for p in out.iterdir() if not (p.name.startswith(".") and (".part-" in p.name
                                                                             or p.name.startswith(".drdm")))]
    side = all(n in _SIDE_FILES or n == "sources" or (n.startswith("journal-") and n.endswith(".jsonl"))
               for n in names)
    return not names or (side and not collect(out)[0])


def clean_partials(out: Path):
    """Remove temporary files left by a killed writer (name ``.<file>.part-<pid>...``, pid gone)."""
    for p in out.rglob(".*.part-*"):
        try:
            pid = int(p.name.split(".part-")[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if not pid_alive(pid):
            p.unlink(missing_ok=True)


def _same_weights(prev: dict, settings: dict) -> bool:
    """Same weights file, when both runs recorded its sha256 (older run.json files did not)."""
    a, b = prev.get("weights_sha256"), settings.get("weights_sha256")
    return a is None or b is None or a == b


def _check_same_inputs(out: Path, prev: dict, settings: dict) -> None:
    """--resume refuses another input set (inputs added, removed or renamed)."""
    def key(s):
        return (s.get("name"), s.get("image"), s.get("labels"))
    old = {key(s) for s in prev.get("samples", [])}
    new = {key(s) for s in settings.get("samples", [])}
    if old and old != new:
        added, removed = sorted(new - old), sorted(old - new)
        parts = []
        if added:
            parts.append(f"{len(added)} not in the earlier run (e.g. {added[0][1]})")
        if removed:
            parts.append(f"{len(removed)} of the earlier run missing (e.g. {removed[0][1]})")
        raise FileExistsError(f"{out} holds a run over a different input set: {'; '.join(parts)}. --resume needs "
                              f"the same inputs (use --overwrite or another output folder for a new set)")


def prepare_output_folder(out_dir, settings: dict, resume: bool, overwrite: bool, shard: Tuple[int, int]):
    """Apply the safety rules; return the verified finished rows (resume) and write ``run.json``.

    * empty or missing folder: start;
    * ``resume``: settings must match ``run.json``; rows whose files verify (sha256) are kept;
    * ``overwrite``: previous journals and manifests are discarded, same-named files replaced;
    * a sharded run (n > 1) may join a folder holding the same sharded run (same settings and
      shard count) if this shard has no journal yet;
    * otherwise: refuse, saying why.
    """
    from ..outputs import write_json
    out = Path(out_dir)
    i, n = shard
    journal = out / f"journal-{i}-of-{n}.jsonl"
    run_file = out / RUN_FILE
    prev = None
    if run_file.exists():
        try:
            prev = json.loads(run_file.read_text())
        except ValueError:
            prev = None
    own = _model_defaults(prev, settings) if prev is not None else None
    same = prev is not None and all(_setting(prev, k, own) == _setting(settings, k, own) for k in IDENTITY_KEYS) \
        and _same_weights(prev, settings)
    done: List[dict] = []
    if overwrite:
        # journals of other shards of this (sharded) run may already be in use: leave them alone
        stale = [j for j in out.glob("journal-*-of-*.jsonl") if j == journal or not j.name.endswith(f"-of-{n}.jsonl")]
        for p in stale + [out / MANIFEST_JSON, out / MANIFEST_CSV]:
            p.unlink(missing_ok=True)
    elif resume:
        if prev is not None and not same:
            diff = [k for k in IDENTITY_KEYS if _setting(prev, k, own) != _setting(settings, k, own)]
            if not _same_weights(prev, settings):
                diff.append("weights file (sha256)")
            raise FileExistsError(f"{out} holds a run with different settings ({', '.join(diff)}); "
                                  f"--resume needs the same settings (or use --overwrite or another folder)")
        if prev is not None:
            _check_same_inputs(out, prev, settings)
        if out.exists():
            clean_partials(out)
            rows, _, _ = collect(out)
            done = [r for r in rows.values() if verify_row(out, r)]
    elif not _is_empty(out):
        sharded_join = n > 1 and same and prev.get("shards") == n and not journal.exists()
        if not sharded_join:
            raise FileExistsError(f"output folder {out} is not empty; refusing to write into it. Use --resume to "
                                  f"complete an interrupted run, --overwrite to replace it, or another folder")
    write_json(run_file, settings, overwrite=True, root=out)
    return done


def check_out_vs_inputs(out: Path, items) -> None:
    """OUT may not be an input folder, lie inside one, or contain an input (outputs would become inputs)."""
    o = Path(os.path.abspath(out)).resolve()
    for it in items:
        if isinstance(it, ArrayInput):
            continue
        p = Path(os.path.abspath(Path(it).expanduser())).resolve()
        if o == p or (p.is_dir() and p in o.parents):
            raise InputError(f"output folder {shown(out)} is inside the input {shown(it)}; a later run would take "
                             f"the outputs for inputs: choose an output folder outside the inputs")
        if o in p.parents:
            raise InputError(f"input {shown(it)} lies inside the output folder {shown(out)}; choose an output "
                             f"folder that holds no inputs")
