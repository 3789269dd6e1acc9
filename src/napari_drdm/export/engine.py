"""The dataset export run: the loop over inputs and batches, and the files it writes (its options: :mod:`.options`).

Before any computation the options are validated, the output folder is checked and locked; each
input is then read (:mod:`.sample`), its jobs made (:mod:`.jobspec`), batched by model and T',
computed (:mod:`.compute`) and written atomically, one journal record per output
(:mod:`.manifest`); an input that fails at any stage is skipped with its reason.

Reproducibility: every output has its own seed; samples sharing a T' are batched through the
network, and since batch composition changes float rounding (which the chaotic reverse loop
amplifies), each row records its batch (``batch_id``: members, order, seeds);
:func:`~napari_drdm.export.reproduce.reproduce_row` regenerates that exact batch.
"""
from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..core.config import margin_as_option
from ..core.generators import Returning
from ..errors import InputError, OutputError
from ..memory import available_memory
from ..output_checks import check_finite, check_label_values, writable_array
from ..output_lock import OutputLock
from ..paths import check_output_dir, shown
from .compute import compute_batch
from .discovery import ArrayInput, Sample, discover, fingerprint, path_sha256
from .environment import run_environment
from .jobspec import Job, make_jobs
from .manifest import Journal, journal_rows, kept_records, write_manifest
from .options import ExportOptions, check_model_options, fit_used, margin_used, size_kept
from .outdir import check_out_vs_inputs, prepare_output_folder
from .sample import LoadedSample, ModelProvider, load_sample, weights_sha

__all__ = ["ExportEvent", "iter_export", "run_export", "write_row"]


class _Cancelled(Exception):
    pass


@dataclass
class ExportEvent:
    kind: str                              # "row", "skip", "info", "done"
    done: int
    total: int
    message: str = ""
    row: Optional[dict] = None
    preview: Optional[dict] = None         # arrays of the first outputs (GUI preview)


def write_row(out: Path, ls: LoadedSample, job: Job, o: dict, opts: ExportOptions, overwrite: bool) -> dict:
    """Write one output's files (atomically) and return its manifest row."""
    from ..checkpoint import file_sha256
    from ..io import write_nifti
    from ..outputs import write_ddf
    vol, lab_vol, model, s = ls.vol, ls.lab_vol, ls.model, ls.sample
    lab_hdr = lab_vol.header if lab_vol is not None and lab_vol.header is not None else vol.header
    row = {"row_id": job.row_id, "name": job.name, "index": job.index, "mode": opts.mode,
           "source": s.image, "source_sha256": ls.source_sha256, "labels_source": s.labels,
           "labels_source_sha256": ls.labels_source_sha256,
           "schedule": opts.schedule or model.config.schedule,
           "loop_extra": model.config.loop_extra_for(opts.schedule),
           "k": int(opts.k or model.config.k_recursions),
           "compose_padding": opts.compose_padding or model.config.compose_padding,
           "input_padding": model.config.input_padding if opts.input_padding is None else int(opts.input_padding),
           "background_margin": margin_used(model, opts), "anatomy_fit": fit_used(model, opts),
           "keep_size": size_kept(model, opts),
           "label_interp": opts.label_interp, "fold_guard": bool(opts.fold_guard), "model": model.name,
           "model_sha256": model.sha256,
           "model_size": model.size, **run_environment(model.device)}
    if opts.mode == "pairs":
        row.update(t_prime_aug=job.key[0], t_prime_syn=job.key[1], seed_aug=job.seeds[0], seed_syn=job.seeds[1])
        row.update({f"aug_{k}": v for k, v in o["aug_metrics"].items()})
    else:
        row.update(t_prime=job.key[0], seed=job.seeds[0])
    row.update(o["metrics"])
    row.update(o.get("residual", {}))
    arrays = {}
    for key, rel in job.paths.items():     # every array is checked before the first file is written
        what = f"{job.row_id}: {rel}"
        if key in ("ddf", "inverse_ddf"):
            check_finite(o[key], what + " (field)")
            arrays[key] = o[key]
        elif key.endswith("labels"):
            if ls.label_values is not None:
                check_label_values(o[key], np.union1d(ls.label_values, [ls.background]), what)
            arrays[key] = writable_array(o[key].reshape(lab_vol.data.shape), what)
        else:
            check_finite(o[key], what + " (image)")
            arrays[key] = writable_array(o[key].reshape(vol.data.shape), what)
    written = []
    try:
        for key, rel in job.paths.items():
            p = out / rel
            if key in ("ddf", "inverse_ddf"):
                write_ddf(p, arrays[key], ls.spacing, vol.affine, header=vol.header, overwrite=overwrite, root=out)
            elif key.endswith("labels"):
                write_nifti(p, arrays[key], vol.affine, header=lab_hdr, overwrite=overwrite, root=out)
            else:
                write_nifti(p, arrays[key], vol.affine, header=vol.header, overwrite=overwrite, root=out)
            written.append(p)
            row[key] = rel
            row[f"{key}_sha256"] = file_sha256(p)
    except BaseException:
        for p in written:       # an unfinished row leaves no file: every output on disk is in the manifest
            p.unlink(missing_ok=True)
        raise
    return row


def _preview(ls: LoadedSample, o: dict, row: dict) -> dict:
    keys = ("moving", "fixed", "moving_labels", "fixed_labels") if "moving" in o else ("image", "labels")
    return {"row_id": row["row_id"], "spacing": ls.spacing, "ddf": o["ddf"],
            **{k: o[k] for k in keys if o.get(k) is not None}}


def _batches(window: List[Tuple[LoadedSample, List[Job]]], size: int) -> List[List[Tuple[LoadedSample, Job]]]:
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for ls, jobs in window:
        for j in jobs:
            groups.setdefault((id(ls.model), j.key), []).append((ls, j))
    return [m[i:i + size] for m in groups.values() for i in range(0, len(m), size)]


def _pending(queue, ls) -> int:
    """Jobs of the input ``ls`` still waiting in later batches."""
    return sum(1 for m in queue for x in m if x[0] is ls)


def iter_export(inputs, out_dir, opts: ExportOptions, model=None, preview: int = 0,
                should_stop: Optional[Callable[[], bool]] = None) -> Iterator[ExportEvent]:
    """Run Algorithm 3/4 over ``inputs`` (folders/files, see :func:`discover`); yield one event per
    output or skipped input; return a summary dict.  The manifest is rebuilt on exit, whatever the
    reason (end, ``should_stop()``, Ctrl-C, SIGTERM, full disk).

    Before any computation: the options are validated, OUT is checked (not among the inputs,
    writable, empty or resumable) and locked against other writers (:class:`OutputLock`).  An
    input that fails at any stage (reading, memory estimate, generation, checks of its outputs)
    is skipped with its reason, unless ``opts.strict``.  An exception leaving this generator
    carries the summary as ``exc.export_summary``."""
    out = Path(out_dir).absolute()     # every written path is confined to OUT; relative ones would be re-rooted
    opts.validate()
    mode = opts.mode
    i_shard, n_shard = opts.shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise InputError(f"--shard {i_shard}/{n_shard}: expected i/n with 0 <= i < n")
    items = [inputs] if isinstance(inputs, (str, Path, ArrayInput)) else list(inputs)
    check_out_vs_inputs(out, items)
    check_output_dir(out)
    lock = OutputLock(out, opts.shard, wait=opts.lock_wait, what=f"drdm export {mode}")
    with lock:
        gen = _export_locked(items, out, opts, model, preview, should_stop, lock)
        summary = yield from gen
    return summary


def _export_locked(items, out: Path, opts: ExportOptions, model, preview, should_stop, lock):
    mode = opts.mode
    i_shard, n_shard = opts.shard
    provider = ModelProvider(opts.weights, opts.device, opts.size, model)
    if any(v is not None for v in opts.bounded_options()) and (model is not None or opts.weights):
        check_model_options(provider.get(0), opts)     # one model for every input: refused before any work
    arrays = [a for a in items if isinstance(a, ArrayInput)]
    samples, skipped = discover(items, sources_dir=out / "sources")
    if not samples:
        raise InputError("no usable images found in " + ", ".join(shown(i) for i in items)
                         + "".join(f"\n  skipped {shown(s.path)}: {s.reason}" for s in skipped))
    digits = max(3, len(str(opts.per_image - 1)))
    settings = dict(opts.settings(), samples=[asdict(s) for s in samples], shards=n_shard,
                    row_tag="pair" if mode == "pairs" else "aug", digits=digits,
                    inputs=[f"layer:{p.name}" if isinstance(p, ArrayInput) else str(Path(p).resolve()) for p in items],
                    fingerprint=fingerprint(samples), weights_sha256=weights_sha(opts.weights) if model is None
                    else model.sha256)
    from .. import __version__
    settings["version"] = __version__
    if model is not None or opts.weights:      # one model for every input: its own settings resolve "None"
        own = provider.get(0).config
        settings["model_defaults"] = {"compose_padding": own.compose_padding, "input_padding": int(own.input_padding),
                                      "background_margin": margin_as_option(own.background_margin),
                                      "anatomy_fit": margin_as_option(own.anatomy_fit),
                                      "keep_size": own.keep_size or False}
    done_rows = prepare_output_folder(out, settings, opts.resume, opts.overwrite, opts.shard)
    done = {r["row_id"]: r for r in done_rows}
    for a in arrays:
        a.save(out / "sources")
    own_name = f"journal-{i_shard}-of-{n_shard}.jsonl"
    kept = kept_records(out, own_name, done, keep_skips=not opts.retry_skipped) if opts.resume else []
    journal = Journal(out / own_name, keep=kept, root=out)
    n_kept_rows = sum(r.get("type") == "row" for r in kept)
    skipped_before = {r["name"]: r.get("reason", "") for r in kept if r.get("type") == "skip"}
    plan = []
    for s in samples[i_shard::n_shard]:
        jobs = make_jobs(s, opts, digits)
        if s.name in skipped_before:
            plan.append((s, []))
            continue
        have = [j for j in jobs if j.row_id in done]
        if have:   # finished rows count only if made from the same input files
            try:
                sha = (path_sha256(s.image), path_sha256(s.labels) if s.labels else None)
            except OSError:
                sha = None
            have = [j for j in have if sha == (done[j.row_id].get("source_sha256"),
                                               done[j.row_id].get("labels_source_sha256"))]
        plan.append((s, [j for j in jobs if j not in have]))
    n_prev = sum(len(make_jobs(s, opts, digits)) - len(p) for s, p in plan if s.name not in skipped_before)
    total = sum(len(p) for _, p in plan)
    counts: Dict[tuple, int] = {}
    for j in make_jobs(Sample("x", ""), opts, digits):
        counts[j.key] = counts.get(j.key, 0) + 1
    # enough images per window that each T' group can fill a batch (bounded, for memory)
    window_n = max(1, min(8, math.ceil(opts.batch / min(counts.values()))))
    budget = int(float(opts.max_memory) * 1e9) if opts.max_memory else available_memory()
    n_done, status, err = 0, "complete", None
    bad: Dict[str, str] = {}
    skip_log: List[dict] = []

    def skip(s: Sample, reason: str, n_left: int):
        nonlocal total
        if opts.strict:
            raise InputError(reason)
        bad[s.name] = reason
        total -= n_left
        rec = {"type": "skip", "path": s.image, "name": s.name, "reason": reason}
        journal.append(rec)
        skip_log.append(rec)
        return ExportEvent("skip", n_done, total, f"skipped {s.name}: {reason}")

    try:
        if lock.stale:
            yield ExportEvent("info", 0, total, f"took over a stale lock of {out} ({lock.stale}, no longer running)")
        for s in (skipped if i_shard == 0 else []):      # discovery is the same in every shard: report once
            journal.append({"type": "skip", "path": s.path, "reason": s.reason})
            skip_log.append({"path": s.path, "reason": s.reason})
            yield ExportEvent("skip", n_done, total, f"skipped {shown(s.path)}: {s.reason}")
        if skipped_before:
            yield ExportEvent("info", 0, total, f"{len(skipped_before)} inputs skipped by the earlier run are not "
                              f"retried ({', '.join(sorted(skipped_before)[:5])}); --retry-skipped retries them")
        if n_prev:
            yield ExportEvent("info", 0, total, f"resuming: {n_prev} finished outputs verified, {total} to go")
        for w0 in range(0, len(plan), window_n):
            window = []
            for s, jobs in plan[w0:w0 + window_n]:
                if not jobs:
                    continue
                try:
                    ls = load_sample(s, provider, memory=(budget, opts.batch, opts))
                    try:                  # the bundled model of this input's dimension may not take it
                        check_model_options(ls.model, opts)
                    except InputError as e:
                        raise InputError(f"{s.image}: {e}") from None
                    window.append((ls, jobs))
                except InputError as e:
                    yield skip(s, str(e), len(jobs))
            queue = list(_batches(window, opts.batch))
            while queue:
                members = [m for m in queue.pop(0) if m[0].sample.name not in bad]
                if not members:
                    continue
                if should_stop is not None and should_stop():
                    raise _Cancelled
                try:
                    outs = compute_batch(members, opts)
                except (RuntimeError, ValueError, TypeError, MemoryError, FloatingPointError) as e:
                    if len(members) > 1:          # find the member that fails: one by one
                        queue[:0] = [[m] for m in members]
                        continue
                    ls = members[0][0]
                    yield skip(ls.sample, f"generation failed: {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0]}", 1 + _pending(queue, ls))
                    continue
                bid = f"{members[0][1].row_id}-{time.time_ns():x}"
                journal.append({"type": "batch", "batch_id": bid, "members": [
                    {"row_id": j.row_id, "name": j.name, "index": j.index, "key": list(j.key), "seeds": list(j.seeds),
                     "source": ls.sample.image, "labels_source": ls.sample.labels} for ls, j in members]})
                for b, ((ls, job), o) in enumerate(zip(members, outs)):
                    if ls.sample.name in bad:
                        continue
                    try:
                        row = write_row(out, ls, job, o, opts, overwrite=opts.resume or opts.overwrite or n_shard > 1)
                    except OutputError as e:
                        left = sum(1 for x in members[b:] if x[0] is ls) + _pending(queue, ls)
                        yield skip(ls.sample, str(e), left)
                        continue
                    row.update(batch_id=bid, batch_index=b, batch_size=len(members), written_at=time.time())
                    journal.append(dict(row, type="row"))
                    n_done += 1
                    pv = _preview(ls, o, row) if n_done <= preview else None
                    yield ExportEvent("row", n_done, total, row=row, preview=pv)
    except _Cancelled:
        status = "cancelled"
    except BaseException as e:
        status = "interrupted"
        err = e
        raise
    finally:
        journal.close()
        written = journal_rows(journal.path) - n_kept_rows      # exactly what the journal holds
        for p in out.rglob(f".*.part-{os.getpid()}*"):           # our own temporaries, if any survived
            p.unlink(missing_ok=True)
        try:
            m = write_manifest(out)
            summary_extra = {"complete": m["complete"], "n_rows": m["n_rows"], "n_missing": m["n_missing"]}
        except OSError:
            summary_extra = {"complete": False, "manifest_written": False,
                             "manifest_error": "could not write manifest.json/csv; the journal is intact: run "
                             "`drdm augment --merge OUT` to rebuild them"}
        summary = dict({"status": status, "written": written, "previously_done": n_prev, "out_dir": str(out),
                        "manifest": str(out / "manifest.json"), "skipped": skip_log}, **summary_extra)
        if err is not None:
            try:
                err.export_summary = summary
            except AttributeError:
                pass
    return summary


def run_export(inputs, out_dir, opts: ExportOptions, model=None, progress: Optional[Callable] = None,
               should_stop=None) -> dict:
    """Consume :func:`iter_export`; ``progress(event)`` is called for every event."""
    gen = Returning(iter_export(inputs, out_dir, opts, model=model, should_stop=should_stop))
    for ev in gen:
        if progress is not None:
            progress(ev)
    return gen.value
