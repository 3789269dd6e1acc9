"""The journal and the manifest of a dataset export.

The manifest is written incrementally: every finished output appends one JSON line (flushed and
fsynced) to ``journal-<i>-of-<n>.jsonl``; ``manifest.json`` and ``manifest.csv`` are rebuilt
atomically from all journals at the end of a run (and on Ctrl-C or an error).  A journal line
cut short by a crash is ignored when read.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import InputError
from ..io import atomic_write

__all__ = ["Journal", "journal_records", "read_records", "output_keys", "verify_row", "collect", "write_manifest",
           "load_manifest", "kept_records", "journal_rows", "RUN_FILE", "MANIFEST_JSON", "MANIFEST_CSV"]

RUN_FILE = "run.json"


MANIFEST_JSON = "manifest.json"


MANIFEST_CSV = "manifest.csv"


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
        from ..paths import confine
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
    from ..checkpoint import file_sha256
    keys = output_keys(row)
    if not keys:
        return False
    for k in keys:
        p = Path(out_dir) / row[k]
        if not p.is_file() or file_sha256(p) != row[f"{k}_sha256"]:
            return False
    return True


_FIRST = ["row_id", "name", "index", "source", "source_sha256", "labels_source", "labels_source_sha256",
          "mode", "seed", "t_prime", "seed_aug", "t_prime_aug", "seed_syn", "t_prime_syn", "schedule", "loop_extra",
          "compose_padding", "input_padding", "background_margin", "anatomy_fit", "keep_size", "k", "label_interp", "model",
          "model_sha256", "model_size", "device", "threads", "torch", "cpu_capability", "batch_id",
          "batch_index", "batch_size", "max_disp_pct", "mean_disp_pct", "folding_pct", "min_jacobian"]


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
    from ..outputs import write_json
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


def kept_records(out: Path, own_name: str, done: Dict[str, dict], keep_skips: bool = True) -> List[dict]:
    """This shard's verified rows, their batch records and (unless retried) its skipped inputs
    (its journal is rewritten with them)."""
    own = [r for r in read_records(out) if r.pop("_journal") == own_name]
    rows = [r for r in own if r.get("type") == "row" and r["row_id"] in done
            and r.get("written_at") == done[r["row_id"]].get("written_at")]
    used = {r.get("batch_id") for r in rows}
    skips = [r for r in own if r.get("type") == "skip" and r.get("name")] if keep_skips else []
    return [r for r in own if r.get("type") == "batch" and r["batch_id"] in used] + rows + skips


def journal_rows(path: Path) -> int:
    """Row records in a journal file (what the manifest will count)."""
    return sum(r.get("type") == "row" for r in journal_records(path))
