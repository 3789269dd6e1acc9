"""Dataset export plumbing: input discovery and image/label pairing, job specification
(T' schedules, per-output seeds), the output-folder safety rules and the manifest.

Naming rule for labels (see docs/export.md):

* flat folder (or a list of files): ``case01.nii.gz`` is paired with ``case01_label.*``,
  ``case01_labels.*`` or ``case01_seg.*`` (any supported format); a sub-folder of ``.dcm`` files
  is one DICOM series, named like a file (``case02/`` + ``case02_seg/``);
* ``IN/images/`` + ``IN/labels/``: a label file has the image's name, or its stem plus one of the
  suffixes above.

The manifest is written incrementally: every finished output appends one JSON line (flushed and
fsynced) to ``journal-<i>-of-<n>.jsonl``; ``manifest.json`` and ``manifest.csv`` are rebuilt
atomically from all journals at the end of a run (and on Ctrl-C or an error).  A journal line
cut short by a crash is ignored when read.
"""
from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .io import IMAGE_SUFFIXES, atomic_write
from .safety import check_utf8_name, shown

__all__ = ["LABEL_SUFFIXES", "ArrayInput", "Sample", "Skipped", "discover", "parse_t_prime", "derive_seed", "stem_of",
           "path_sha256", "Journal", "read_records", "verify_row", "write_manifest", "load_manifest",
           "prepare_output_folder", "RUN_FILE", "MANIFEST_JSON", "MANIFEST_CSV"]

LABEL_SUFFIXES = ("_label", "_labels", "_seg")
RUN_FILE = "run.json"
MANIFEST_JSON = "manifest.json"
MANIFEST_CSV = "manifest.csv"
_SIDE_FILES = (RUN_FILE, MANIFEST_JSON, MANIFEST_CSV, ".manifest.lock")


@dataclass
class Sample:
    """One input: an image and its optional label map; ``name`` is the unique output stem."""

    name: str
    image: str
    labels: Optional[str] = None


@dataclass
class ArrayInput:
    """An in-memory input (e.g. napari layers); saved as ``OUT/sources/<name>.nii.gz`` (+ ``_label``)
    before the run, so that its rows are reproducible like those of files."""

    name: str
    image: Any
    labels: Any = None
    affine: Any = None
    header: Any = None

    def paths(self, sources_dir) -> Tuple[Path, Optional[Path]]:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("._") or "layer"
        d = Path(sources_dir)
        return d / f"{safe}.nii.gz", (d / f"{safe}_label.nii.gz" if self.labels is not None else None)

    def save(self, sources_dir):
        from .io import write_nifti
        img, lab = self.paths(sources_dir)
        write_nifti(img, np.asarray(self.image), self.affine, header=self.header, overwrite=True, root=sources_dir)
        if lab is not None:
            write_nifti(lab, np.asarray(self.labels), self.affine, overwrite=True, root=sources_dir)


@dataclass
class Skipped:
    path: str
    reason: str


# ---------------------------------------------------------------------------------- discovery
def stem_of(path) -> str:
    name = Path(str(path).rstrip("/\\")).name
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def _label_base(stem: str) -> Optional[str]:
    for suf in LABEL_SUFFIXES:
        if stem.lower().endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)]
    return None


def _is_series(p: Path) -> bool:
    return p.is_dir() and any(p.glob("*.dcm"))


def _is_image_file(p: Path) -> bool:
    low = p.name.lower()
    return p.is_file() and any(low.endswith(s) for s in IMAGE_SUFFIXES)


def _unsupported(p: Path) -> str:
    return f"unsupported file type {''.join(p.suffixes[-2:]) or p.name!r} (see docs/export.md for the formats)"


def _scan(folder: Path, skipped: List[Skipped]) -> List[Path]:
    """Readable entries of a folder (files and DICOM-series sub-folders); others are reported."""
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        try:
            check_utf8_name(p)
        except ValueError as e:
            skipped.append(Skipped(shown(p), str(e).split(": ", 1)[-1]))
            continue
        if _is_image_file(p) or _is_series(p):
            out.append(p)
        elif p.is_file():
            skipped.append(Skipped(str(p), _unsupported(p)))
    return out


def _pair(entries: Sequence[Path], skipped: List[Skipped], label_entries: Optional[Sequence[Path]] = None,
          look_beside: bool = False) -> List[Tuple[Path, Optional[Path]]]:
    """Pair images with label maps by the naming rule; unmatched label maps are reported."""
    images: List[Path] = []
    labels: Dict[str, List[Path]] = {}
    for p in entries:
        base = _label_base(stem_of(p)) if label_entries is None else None
        if base is not None:
            labels.setdefault(base, []).append(p)
        else:
            images.append(p)
    for p in label_entries or []:
        s = stem_of(p)
        labels.setdefault(_label_base(s) or s, []).append(p)
    pairs, used = [], set()
    for img in images:
        s = stem_of(img)
        cands = labels.get(s, [])
        if not cands and look_beside:
            cands = [q for q in sorted(img.parent.iterdir()) if q != img and _label_base(stem_of(q)) == s
                     and (_is_image_file(q) or _is_series(q))]
        if len(cands) > 1:
            skipped.append(Skipped(str(img), "several label maps match it: " + ", ".join(q.name for q in cands)))
            used.add(s)
            continue
        pairs.append((img, cands[0] if cands else None))
        used.add(s)
    for base, labs in labels.items():
        if base not in used:
            for q in labs:
                skipped.append(Skipped(str(q), "label map without a matching image"))
    return pairs


def discover(inputs: Iterable, skipped: Optional[List[Skipped]] = None,
             sources_dir=None) -> Tuple[List[Sample], List[Skipped]]:
    """Images (+ label maps) from folders, files and :class:`ArrayInput` items (saved under
    ``sources_dir``), in a stable order, with unique names."""
    skipped = [] if skipped is None else skipped
    pairs: List[Tuple[Path, Optional[Path]]] = []
    loose: List[Path] = []
    for item in ([inputs] if isinstance(inputs, (str, Path)) else list(inputs)):
        if isinstance(item, ArrayInput):
            img, lab = item.paths(sources_dir)
            pairs.append((img, lab))
            continue
        p = Path(item).expanduser()
        try:
            check_utf8_name(p)
        except ValueError as e:
            skipped.append(Skipped(shown(p), str(e).split(": ", 1)[-1]))
            continue
        if not p.exists():
            skipped.append(Skipped(str(p), "not found"))
        elif p.is_dir() and (p / "images").is_dir():
            lab_dir = p / "labels"
            pairs += _pair(_scan(p / "images", skipped), skipped,
                           _scan(lab_dir, skipped) if lab_dir.is_dir() else [])
        elif p.is_dir() and not _is_series(p):
            pairs += _pair(_scan(p, skipped), skipped)
        elif _is_image_file(p) or _is_series(p):
            loose.append(p)
        else:
            skipped.append(Skipped(str(p), _unsupported(p)))
    if loose:
        pairs += _pair(loose, skipped, look_beside=True)
    names: Dict[str, int] = {}
    samples = []
    for img, lab in pairs:
        name = stem_of(img)
        if name in names:
            name = f"{img.parent.name}_{name}"
        k = 2
        base = name
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names[name] = 1
        samples.append(Sample(name, str(img.absolute()), str(lab.absolute()) if lab else None))
    return samples, skipped


def path_sha256(path) -> str:
    """sha256 of a file, or of a DICOM-series folder (its .dcm names and contents, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(p.glob("*.dcm")) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------- job spec
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


# ---------------------------------------------------------------------------------- manifest
def _fsync_dir(path: Path):
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Journal:
    """Append-only JSON-lines record of finished outputs (one line per record, fsynced)."""

    def __init__(self, path, keep: Sequence[dict] = (), root=None):
        from .safety import confine
        self.path = confine(root, path) if root is not None else Path(path)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep)
        if keep or self.path.exists():
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text), overwrite=True, root=root)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def append(self, record: dict):
        try:
            self._f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e} while appending to the journal {self.path}") from None

    def close(self):
        if not self._f.closed:
            self._f.close()


def journal_records(path) -> List[dict]:
    """The parsable records of one journal file (a line cut short by a crash is ignored)."""
    recs = []
    p = Path(path)
    if not p.exists():
        return recs
    with open(p) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict):
                r["_journal"] = p.name
                recs.append(r)
    return recs


def read_records(out_dir) -> List[dict]:
    """All parsable records of all journals in ``out_dir`` (a line cut short by a crash is ignored)."""
    return [r for j in sorted(Path(out_dir).glob("journal-*-of-*.jsonl")) for r in journal_records(j)]


def output_keys(row: dict) -> List[str]:
    return [k[: -len("_sha256")] for k in row if k.endswith("_sha256") and k[: -len("_sha256")] in row
            and k not in ("source_sha256", "labels_source_sha256", "model_sha256")]


def verify_row(out_dir, row: dict) -> bool:
    """True when every output file of the row exists and has the recorded sha256."""
    from .checkpoint import file_sha256
    keys = output_keys(row)
    if not keys:
        return False
    for k in keys:
        p = Path(out_dir) / row[k]
        if not p.is_file() or file_sha256(p) != row[f"{k}_sha256"]:
            return False
    return True


_FIRST = ["row_id", "name", "index", "source", "source_sha256", "labels_source", "labels_source_sha256",
          "mode", "seed", "t_prime", "seed_aug", "t_prime_aug", "seed_syn", "t_prime_syn", "schedule", "k",
          "label_interp", "model", "model_sha256", "model_size", "device", "threads", "batch_id", "batch_index",
          "batch_size", "max_disp_pct", "mean_disp_pct", "folding_pct", "min_jacobian"]


def _columns(rows: Sequence[dict]) -> List[str]:
    seen = {k for r in rows for k in r if not k.startswith("_") and k != "type"}
    return [c for c in _FIRST if c in seen] + sorted(seen - set(_FIRST))


def collect(out_dir, records: Optional[List[dict]] = None):
    """(rows by id, batches by id, skipped list) from the journals; the newest record of a row wins."""
    records = read_records(out_dir) if records is None else records
    rows: Dict[str, dict] = {}
    batches: Dict[str, dict] = {}
    skipped: Dict[str, dict] = {}
    for r in records:
        t = r.get("type")
        if t == "row":
            old = rows.get(r["row_id"])
            if old is None or r.get("written_at", 0) >= old.get("written_at", 0):
                rows[r["row_id"]] = {k: v for k, v in r.items() if not k.startswith("_") and k != "type"}
        elif t == "batch":
            batches[r["batch_id"]] = {k: v for k, v in r.items() if not k.startswith("_") and k != "type"}
        elif t == "skip":
            skipped[r["path"]] = {k: r[k] for k in ("path", "reason", "name") if k in r}
    return rows, batches, list(skipped.values())


@contextmanager
def _lock(out_dir: Path):
    """Exclusive lock while merging (best effort: POSIX flock; no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".manifest.lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_manifest(out_dir) -> dict:
    """Merge every journal of ``out_dir`` into ``manifest.json`` and ``manifest.csv`` (atomic)."""
    from .outputs import write_json
    out = Path(out_dir)
    with _lock(out):
        run = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {}
        rows, batches, skipped = collect(out)
        ordered = [rows[k] for k in sorted(rows)]
        bad_names = {s.get("name") for s in skipped if s.get("name")}
        expected = {f"{s['name']}_{run.get('row_tag', 'aug')}{i:0{run.get('digits', 3)}d}"
                    for s in run.get("samples", []) if s["name"] not in bad_names
                    for i in range(int(run.get("per_image", 0)))}
        missing = sorted(expected - set(rows))
        used = {r.get("batch_id") for r in ordered}
        manifest = {"run": run, "rows": ordered, "batches": {k: v for k, v in batches.items() if k in used},
                    "skipped": skipped, "n_rows": len(ordered), "n_missing": len(missing),
                    "complete": not missing, "missing": missing[:100]}
        write_json(out / MANIFEST_JSON, manifest, overwrite=True, root=out)
        cols = _columns(ordered)
        buf = _io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in ordered:
            w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
        text = buf.getvalue()
        atomic_write(out / MANIFEST_CSV, lambda tmp: Path(tmp).write_text(text), overwrite=True, root=out)
        _fsync_dir(out)
    return manifest


def load_manifest(path) -> dict:
    """A manifest: ``manifest.json``, or an output folder (merged from its journals on the fly)."""
    p = Path(path)
    if p.is_dir():
        if (p / MANIFEST_JSON).exists() and not list(p.glob("journal-*-of-*.jsonl")):
            return json.loads((p / MANIFEST_JSON).read_text())
        rows, batches, skipped = collect(p)
        run = json.loads((p / RUN_FILE).read_text()) if (p / RUN_FILE).exists() else {}
        return {"run": run, "rows": [rows[k] for k in sorted(rows)], "batches": batches, "skipped": skipped}
    if p.suffix.lower() == ".csv":
        raise InputError(f"{p}: give manifest.json or the output folder (the CSV does not hold the batch records)")
    return json.loads(p.read_text())


# ---------------------------------------------------------------------------------- folder rules
IDENTITY_KEYS = ("mode", "per_image", "t_prime", "t_prime_syn", "seed", "schedule", "k", "weights", "inverse",
                 "label_interp", "inverse_iterations")


def _is_empty(out: Path) -> bool:
    """No files but temporaries, or only the bookkeeping of a run that wrote no output yet."""
    if not out.exists():
        return True
    names = [p.name for p in out.iterdir() if not (p.name.startswith(".") and (".part-" in p.name
                                                                             or p.name.startswith(".drdm")))]
    side = all(n in _SIDE_FILES or n == "sources" or (n.startswith("journal-") and n.endswith(".jsonl"))
               for n in names)
    return not names or (side and not collect(out)[0])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_partials(out: Path):
    """Remove temporary files left by a killed writer (name ``.<file>.part-<pid>...``, pid gone)."""
    for p in out.rglob(".*.part-*"):
        try:
            pid = int(p.name.split(".part-")[1].split(".")[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
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
    from .outputs import write_json
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
    same = prev is not None and all(prev.get(k) == settings.get(k) for k in IDENTITY_KEYS) \
        and _same_weights(prev, settings)
    done: List[dict] = []
    if overwrite:
        # journals of other shards of this (sharded) run may already be in use: leave them alone
        stale = [j for j in out.glob("journal-*-of-*.jsonl") if j == journal or not j.name.endswith(f"-of-{n}.jsonl")]
        for p in stale + [out / MANIFEST_JSON, out / MANIFEST_CSV]:
            p.unlink(missing_ok=True)
    elif resume:
        if prev is not None and not same:
            diff = [k for k in IDENTITY_KEYS if prev.get(k) != settings.get(k)]
            if not _same_weights(prev, settings):
                diff.append("weights file (sha256)")
            raise FileExistsError(f"{out} holds a run with different settings ({', '.join(diff)}); "
                                  f"--resume needs the same settings (or use --overwrite or another folder)")
        if prev is not None:
            _check_same_inputs(out, prev, settings)
        if out.exists():
            _clean_partials(out)
            rows, _, _ = collect(out)
            done = [r for r in rows.values() if verify_row(out, r)]
    elif not _is_empty(out):
        sharded_join = n > 1 and same and prev.get("shards") == n and not journal.exists()
        if not sharded_join:
            raise FileExistsError(f"output folder {out} is not empty; refusing to write into it. Use --resume to "
                                  f"complete an interrupted run, --overwrite to replace it, or another folder")
    write_json(run_file, settings, overwrite=True, root=out)
    return done


def sample_record(s: Sample) -> dict:
    return asdict(s)
