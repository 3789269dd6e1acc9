"""Benchmarks never overwrite a record without being asked.

Every benchmark that writes files checks its output paths right after parsing its arguments, before
anything is measured, so a long run is not wasted on a name that is taken and no earlier record is
lost by re-running a command: an existing file stops it with one line naming the file, unless
``--force`` is given.

    ap = argparse.ArgumentParser(...)
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)          # ap.error(...) -> exit status 2
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Optional, Union

PathLike = Union[str, Path, None]


def add_force_arg(ap: argparse.ArgumentParser) -> None:
    """Add ``--force``: overwrite the benchmark's output files when they exist."""
    ap.add_argument("--force", action="store_true", help="overwrite output files that already exist")


def existing_outputs(paths: Iterable[PathLike]) -> list:
    """The paths among ``paths`` (None and "-" skipped) that already exist."""
    return [Path(p) for p in paths if p not in (None, "", "-") and Path(p).exists()]


def check_outputs(ap: Optional[argparse.ArgumentParser], force: bool, *paths: PathLike) -> None:
    """Stop with one line if any of ``paths`` exists and ``force`` is false.

    Args:
        ap: the benchmark's parser; its ``error`` prints the line and exits with status 2.  None
            raises :class:`FileExistsError` instead.
        force: overwrite without asking (the ``--force`` option).
        *paths: the files the benchmark will write; None (an output not asked for) is skipped.
    """
    taken = existing_outputs(paths)
    if not taken or force:
        return
    names = ", ".join(str(p) for p in taken)
    msg = f"{names} already exist{'s' if len(taken) == 1 else ''}: choose another name or add --force to overwrite"
    if ap is None:
        raise FileExistsError(msg)
    ap.error(msg)
