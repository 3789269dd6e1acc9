"""Algorithms 3 and 4: the dataset export engine, shared by the ``drdm`` CLI and the napari widget.

* Algorithm 3 (``mode="augment"``): for each image (+ labels), N DRDM deformations phi
  (Algorithm 2); writes the deformed image (input dtype and range), the deformed labels (nearest:
  only the input's values), phi as a NIfTI displacement image in mm and, optionally, its inverse.
* Algorithm 4 (``mode="pairs"``): phi_aug from I0 (T'_aug), I_mv = warp(I0, phi_aug); phi_syn
  from Algorithm 2 on I_mv (T'_syn); I_fx = warp(I0, compose(first=phi_syn, then=phi_aug)), so
  that I_fx(x) ~= I_mv(x + phi_syn(x)); writes (moving, fixed, phi_syn) + moving/fixed labels.

Everything happens on the input's own grid: fields generated on the model's S^d grid are
resized to the original grid (``ModelGrid.field_to_original``) before warping or composing.

Reproducibility: every output has its own seed (``derive_seed``); samples sharing a T' are
batched through the network, and since batch composition changes float rounding (which the
chaotic reverse loop amplifies), each row records its batch (``batch_id``: members, order,
seeds); :func:`reproduce_row` regenerates that exact batch and rewrites the row bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .core.generators import Returning
from .errors import DRDMError, InputError, one_line
from .safety import (OutputError, OutputLock, available_memory, check_finite, check_label_values, check_memory,
                     check_output_dir, estimate_export_bytes, shown, writable_array)
from .dataset_io import (ArrayInput, Journal, Sample, derive_seed, discover, journal_records, load_manifest,
                         parse_t_prime, path_sha256,
                         prepare_output_folder, read_records, write_manifest)

__all__ = ["ExportOptions", "ExportEvent", "InputError", "ModelProvider", "iter_export", "run_export",
           "reproduce_row", "invert_field", "load_sample"]

# Per-dimension overrides of the registry's default models (weights.default_weights); empty by default.
DEFAULT_WEIGHTS: Dict[int, str] = {}


def _default_name(ndim: int) -> str:
    """The model used for ``ndim``-D inputs when no weights are named (override, else the registry's)."""
    from .weights import default_weights
    return DEFAULT_WEIGHTS.get(ndim) or default_weights(ndim)


class _Cancelled(Exception):
    pass


@dataclass
class ExportOptions:
    mode: str = "augment"                 # "augment" (Algorithm 3) or "pairs" (Algorithm 4)
    per_image: int = 1
    t_prime: str = "reference"            # T' spec (T'_aug in pairs mode)
    t_prime_syn: str = "45"               # pairs mode only
    seed: int = 0
    schedule: Optional[str] = None        # None: the model's default
    k: Optional[int] = None
    batch: int = 4
    inverse: bool = False
    inverse_iterations: int = 50
    label_interp: str = "nearest"
    weights: Optional[str] = None         # None: bundled model of the input's dimension
    device: str = "auto"
    size: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    shard: Tuple[int, int] = (0, 1)
    strict: bool = False                  # stop at the first unusable input instead of skipping it
    fold_guard: bool = False              # written fields fold-free on the input's grid (core/foldguard.py)
    retry_skipped: bool = False           # with resume: retry inputs an earlier run skipped
    max_memory: Optional[float] = None    # GB for the memory estimate (None: the memory available)
    lock_wait: float = 0.0                # seconds to wait for another writer of OUT to finish

    def validate(self) -> "ExportOptions":
        """Check every option (one line naming it and what was expected); returns self."""
        from .validate import (check_bool, check_choice, check_device, check_int, check_k, check_label_interp,
                               check_model_size, check_positive, check_schedule, check_seed)
        check_choice(self.mode, ("augment", "pairs"), "mode")
        self.per_image = check_int("--per-image", self.per_image, 1, 10 ** 6)
        self.seed = check_seed(self.seed)
        self.k = check_k(self.k, "--k")
        self.batch = check_int("--batch", self.batch, 1, 4096)
        self.inverse_iterations = check_int("--inverse-iterations", self.inverse_iterations, 0, 10 ** 5)
        self.size = check_model_size(self.size)
        self.device = check_device(self.device)
        check_schedule(self.schedule)
        check_label_interp(self.label_interp)
        self.max_memory = check_positive(self.max_memory, "--max-memory (GB)")
        self.fold_guard = check_bool(self.fold_guard, "--fold-guard")
        parse_t_prime(self.t_prime, self.per_image)
        if self.mode == "pairs":
            parse_t_prime(self.t_prime_syn, self.per_image)
        return self

    def settings(self) -> dict:
        d = asdict(self)
        for k in ("batch", "device", "resume", "overwrite", "shard", "strict", "retry_skipped", "max_memory",
                  "lock_wait"):
            d.pop(k)
        d["weights"] = self.weights or "auto"
        if self.mode != "pairs":
            d["t_prime_syn"] = None
        return d


@dataclass
class ExportEvent:
    kind: str                              # "row", "skip", "info", "done"
    done: int
    total: int
    message: str = ""
    row: Optional[dict] = None
    preview: Optional[dict] = None         # arrays of the first outputs (GUI preview)


@dataclass
class Job:
    name: str
    index: int
    row_id: str
    key: tuple                             # T' (augment) or (T'_aug, T'_syn) (pairs)
    seeds: tuple                           # (seed,) or (seed_aug, seed_syn)
    paths: Dict[str, str] = field(default_factory=dict)


class ModelProvider:
    """One model for ``weights``, or the bundled model of each input dimension (loaded lazily)."""

    def __init__(self, weights=None, device="auto", size=None, model=None):
        self.weights, self.device, self.size = weights, device, size
        self._models: Dict[int, object] = {}
        self._fixed = model

    def get(self, ndim: int):
        from .model import load_model
        if self._fixed is None and self.weights:
            self._fixed = load_model(self.weights, device=self.device, size=self.size)
        if self._fixed is not None:
            return self._fixed
        if ndim not in self._models:
            name = f"default {ndim}D model"
            try:
                name = _default_name(ndim)
                self._models[ndim] = load_model(name, device=self.device, size=self.size)
            except DRDMError as e:
                raise type(e)(f"no --weights given and the bundled {ndim}D model {name!r} is not available "
                              f"({one_line(e)}); pass --weights NAME_OR_CHECKPOINT (see `drdm weights`)") from None
        return self._models[ndim]


# ---------------------------------------------------------------------------------- inputs
def _squeeze(a: np.ndarray) -> np.ndarray:
    from .io import squeeze_trailing
    return squeeze_trailing(a)


def load_sample(sample: Sample, provider: ModelProvider, with_sha: bool = True, memory=None) -> dict:
    """Read, check and prepare one input for its model; raises :class:`InputError` naming the file.

    ``memory=(budget_bytes, batch, opts)`` also refuses an input whose estimated peak memory
    (:func:`napari_drdm.safety.estimate_export_bytes`) exceeds the budget."""
    import torch
    from .io import read_image
    from .model import _check_image, _check_labels
    try:
        vol = read_image(sample.image)
    except (ValueError, OSError) as e:
        raise InputError(f"{sample.image}: unreadable: {e}") from None
    img = _squeeze(np.asarray(vol.data))
    if img.ndim not in (2, 3):
        raise InputError(f"{sample.image}: unsupported {img.ndim}D image of shape {vol.data.shape} (2D or 3D expected)")
    model = provider.get(img.ndim)
    if model.ndim != img.ndim:
        raise InputError(f"{sample.image}: {img.ndim}D image but the weights {model.name!r} are a {model.ndim}D model")
    img = _check_image(img, model.ndim, sample.image)
    if memory is not None:
        budget, batch, opts = memory
        est = estimate_export_bytes(img.shape, img.dtype.itemsize, model.size, model.config.channels, batch,
                                    labels=bool(sample.labels), inverse=opts.inverse, pairs=opts.mode == "pairs")
        try:
            check_memory(est, budget, sample.image, batch=batch)
        except MemoryError as e:
            if batch > 1 and est["total"] - est["model_grid"] * (batch - 1) / batch <= budget:
                raise    # a smaller --batch fits: a run-level option, so the run stops (before work) saying so
            raise InputError(str(e)) from None      # this input alone is too large: skipped
    lab_vol, lab = None, None
    if sample.labels:
        try:
            lab_vol = read_image(sample.labels)
        except (ValueError, OSError) as e:
            raise InputError(f"{sample.labels}: unreadable label map: {e}") from None
        lab = _squeeze(np.asarray(lab_vol.data))
        if lab.shape != img.shape:
            raise InputError(f"{sample.labels}: label map shape {lab_vol.data.shape} does not match the image "
                             f"{sample.image} shape {vol.data.shape}")
        try:
            _check_labels(lab, img.shape)
        except InputError as e:
            raise InputError(f"{sample.labels}: {e}") from None
    spacing = tuple(float(s) for s in vol.spacing[: img.ndim])
    grid, x_model, lo, hi = model.prepare(img, spacing)
    dev = model.device
    lab_t, background, values = None, 0, None
    if lab is not None:
        values = np.unique(lab)
        background = 0 if (values == 0).any() else int(values.min())
        lab_t = torch.as_tensor(lab.astype(np.int64), device=dev)[None, None]
    return {"sample": sample, "vol": vol, "lab_vol": lab_vol, "image": img, "labels": lab, "spacing": spacing,
            "model": model, "grid": grid, "x_model": x_model, "lo": lo, "hi": hi, "background": background,
            "label_values": values,
            "x": torch.as_tensor(img.astype(np.float32), device=dev)[None, None], "lab_t": lab_t,
            "source_sha256": path_sha256(sample.image) if with_sha else None,
            "labels_source_sha256": path_sha256(sample.labels) if (with_sha and sample.labels) else None}


# ---------------------------------------------------------------------------------- compute
def invert_field(u, spacing: Sequence[float], iterations: int = 50, tol: float = 1e-4):
    """Fixed-point inverse of a pixel field u (1, d, *shape): v_{n+1}(x) = -u(x + v_n(x)).

    Returns (v, residual): residual = max and mean over pixels of |u(x + v(x)) + v(x)| in mm
    (and max in pixels), so that warping the deformed image by v gives the input back.
    """
    import torch
    from .core.spatial import warp
    v = -u
    for _ in range(int(iterations)):
        nv = -warp(u, v, "linear", "border")
        delta = float((nv - v).abs().max())
        v = nv
        if delta < tol:
            break
    r = v + warp(u, v, "linear", "border")
    nd = u.shape[1]
    sp = torch.tensor([float(s) for s in spacing[:nd]], dtype=r.dtype, device=r.device).view(1, nd, *([1] * nd))
    mag_mm = torch.sqrt(((r * sp) ** 2).sum(1))
    mag_px = torch.sqrt((r ** 2).sum(1))
    return v, {"inverse_residual_max_mm": float(mag_mm.max()), "inverse_residual_mean_mm": float(mag_mm.mean()),
               "inverse_residual_max_px": float(mag_px.max())}


def _render(ls: dict, ddf, label_interp: str):
    """Warp the original-grid image (input dtype/range kept) and labels (values kept) by ``ddf``."""
    from .core.spatial import warp, warp_labels
    model, img = ls["model"], ls["image"]
    lo, hi = ls["lo"], ls["hi"]
    out = (warp(ls["x"] - lo, ddf, model.config.image_interp, "zeros") + lo).clamp(lo, hi)[0, 0].cpu().numpy()
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(img.dtype, copy=False)
    lab = None
    if ls["lab_t"] is not None:
        lab = warp_labels(ls["lab_t"], ddf, label_interp, ls["background"])[0, 0].cpu().numpy()
        lab = lab.astype(ls["labels"].dtype)
    return out, lab


def compute_batch(members: List[Tuple[dict, Job]], opts: ExportOptions) -> List[dict]:
    """Run one batch (same model and T'): arrays, fields (pixels, original grid) and metrics per member."""
    import torch
    from .core.metrics import field_metrics
    from .core.spatial import compose
    model = members[0][0]["model"]
    seeds = [j.seeds[0] for _, j in members]
    x = torch.cat([ls["x_model"] for ls, _ in members])
    key = members[0][1].key
    phi_m, _ = model.generate_model_grid(x, key[0], seeds, schedule=opts.schedule, k=opts.k,
                                         fold_guard=opts.fold_guard)
    outs = []
    for b, (ls, job) in enumerate(members):
        ddf = ls["grid"].field_to_original(phi_m[b:b + 1], opts.fold_guard)
        o = {"metrics": field_metrics(phi_m[b], side=model.size)}
        if opts.mode == "pairs":
            o["moving"], o["moving_labels"] = _render(ls, ddf, opts.label_interp)
            o["phi_aug"] = ddf
            o["aug_metrics"] = o.pop("metrics")
        else:
            o["image"], o["labels"] = _render(ls, ddf, opts.label_interp)
            o["ddf_t"] = ddf
        outs.append(o)
    if opts.mode == "pairs":
        xs = torch.cat([model.prepare(o["moving"], ls["spacing"])[1] for o, (ls, _) in zip(outs, members)])
        phi_s, _ = model.generate_model_grid(xs, key[1], [j.seeds[1] for _, j in members],
                                             schedule=opts.schedule, k=opts.k, fold_guard=opts.fold_guard)
        for b, (o, (ls, job)) in enumerate(zip(outs, members)):
            syn = ls["grid"].field_to_original(phi_s[b:b + 1], opts.fold_guard)
            total = compose(syn, o.pop("phi_aug"), "border")
            o["fixed"], o["fixed_labels"] = _render(ls, total, opts.label_interp)
            o["ddf_t"] = syn
            o["metrics"] = field_metrics(phi_s[b], side=model.size)
    for o, (ls, _) in zip(outs, members):
        if opts.inverse:
            inv, res = invert_field(o["ddf_t"], ls["spacing"], opts.inverse_iterations)
            o["inverse_ddf"] = inv[0].cpu().numpy()
            o["residual"] = res
        o["ddf"] = o.pop("ddf_t")[0].cpu().numpy()
    return outs


# ---------------------------------------------------------------------------------- jobs & writing
def _jobs(sample: Sample, opts: ExportOptions, digits: int) -> List[Job]:
    n = opts.per_image
    tp = parse_t_prime(opts.t_prime, n)
    tag = "pair" if opts.mode == "pairs" else "aug"
    ts = parse_t_prime(opts.t_prime_syn, n) if opts.mode == "pairs" else None
    jobs = []
    for i in range(n):
        rid = f"{sample.name}_{tag}{i:0{digits}d}"
        if ts is None:
            job = Job(sample.name, i, rid, (tp[i],), (derive_seed(opts.seed, sample.name, i),))
            job.paths = {"image": f"images/{rid}.nii.gz", "ddf": f"ddfs/{rid}_ddf.nii.gz"}
            if sample.labels:
                job.paths["labels"] = f"labels/{rid}.nii.gz"
        else:
            job = Job(sample.name, i, rid, (tp[i], ts[i]), (derive_seed(opts.seed, sample.name, i, "aug"),
                                                            derive_seed(opts.seed, sample.name, i, "syn")))
            job.paths = {"moving": f"moving/{rid}.nii.gz", "fixed": f"fixed/{rid}.nii.gz",
                         "ddf": f"ddfs/{rid}_ddf.nii.gz"}
            if sample.labels:
                job.paths.update(moving_labels=f"moving_labels/{rid}.nii.gz", fixed_labels=f"fixed_labels/{rid}.nii.gz")
        if opts.inverse:
            job.paths["inverse_ddf"] = f"inverse_ddfs/{rid}_inverse_ddf.nii.gz"
        jobs.append(job)
    return jobs


def _write(out: Path, ls: dict, job: Job, o: dict, opts: ExportOptions, overwrite: bool) -> dict:
    """Write one output's files (atomically) and return its manifest row."""
    import torch
    from .checkpoint import file_sha256
    from .io import write_nifti
    from .outputs import write_ddf
    vol, lab_vol, model, s = ls["vol"], ls["lab_vol"], ls["model"], ls["sample"]
    lab_hdr = lab_vol.header if lab_vol is not None and lab_vol.header is not None else vol.header
    row = {"row_id": job.row_id, "name": job.name, "index": job.index, "mode": opts.mode,
           "source": s.image, "source_sha256": ls["source_sha256"], "labels_source": s.labels,
           "labels_source_sha256": ls["labels_source_sha256"],
           "schedule": opts.schedule or model.config.schedule, "k": int(opts.k or model.config.k_recursions),
           "label_interp": opts.label_interp, "fold_guard": bool(opts.fold_guard), "model": model.name, "model_sha256": model.sha256,
           "model_size": model.size, "device": str(model.device), "threads": torch.get_num_threads()}
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
            if ls.get("label_values") is not None:
                check_label_values(o[key], np.union1d(ls["label_values"], [ls["background"]]), what)
            arrays[key] = writable_array(o[key].reshape(lab_vol.data.shape), what)
        else:
            check_finite(o[key], what + " (image)")
            arrays[key] = writable_array(o[key].reshape(vol.data.shape), what)
    written = []
    try:
        for key, rel in job.paths.items():
            p = out / rel
            if key in ("ddf", "inverse_ddf"):
                write_ddf(p, arrays[key], ls["spacing"], vol.affine, header=vol.header, overwrite=overwrite, root=out)
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


def _preview(ls: dict, o: dict, row: dict) -> dict:
    keys = ("moving", "fixed", "moving_labels", "fixed_labels") if "moving" in o else ("image", "labels")
    return {"row_id": row["row_id"], "spacing": ls["spacing"], "ddf": o["ddf"],
            **{k: o[k] for k in keys if o.get(k) is not None}}


def _batches(window: List[Tuple[dict, List[Job]]], size: int) -> List[List[Tuple[dict, Job]]]:
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for ls, jobs in window:
        for j in jobs:
            groups.setdefault((id(ls["model"]), j.key), []).append((ls, j))
    return [m[i:i + size] for m in groups.values() for i in range(0, len(m), size)]


# ---------------------------------------------------------------------------------- the run
def _kept_records(out: Path, own_name: str, done: Dict[str, dict], keep_skips: bool = True) -> List[dict]:
    """This shard's verified rows, their batch records and (unless retried) its skipped inputs
    (its journal is rewritten with them)."""
    own = [r for r in read_records(out) if r.pop("_journal") == own_name]
    rows = [r for r in own if r.get("type") == "row" and r["row_id"] in done
            and r.get("written_at") == done[r["row_id"]].get("written_at")]
    used = {r.get("batch_id") for r in rows}
    skips = [r for r in own if r.get("type") == "skip" and r.get("name")] if keep_skips else []
    return [r for r in own if r.get("type") == "batch" and r["batch_id"] in used] + rows + skips


def _journal_rows(path: Path) -> int:
    """Row records in a journal file (what the manifest will count)."""
    return sum(r.get("type") == "row" for r in journal_records(path))


def _pending(queue, ls) -> int:
    """Jobs of the input ``ls`` still waiting in later batches."""
    return sum(1 for m in queue for x in m if x[0] is ls)


def _check_out_vs_inputs(out: Path, items) -> None:
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


def _fingerprint(samples: Sequence[Sample]) -> List[list]:
    """(name, image, labels, bytes, mtime_ns) per input: what --resume compares."""
    def stat(path):
        if not path:
            return None
        p = Path(path)
        files = sorted(p.glob("*.dcm")) if p.is_dir() else [p]
        try:
            st = [f.stat() for f in files]
        except OSError:
            return None
        return [sum(x.st_size for x in st), max((x.st_mtime_ns for x in st), default=0)]
    return [[s.name, s.image, s.labels, stat(s.image), stat(s.labels)] for s in samples]


def _weights_sha(weights) -> Optional[str]:
    """sha256 of the weights file a run uses (bundled: from the registry; None: bundled per dimension)."""
    from .checkpoint import file_sha256
    from .weights import registry, resolve_weights
    names = [weights]
    if not weights:
        names = []
        for nd in (2, 3):
            try:
                names.append(_default_name(nd))
            except (LookupError, ValueError):
                names.append(None)
    shas = []
    for w in names:
        try:
            if w is None:
                raise LookupError
            path, name = resolve_weights(w)
        except (LookupError, FileNotFoundError, ValueError):
            shas.append(None)
            continue
        entry = registry().get(name) if not Path(str(w)).expanduser().exists() else None
        shas.append(entry.get("sha256") if entry and entry.get("sha256") else file_sha256(path))
    return shas[0] if weights else "|".join(str(x) for x in shas)


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
    out = Path(out_dir)
    opts.validate()
    mode = opts.mode
    i_shard, n_shard = opts.shard
    if not (n_shard >= 1 and 0 <= i_shard < n_shard):
        raise InputError(f"--shard {i_shard}/{n_shard}: expected i/n with 0 <= i < n")
    items = [inputs] if isinstance(inputs, (str, Path, ArrayInput)) else list(inputs)
    _check_out_vs_inputs(out, items)
    check_output_dir(out)
    lock = OutputLock(out, opts.shard, wait=opts.lock_wait, what=f"drdm export {mode}")
    with lock:
        gen = _export_locked(items, out, opts, model, preview, should_stop, lock)
        summary = yield from gen
    return summary


def _export_locked(items, out: Path, opts: ExportOptions, model, preview, should_stop, lock):
    mode = opts.mode
    i_shard, n_shard = opts.shard
    arrays = [a for a in items if isinstance(a, ArrayInput)]
    samples, skipped = discover(items, sources_dir=out / "sources")
    if not samples:
        raise InputError("no usable images found in " + ", ".join(shown(i) for i in items)
                         + "".join(f"\n  skipped {shown(s.path)}: {s.reason}" for s in skipped))
    digits = max(3, len(str(opts.per_image - 1)))
    settings = dict(opts.settings(), samples=[asdict(s) for s in samples], shards=n_shard,
                    row_tag="pair" if mode == "pairs" else "aug", digits=digits,
                    inputs=[f"layer:{p.name}" if isinstance(p, ArrayInput) else str(Path(p).resolve()) for p in items],
                    fingerprint=_fingerprint(samples), weights_sha256=_weights_sha(opts.weights) if model is None
                    else model.sha256)
    from . import __version__
    settings["version"] = __version__
    done_rows = prepare_output_folder(out, settings, opts.resume, opts.overwrite, opts.shard)
    done = {r["row_id"]: r for r in done_rows}
    for a in arrays:
        a.save(out / "sources")
    own_name = f"journal-{i_shard}-of-{n_shard}.jsonl"
    kept = _kept_records(out, own_name, done, keep_skips=not opts.retry_skipped) if opts.resume else []
    journal = Journal(out / own_name, keep=kept, root=out)
    n_kept_rows = sum(r.get("type") == "row" for r in kept)
    skipped_before = {r["name"]: r.get("reason", "") for r in kept if r.get("type") == "skip"}
    plan = []
    for s in samples[i_shard::n_shard]:
        jobs = _jobs(s, opts, digits)
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
    n_prev = sum(len(_jobs(s, opts, digits)) - len(p) for s, p in plan if s.name not in skipped_before)
    total = sum(len(p) for _, p in plan)
    counts: Dict[tuple, int] = {}
    for j in _jobs(Sample("x", ""), opts, digits):
        counts[j.key] = counts.get(j.key, 0) + 1
    # enough images per window that each T' group can fill a batch (bounded, for memory)
    window_n = max(1, min(8, math.ceil(opts.batch / min(counts.values()))))
    provider = ModelProvider(opts.weights, opts.device, opts.size, model)
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
                    window.append((load_sample(s, provider, memory=(budget, opts.batch, opts)), jobs))
                except InputError as e:
                    yield skip(s, str(e), len(jobs))
            queue = list(_batches(window, opts.batch))
            while queue:
                members = [m for m in queue.pop(0) if m[0]["sample"].name not in bad]
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
                    yield skip(ls["sample"], f"generation failed: {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0]}", 1 + _pending(queue, ls))
                    continue
                bid = f"{members[0][1].row_id}-{time.time_ns():x}"
                journal.append({"type": "batch", "batch_id": bid, "members": [
                    {"row_id": j.row_id, "name": j.name, "index": j.index, "key": list(j.key), "seeds": list(j.seeds),
                     "source": ls["sample"].image, "labels_source": ls["sample"].labels} for ls, j in members]})
                for b, ((ls, job), o) in enumerate(zip(members, outs)):
                    if ls["sample"].name in bad:
                        continue
                    try:
                        row = _write(out, ls, job, o, opts, overwrite=opts.resume or opts.overwrite or n_shard > 1)
                    except OutputError as e:
                        left = sum(1 for x in members[b:] if x[0] is ls) + _pending(queue, ls)
                        yield skip(ls["sample"], str(e), left)
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
        written = _journal_rows(journal.path) - n_kept_rows      # exactly what the journal holds
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


# ---------------------------------------------------------------------------------- reproduction
def reproduce_row(manifest, row_id: str, out_dir, model=None, device="auto", overwrite: bool = False) -> dict:
    """Regenerate one manifest row into ``out_dir`` (same relative paths) by re-running its batch.

    Returns ``{"row_id", "paths": {key: path}, "identical": {key: bool}}`` comparing each file's
    sha256 with the manifest.  Bit-identity needs the same weights, device type and torch build.
    The manifest may come from elsewhere: its output paths must stay inside ``out_dir`` (absolute
    paths, ``..`` and symlinks out are refused) and existing files are replaced only with
    ``overwrite``; both are checked, and ``out_dir`` locked, before anything is computed.
    """
    from .safety import confine
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
    opts = ExportOptions(mode=row["mode"], schedule=row["schedule"], k=row["k"], label_interp=row["label_interp"],
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
    if ls["source_sha256"] != row["source_sha256"]:
        raise InputError(f"{row['source']} changed since the row was written (sha256 differs)")
    if ls["model"].sha256 != row["model_sha256"]:
        raise InputError(f"weights differ from the manifest's ({row['model']}, sha256 {row['model_sha256'][:12]}...)")
    o = compute_batch(members, opts)[target]
    job.paths = {k: row[k] for k in keys}
    new = _write(Path(out_dir), ls, job, o, opts, overwrite=overwrite)
    return {"row_id": row_id, "paths": {k: str(Path(out_dir) / row[k]) for k in keys},
            "identical": {k: new[f"{k}_sha256"] == row[f"{k}_sha256"] for k in keys}}
