"""Input discovery for a dataset export: which images (and label maps) a run reads, under which names.

Naming rule for labels (see docs/export.md):

* flat folder (or a list of files): ``case01.nii.gz`` is paired with ``case01_label.*``,
  ``case01_labels.*`` or ``case01_seg.*`` (any supported format); a sub-folder of ``.dcm`` files
  is one DICOM series, named like a file (``case02/`` + ``case02_seg/``);
* ``IN/images/`` + ``IN/labels/``: a label file has the image's name, or its stem plus one of the
  suffixes above.

Every input gets a unique name (the stem of its output files); what cannot be used is reported as
:class:`Skipped` with its reason, never silently dropped.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..io import IMAGE_SUFFIXES, stem_of
from ..paths import check_utf8_name, shown

__all__ = ["LABEL_SUFFIXES", "ArrayInput", "Sample", "Skipped", "discover", "path_sha256", "fingerprint"]

LABEL_SUFFIXES = ("_label", "_labels", "_seg")


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
        d = Path(sources_dir).absolute()      # a relative folder would be re-rooted by the writer's confinement
        return d / f"{safe}.nii.gz", (d / f"{safe}_label.nii.gz" if self.labels is not None else None)

    def save(self, sources_dir):
        from ..io import write_nifti
        img, lab = self.paths(sources_dir)
        write_nifti(img, np.asarray(self.image), self.affine, header=self.header, overwrite=True, root=sources_dir)
        if lab is not None:
            write_nifti(lab, np.asarray(self.labels), self.affine, overwrite=True, root=sources_dir)


@dataclass
class Skipped:
    path: str
    reason: str


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


def fingerprint(samples: Sequence[Sample]) -> List[list]:
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
