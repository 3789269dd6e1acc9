"""Guards of the output side, in one place: confinement of writes to the output root, one writer
per output folder, checks of an output folder before any computation, checks of arrays before they
are written, and a memory estimate before work starts.

Each guard lives in the module of its idea: :mod:`napari_drdm.paths` (printable and UTF-8 names,
confinement, writable output folder), :mod:`napari_drdm.output_lock` (the output-folder lock),
:mod:`napari_drdm.output_checks` (arrays before writing) and :mod:`napari_drdm.memory` (the
memory estimate).  All messages are one line naming the file, folder or option concerned and
what was expected.
"""
from __future__ import annotations

from .errors import OutputError
from .memory import available_memory, check_memory, estimate_export_bytes
from .output_checks import check_finite, check_label_values, writable_array
from .output_lock import LOCK_FILE, OutputLock, OutputLockedError, pid_alive
from .paths import UnsafePathError, check_output_dir, check_utf8_name, confine, shown

__all__ = ["UnsafePathError", "OutputLockedError", "OutputError", "confine", "OutputLock", "check_output_dir",
           "writable_array", "check_finite", "check_label_values", "shown", "check_utf8_name",
           "available_memory", "estimate_export_bytes", "check_memory", "pid_alive", "LOCK_FILE"]
