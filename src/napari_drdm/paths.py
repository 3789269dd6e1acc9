"""Paths on the output side: printable names, UTF-8 names, confinement of writes to the output
root, and the check that an output folder is writable before any computation.

All messages are one line naming the file or folder concerned and what was expected.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import DRDMError, InputError

__all__ = ["UnsafePathError", "shown", "check_utf8_name", "confine", "check_output_dir"]


class UnsafePathError(DRDMError, ValueError):
    """A write target outside the output root (absolute path, ``..``, a symlink pointing out).

    Not an :class:`OutputError`: an export skips an input whose outputs cannot be written, but
    stops at a path that leaves the output folder."""


def shown(path) -> str:
    """A path printable on any terminal: bytes that are not UTF-8 appear as ``\\xNN``."""
    s = os.fspath(path)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_utf8_name(path) -> None:
    """Refuse a file name that is not valid UTF-8 (it could not be recorded in the JSON manifest).

    Args:
        path: the file.

    Raises:
        InputError: naming the file (undecodable bytes shown as ``\\xNN``).
    """
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{shown(path)}: the file name is not valid UTF-8; rename it") from None


def confine(root, target) -> Path:
    """The absolute path of ``target`` if it lies inside ``root``, else refuse.

    Every output file is written through :func:`napari_drdm.io.atomic_write`, which calls this
    with the output root.

    Args:
        root: the output root folder (may not exist yet; symlinks in it are resolved).
        target: a path relative to ``root`` (or absolute but inside it). Absolute paths elsewhere,
            ``..`` components that leave ``root`` and symlinks (of folders or of the file itself)
            pointing outside ``root`` are refused.

    Returns:
        The resolved target path.

    Raises:
        UnsafePathError: naming the target and the root.
    """
    root_r = Path(os.path.abspath(root)).resolve()
    t = Path(target)
    full = t if t.is_absolute() else Path(root) / t
    resolved = Path(os.path.abspath(full)).resolve()
    try:
        resolved.relative_to(root_r)
    except ValueError:
        raise UnsafePathError(f"refusing to write {shown(target)}: it resolves to {shown(resolved)}, outside the "
                              f"output folder {shown(root_r)} (absolute paths, '..' and symlinks out are refused)") \
            from None
    if resolved == root_r:
        raise UnsafePathError(f"refusing to write {shown(target)}: it is the output folder itself")
    return resolved


def check_output_dir(out_dir, what: str = "output folder") -> Path:
    """Check, before any computation, that ``out_dir`` is (or can be made) a writable folder.

    A probe file is created and removed, which also catches read-only mounts and full disks.

    Args:
        out_dir: the folder (created if missing).
        what: how to name it in messages.

    Raises:
        NotADirectoryError / OSError: naming the folder and the reason.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{what} {shown(out)} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".drdm-write-test-{uuid.uuid4().hex}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        raise OSError(e.errno, f"{what} {shown(out)} is not writable: {e.strerror or e}") from None
    return out
