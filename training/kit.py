"""The training data kit: fetch the pinned sources of kit_sources.py, convert them to NIfTI, split by subject.

    python -m training.kit --out cache/kit [--cache DIR] [--sources nilearn lung1 ...]

Downloads go to a cache (``--cache``, else ``$NAPARI_DRDM_KIT_CACHE``, else ``~/.cache/napari-drdm/kit``)
and are verified against pinned sha256 digests. The output folder gets one folder per subject
with ``.nii.gz`` files and a ``manifest.json`` that records, for every output, its subject and
split, the source package and version, the files inside the package it came from with their
sha256, its own sha256, its licence and whether it may never be shipped. Rerunning reuses
whatever is intact; a source that fails is reported, the others go on, and the exit code is 1.

Training code reads the kit with :func:`load_kit`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from .kit_convert import Item, gz_bytes, to_canonical
from .kit_fetch import (
    FetchError,
    Log,
    default_cache_dir,
    extract_members,
    fetch_archive,
    sha256_file,
)
from .kit_sources import CATALOGUE, SPLITS, Catalogue, Entry, Source

KIT_VERSION = 1  # bump when a converter's output changes, so cached outputs are rebuilt
MANIFEST = "manifest.json"

Record = dict[str, Any]


class KitRecord(NamedTuple):
    """One training image of the kit."""

    image: Path
    label: Path | None
    spacing: tuple[float, ...]
    subject: str


class KitError(RuntimeError):
    """The kit on disk is inconsistent (e.g. a subject in two splits)."""


# ---------------------------------------------------------------- building


def build_kit(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    sources: Sequence[str] | None = None,
    log: Log = print,
    catalogue: Catalogue = CATALOGUE,
) -> dict[str, str]:
    """Build (or refresh) the kit in ``out_dir``; return ``{source: error}`` for failures."""
    out, cache = Path(out_dir), Path(cache_dir) if cache_dir else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    selected = [catalogue.source(k) for k in sources] if sources else list(catalogue.sources)
    previous = _by_source(read_manifest(out).get("files", []))
    records: dict[str, list[Record]] = {}
    failed: dict[str, str] = {}
    for src in selected:
        start = time.perf_counter()
        log(f"[{src.key}]")
        try:
            records[src.key] = build_source(src, out, cache, previous.get(src.key, []),
                                            catalogue, log)
            log(f"  {len(records[src.key])} files in {time.perf_counter() - start:.1f} s")
        except Exception as exc:  # noqa: BLE001 - one source failing must not stop the others
            failed[src.key] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED {src.key}: {failed[src.key]}")
    for key, old in previous.items():
        if key not in records and _intact(old, out):
            records[key] = old
    write_manifest(out, [r for key in sorted(records) for r in records[key]], failed, catalogue)
    return failed


def build_source(
    src: Source, out: Path, cache: Path, previous: list[Record], catalogue: Catalogue, log: Log
) -> list[Record]:
    """Fetch one package and convert its entries, reusing intact outputs of the same archive."""
    archive_path = fetch_archive(src.archive, cache, log)
    if previous and _intact(previous, out) and all(
        r["source"]["archive_sha256"] == src.archive.sha256 and r["kit_version"] == KIT_VERSION
        for r in previous
    ):
        log("  outputs up to date")
        return previous
    records: list[Record] = []
    for entry in src.entries:
        files = extract_members(src.archive, archive_path, entry.members,
                                cache / "extracted" / src.key)
        shas = {m: sha256_file(p) for m, p in files.items()}
        for item in entry.convert(files):
            records.append(write_item(item, entry, src, out, shas, catalogue))
    return records


def write_item(
    item: Item, entry: Entry, src: Source, out: Path, shas: dict[str, str], catalogue: Catalogue
) -> Record:
    """Write one output file and return its manifest record."""
    rel = f"{entry.subject}/{item.stem}.nii.gz"
    img = to_canonical(item)
    target = out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(gz_bytes(img))
    return {
        "path": rel,
        "role": item.role,
        "subject": entry.subject,
        "split": split_of(entry.subject, catalogue),
        "label": f"{entry.subject}/{item.label}.nii.gz" if item.label else None,
        "modality": item.modality,
        "shape": list(img.shape),
        "dtype": str(img.get_data_dtype()),
        "spacing": [round(float(z), 6) for z in img.header.get_zooms()[:3]],
        "classes": {str(k): v for k, v in item.classes.items()} if item.classes else None,
        "source": {
            "package": src.archive.name, "version": src.archive.version,
            "client": src.archive.client, "archive": src.archive.filename,
            "archive_sha256": src.archive.sha256, "key": src.key, "entry": entry.key,
        },
        "inputs": [{"path": m, "sha256": shas[m]} for m in item.inputs],
        "sha256": sha256_file(target),
        "licence": src.archive.licence,
        "never_ship": bool(entry.never_ship),
        "never_ship_reason": entry.never_ship or None,
        "note": item.note,
        "extra": dict(item.extra),
        "kit_version": KIT_VERSION,
    }


def split_of(subject: str, catalogue: Catalogue) -> str:
    """The split of a subject; every subject must be assigned exactly one."""
    split = catalogue.splits.get(subject)
    if split not in SPLITS:
        raise KitError(f"subject '{subject}' has no split (one of {SPLITS})")
    return split


def _intact(records: list[Record], out: Path) -> bool:
    """All files exist with the recorded digests."""
    return all((out / r["path"]).exists() and sha256_file(out / r["path"]) == r["sha256"]
               for r in records)


def _by_source(records: list[Record]) -> dict[str, list[Record]]:
    grouped: dict[str, list[Record]] = {}
    for r in records:
        grouped.setdefault(r["source"]["key"], []).append(r)
    return grouped


# ---------------------------------------------------------------- manifest


def write_manifest(
    out: Path, records: list[Record], failed: dict[str, str], catalogue: Catalogue
) -> Path:
    """Write ``manifest.json`` after checking that no subject spans two splits."""
    check_splits(records)
    subjects = sorted({r["subject"] for r in records})
    manifest = {
        "kit_version": KIT_VERSION,
        "splits": {s: sorted({r["subject"] for r in records if r["split"] == s}) for s in SPLITS},
        "subjects": {s: {"split": split_of(s, catalogue), "note": catalogue.notes.get(s, "")}
                     for s in subjects},
        "failed": failed,
        "files": records,
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    """The kit's manifest, or an empty one when there is none yet."""
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def check_splits(records: list[Record]) -> None:
    """Raise :class:`KitError` if any subject appears in more than one split."""
    seen: dict[str, str] = {}
    for r in records:
        if seen.setdefault(r["subject"], r["split"]) != r["split"]:
            raise KitError(f"subject '{r['subject']}' is in both '{seen[r['subject']]}' "
                           f"and '{r['split']}'")


# ---------------------------------------------------------------- reading


def load_kit(out_dir: str | Path, split: str) -> list[KitRecord]:
    """The images of one split (``train``, ``val``, ``test`` or ``all``) with their labels."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {SPLITS + ('all',)}, not '{split}'")
    out = Path(out_dir)
    manifest = read_manifest(out)
    if not manifest:
        raise KitError(f"no {MANIFEST} in {out}: build the kit first (python -m training kit)")
    files = manifest["files"]
    check_splits(files)
    return [
        KitRecord(out / r["path"], out / r["label"] if r["label"] else None,
                  tuple(r["spacing"]), r["subject"])
        for r in files
        if r["role"] == "image" and split in (r["split"], "all")
    ]


# ---------------------------------------------------------------- command line


def add_kit_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``kit`` sub-command to an ``argparse`` sub-parser set."""
    parser = subparsers.add_parser("kit", help="fetch and convert the training data kit",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    parser.set_defaults(func=_run_args)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder of the kit")
    parser.add_argument("--cache", type=Path, default=None,
                        help="download cache (default: $NAPARI_DRDM_KIT_CACHE or ~/.cache/napari-drdm/kit)")
    parser.add_argument("--sources", nargs="+", metavar="SOURCE", default=None,
                        help="build only these: " + ", ".join(CATALOGUE.keys()))


def _run_args(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        failed = build_kit(args.out, args.cache, args.sources)
    except (KeyError, KitError, FetchError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}")
        return 2
    print(f"kit in {args.out} ({time.perf_counter() - start:.1f} s)")
    for key, msg in failed.items():
        print(f"FAILED source {key}: {msg}")
    return 1 if failed else 0


def main_kit(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m training.kit --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m training.kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return _run_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main_kit())
