"""The job specification of a dataset export: what each output of each input is.

An input gets ``per_image`` outputs; output ``i`` has its T' (from a T' specification, see
:func:`parse_t_prime`), its own seed (:func:`derive_seed`: from the run seed, the input's name and
``i``, so that adding or removing inputs changes no other output) and its file paths.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List

from ..errors import InputError
from .discovery import Sample

if TYPE_CHECKING:
    from .options import ExportOptions

__all__ = ["Job", "parse_t_prime", "derive_seed", "make_jobs"]


@dataclass
class Job:
    name: str
    index: int
    row_id: str
    key: tuple                             # T' (augment) or (T'_aug, T'_syn) (pairs)
    seeds: tuple                           # (seed,) or (seed_aug, seed_syn)
    paths: Dict[str, str] = field(default_factory=dict)


def parse_t_prime(spec, n: int, n_steps: int = 80) -> List[int]:
    """T' for each of the ``n`` outputs of an image.

    ``"45"``: every output; ``"40,45,50"``: cycled (output i gets item i mod 3); ``"40:52:2"``:
    start:stop[:step] with stop **included** (40, 42, ..., 52), cycled; ``"reference"``: the
    authors' augmentation schedule 48, 50, 50, 52, 52, ... i.e. T'_i = 48 + 2 * ceil(i / 2)
    (i = 0-based output index), capped at T.
    """
    s = str(spec).strip().lower().replace(" ", "")
    if n < 1:
        raise InputError(f"the number of outputs per image must be >= 1, got {n}")
    try:
        if s in ("reference", "ref"):
            values = [min(n_steps, 48 + 2 * math.ceil(i / 2)) for i in range(n)]
            return values
        if ":" in s:
            parts = [int(v) for v in s.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] == 0):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else (1 if stop >= start else -1)
            base = list(range(start, stop + (1 if step > 0 else -1), step))
        else:
            base = [int(v) for v in s.split(",") if v != ""]
    except ValueError:
        raise InputError(f"invalid T' specification {spec!r}: expected a number (45), a list (40,45,50), "
                         f"a range start:stop[:step] (40:52:2, stop included) or 'reference'") from None
    if not base:
        raise InputError(f"T' specification {spec!r} gives no value")
    bad = [v for v in base if not 0 <= v <= n_steps]
    if bad:
        raise InputError(f"T' values must lie in 0..{n_steps}; {spec!r} gives {bad}")
    return [base[i % len(base)] for i in range(n)]


def derive_seed(base: int, name: str, index: int, stage: str = "") -> int:
    """Per-output seed (48 bits) from the run seed, the input's name and the output index, so it
    does not depend on the input order, sharding, batching or resuming."""
    key = f"{int(base)}|{name}|{int(index)}|{stage}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:6], "big")


def make_jobs(sample: Sample, opts: "ExportOptions", digits: int) -> List[Job]:
    """The outputs of one input: row ids, T' values, seeds and relative file paths.

    Args:
        sample: the input.
        opts: the run's options (mode, per_image, T' specifications, seed, inverse).
        digits: zero-padding of the output index in the row id.
    """
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
