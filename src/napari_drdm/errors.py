"""The package's exceptions: one base class, a few meaningful kinds.

Every error a user can cause (a bad option, an unreadable or unusable input, unknown weights, a
corrupt weights file, a device that is not there) is a :class:`DRDMError` whose message is one line
naming the input and what was expected.  The command line catches the base class and prints that
line; the widgets show it.  Each kind also derives from the built-in exception a caller would
naturally catch, so ``except ValueError`` or ``except LookupError`` keeps working:

* :class:`InputError` (a ``ValueError``): an option or input value out of its range, an image or
  label map that cannot be used (unreadable, mismatched, non-integer labels);
* :class:`DeviceError` (an :class:`InputError`): an unknown device, or a GPU that is absent;
* :class:`WeightsNotFoundError` (a ``LookupError``): a weights name that is neither bundled nor a
  file, or a weights file that does not exist;
* :class:`CheckpointError` (a ``ValueError``): a weights file that exists but is corrupt, unsafe
  to load, or not a DRDM checkpoint;
* :class:`OutputError` (a ``ValueError``): an output array that cannot be written faithfully (an
  export skips that input and goes on).
"""
from __future__ import annotations

__all__ = ["DRDMError", "InputError", "DeviceError", "WeightsNotFoundError", "CheckpointError", "OutputError",
           "one_line"]


class DRDMError(Exception):
    """Base of the errors a user can cause; ``str(e)`` is one line naming the input and what was expected."""


class InputError(DRDMError, ValueError):
    """An option or input that cannot be used: a value out of range, an unreadable or mismatched image,
    a label map holding non-integer values."""


class DeviceError(InputError):
    """A device that is unknown or not present on this machine (``--device cuda`` without CUDA)."""


class WeightsNotFoundError(DRDMError, LookupError):
    """Weights named by a string that is neither a bundled name nor an existing file.

    Unlike ``KeyError``, ``str(e)`` is the message itself (no quotes added)."""


class CheckpointError(DRDMError, ValueError):
    """A weights file that exists but is corrupt, unsafe to load, or not a DRDM checkpoint."""


class OutputError(DRDMError, ValueError):
    """An output array that cannot be written faithfully (NaN, a changed label value, a dtype NIfTI lacks)."""


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (``KeyError`` unwrapped: no added quotes).

    Args:
        e: any exception.
    """
    msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
    return (str(msg).strip().splitlines() or [""])[0]
