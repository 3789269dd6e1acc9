"""Regenerate one row of an export's manifest, bit for bit, by re-running its batch."""
from __future__ import annotations

from pathlib import Path

from ..core.config import BACKGROUND_OFF, COMPOSE_PADDINGS, KEEP_SIZE_INFLATION
from ..errors import InputError
from ..output_lock import OutputLock
from ..paths import check_output_dir
from .compute import compute_batch
from .discovery import Sample
from .engine import write_row
from .environment import environment_differences, run_environment
from .jobspec import Job
from .manifest import load_manifest
from .options import ExportOptions
from .sample import ModelProvider, load_sample

__all__ = ["reproduce_row"]


def reproduce_row(manifest, row_id: str, out_dir, model=None, device="auto", overwrite: bool = False) -> dict:
    """Regenerate one manifest row into ``out_dir`` (same relative paths) by re-running its batch.

    Returns ``{"row_id", "paths": {key: path}, "identical": {key: bool}}`` comparing each file's
    sha256 with the manifest.  Bit-identity needs the same weights, device type and torch build.
    The manifest may come from elsewhere: its output paths must stay inside ``out_dir`` (absolute
    paths, ``..`` and symlinks out are refused) and existing files are replaced only with
    ``overwrite``; both are checked, and ``out_dir`` locked, before anything is computed.
    """
    from ..paths import confine
    m = load_manifest(manifest)
    rows = {r["row_id"]: r for r in m["rows"]}
    if row_id not in rows:
        raise InputError(f"row {row_id!r} is not in the manifest {manifest}")
    row = rows[row_id]
    keys = [k for k in row if k + "_sha256" in row and k not in ("source", "labels_source", "model")]
    check_output_dir(out_dir)
    for k in keys:
        if not isinstance(row[k], str):
            raise InputError(f"manifest {manifest}: row {row_id} has no file name for {k!r}")
        target = confine(out_dir, row[k])
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; refusing to overwrite it (use --overwrite, or another OUTDIR)")
    with OutputLock(out_dir, what="drdm augment --reproduce"):
        return _reproduce_locked(m, manifest, row, row_id, keys, out_dir, model, device, overwrite)


def _reproduce_locked(m, manifest, row, row_id, keys, out_dir, model, device, overwrite) -> dict:
    batch = m["batches"].get(row["batch_id"])
    if batch is None:
        raise InputError(f"the manifest has no record of batch {row['batch_id']!r} for row {row_id}")
    run = m["run"]
    # the paddings the row was made with; rows written before they were recorded have none: the model's own
    padding = row.get("compose_padding")
    pad_in = row.get("input_padding")
    pad_in = pad_in if isinstance(pad_in, int) and not isinstance(pad_in, bool) else None
    # the background margin: rows written before it existed had none
    margin = row.get("background_margin")
    margin = margin if isinstance(margin, int) and not isinstance(margin, bool) else BACKGROUND_OFF
    fit = row.get("anatomy_fit")             # rows written before the anatomy fit saw the whole image
    fit = fit if isinstance(fit, int) and not isinstance(fit, bool) else BACKGROUND_OFF
    keep = row.get("keep_size")              # rows written before it existed kept the global zoom
    keep = keep if keep is True or keep == KEEP_SIZE_INFLATION else False
    opts = ExportOptions(mode=row["mode"], schedule=row["schedule"],
                         compose_padding=padding if padding in COMPOSE_PADDINGS else None,
                         input_padding=pad_in, background_margin=margin, anatomy_fit=fit,
                         keep_size=keep, k=row["k"],
                         label_interp=row["label_interp"],
                         inverse="inverse_ddf" in row, inverse_iterations=run.get("inverse_iterations", 50),
                         per_image=1, device=device, fold_guard=bool(row.get("fold_guard", False)))
    w = run.get("weights")
    provider = ModelProvider(None if w in (None, "auto") else w, device, run.get("size"), model)
    members, cache = [], {}
    here = Path(manifest) if Path(manifest).is_dir() else Path(manifest).parent

    def find(path):   # layer inputs live in OUT/sources: follow the folder if it was moved
        if path is None or Path(path).exists() or Path(path).parent.name != "sources":
            return path
        alt = here / "sources" / Path(path).name
        return str(alt) if alt.exists() else path

    for mem in batch["members"]:
        mem = dict(mem, source=find(mem["source"]), labels_source=find(mem["labels_source"]))
        key = (mem["source"], mem["labels_source"])
        if key not in cache:
            s = Sample(mem["name"], mem["source"], mem["labels_source"])
            cache[key] = load_sample(s, provider)
        ls = cache[key]
        job = Job(mem["name"], mem["index"], mem["row_id"], tuple(mem["key"]), tuple(mem["seeds"]))
        members.append((ls, job))
    target = [b for b, (_, j) in enumerate(members) if j.row_id == row_id][0]
    ls, job = members[target]
    if ls.source_sha256 != row["source_sha256"]:
        raise InputError(f"{row['source']} changed since the row was written (sha256 differs)")
    if ls.model.sha256 != row["model_sha256"]:
        raise InputError(f"weights differ from the manifest's ({row['model']}, sha256 {row['model_sha256'][:12]}...)")
    o = compute_batch(members, opts)[target]
    job.paths = {k: row[k] for k in keys}
    new = write_row(Path(out_dir), ls, job, o, opts, overwrite=overwrite)
    return {"row_id": row_id, "paths": {k: str(Path(out_dir) / row[k]) for k in keys},
            "identical": {k: new[f"{k}_sha256"] == row[f"{k}_sha256"] for k in keys},
            "environment": environment_differences(row, run_environment(ls.model.device))}
