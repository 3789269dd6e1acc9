"""Validators for user-supplied options (command line and Python API).

Each validator returns the cleaned value or raises :class:`~napari_drdm.errors.InputError` (a
``ValueError``) with one line naming the option and what was expected, so the command line can
print it as is; the Python API, the command line and the widgets call the same validators.  :func:`arg_type` turns a
validator into an ``argparse`` ``type=`` so that a bad value is refused while parsing, before
any work.
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence, Union

from .core.config import (
    BACKGROUND_OFF,
    COMPOSE_PADDINGS,
    KEEP_SIZE_INFLATION,
    SCHEDULE_NAMES,
    background_margin_fits,
    input_padding_fits,
)
from .errors import DeviceError, DRDMError, InputError

__all__ = ["check_int", "check_seed", "check_t_prime", "check_k", "check_threads", "check_device",
           "check_model_size", "check_choice", "check_schedule", "check_compose_padding", "check_input_padding_option",
           "check_background_margin_option", "check_anatomy_fit_option", "check_keep_size_option",
           "check_label_interp",
           "check_positive", "check_bool", "arg_type", "MAX_SEED", "SCHEDULES", "COMPOSE_PADDINGS", "LABEL_INTERPS"]

#: reverse-loop schedules (core/recovery.py): "paper" runs T' steps, "reference" all T steps
SCHEDULES = SCHEDULE_NAMES
#: label interpolation methods (core/spatial.py ``warp_labels``)
LABEL_INTERPS = ("nearest", "linear_argmax")

#: largest seed a ``torch.Generator`` accepts (seeds are unsigned 64-bit there; we keep them signed-safe)
MAX_SEED = 2 ** 63 - 1


def check_int(name: str, value, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """An integer option within [lo, hi].

    Args:
        name: the option's name as the user knows it (``--seed``, ``t_prime``), used in the message.
        value: an ``int``, a NumPy integer, an integral float (``45.0``) or a string of digits.
            Booleans and non-integral numbers (``10.7``) are refused, never rounded.
        lo: smallest accepted value (None: no bound).
        hi: largest accepted value (None: no bound).

    Returns:
        The value as a Python ``int``.

    Raises:
        InputError: naming ``name``, the value and the accepted range.
    """
    rng = ("" if lo is None and hi is None else
           f" >= {lo}" if hi is None else f" <= {hi}" if lo is None else f" in {lo}..{hi}")
    expected = f"{name}: expected an integer{rng}, got {value!r}"
    if isinstance(value, bool):
        raise InputError(expected)
    if isinstance(value, str):
        try:
            v = int(value.strip())
        except ValueError:
            raise InputError(expected) from None
    elif isinstance(value, numbers.Integral):
        v = int(value)
    elif isinstance(value, numbers.Real):
        f = float(value)
        if not (f == f and abs(f) != float("inf") and f.is_integer()):
            raise InputError(expected)
        v = int(f)
    else:
        raise InputError(expected)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputError(expected)
    return v


def check_seed(value, name: str = "--seed") -> int:
    """A random seed in 0 .. 2**63 - 1 (what ``torch.Generator.manual_seed`` accepts).

    Args:
        value: the seed.
        name: option name for the message.
    """
    return check_int(name, value, 0, MAX_SEED)


def check_t_prime(value, n_steps: int = 80, name: str = "t_prime (T')") -> int:
    """A diffusion level T' in 0..n_steps; non-integers (10.7) are refused, not truncated.

    Args:
        value: T'.
        n_steps: the model's T.
        name: option name for the message.
    """
    return check_int(name, value, 0, n_steps)


def check_k(value, name: str = "k") -> Optional[int]:
    """Internal recursions K >= 1, or None for the model's default.

    Args:
        value: K or None.
        name: option name for the message.
    """
    return None if value is None else check_int(name, value, 1, 64)


def check_threads(value, name: str = "--threads") -> Optional[int]:
    """A CPU thread count >= 1, or None for torch's choice.

    Args:
        value: thread count or None.
        name: option name for the message.
    """
    return None if value is None else check_int(name, value, 1, 4096)


def check_model_size(value, name: str = "--size") -> Optional[int]:
    """A model side S: a positive multiple of 8, or None (the checkpoint's own).

    Args:
        value: S or None.
        name: option name for the message.
    """
    if value is None:
        return None
    v = check_int(name, value, 8, 4096)
    if v % 8:
        raise InputError(f"{name}: expected a multiple of 8 (the network halves the grid three times), got {v}")
    return v


def check_device(value, name: str = "--device") -> str:
    """A device string usable on this machine: auto, cpu, cuda, cuda:N, mps.

    Args:
        value: the device (``"auto"`` or None: choose).
        name: option name for the message.

    Returns:
        The device string, unchanged.

    Raises:
        DeviceError: unknown device, or a GPU that is not present here.
    """
    import torch
    if value is None or str(value) == "auto":
        return "auto"
    s = str(value)
    try:
        dev = torch.device(s)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"{name}: expected auto, cpu, cuda, cuda:N or mps, got {s!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{name} {s}: no CUDA GPU is available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{name} {s}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"expected cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"{name} {s}: Apple MPS is not available on this machine (use --device cpu or auto)")
    elif dev.type != "cpu":
        raise DeviceError(f"{name}: expected auto, cpu, cuda, cuda:N or mps, got {s!r}")
    return s


def check_choice(value, choices: Sequence[str], name: str, allow_none: bool = False) -> Optional[str]:
    """One of a fixed set of words.

    Args:
        value: the word (None accepted when ``allow_none``: the default applies).
        choices: the accepted words.
        name: option name for the message.
        allow_none: accept None (returned unchanged).
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name}: expected {' or '.join(choices) if len(choices) < 3 else ', '.join(choices)}, "
                         f"got {value!r}")
    return value


def check_schedule(value, name: str = "--schedule") -> Optional[str]:
    """A reverse-loop schedule (:data:`SCHEDULES`), or None for the model's own.

    Args:
        value: the schedule or None.
        name: option name for the message.
    """
    return check_choice(value, SCHEDULES, name, allow_none=True)


def check_compose_padding(value, name: str = "--compose-padding") -> Optional[str]:
    """A reverse-loop composition padding (:data:`COMPOSE_PADDINGS`), or None for the model's own.

    Args:
        value: the padding or None.
        name: option name for the message.
    """
    return check_choice(value, COMPOSE_PADDINGS, name, allow_none=True)


def check_input_padding_option(value, size: Optional[int] = None, name: str = "--input-padding") -> Optional[int]:
    """The reverse loop's input padding (pixels of mirrored image around the network's input at
    every step, ``DRDMConfig.input_padding``), or None for the model's own.

    A whole number of pixels, a multiple of 4, from 0 to below S/2 (the rule of
    :func:`~napari_drdm.core.config.check_input_padding`); the S/2 bound is checked only when
    the model's side ``size`` is known.

    Args:
        value: the padding (an int, an integral float or a string of digits) or None.
        size: the model's side S, or None (not known yet: the bound is checked later).
        name: option name for the message.
    """
    if value is None:
        return None
    return _pixels_below_half_side(value, size, name, "a multiple of 4 pixels", input_padding_fits)


def _pixels_below_half_side(value, size: Optional[int], name: str, what: str, fits: Callable) -> int:
    """``value`` as whole pixels that ``fits(v, size)`` (a rule bounded by half the model's side S);
    else one :class:`InputError` line: "NAME: expected WHAT from 0 to below S/2 ..., got VALUE"."""
    bound = f"below S/2 = {size // 2} (the model's side S = {size})" if size else "below half the model's side S"
    expected = f"{name}: expected {what} from 0 to {bound}, got "
    try:
        v = check_int(name, value)
    except InputError:
        raise InputError(expected + repr(value)) from None
    if not fits(v, size):
        raise InputError(expected + str(v))
    return v


def check_background_margin_option(value, size: Optional[int] = None,
                                   name: str = "--background-margin") -> Union[None, str, int]:
    """The background extension's margin (``DRDMConfig.background_margin``, core/background.py):
    pixels kept around the anatomy, beyond which the recovered field is replaced by the harmonic
    extension of the field around it; ``"off"`` (:data:`~napari_drdm.core.config.BACKGROUND_OFF`)
    for none; None for the model's own.

    A whole number of pixels from 0 to below S/2; the S/2 bound is checked only when the model's
    side ``size`` is known.

    Args:
        value: the margin (an int, an integral float or a string of digits), "off", or None.
        size: the model's side S, or None (not known yet: the bound is checked later).
        name: option name for the message.
    """
    return _pixels_or_off(value, size, name)


def check_anatomy_fit_option(value, size: Optional[int] = None,
                             name: str = "--anatomy-fit") -> Union[None, str, int]:
    """The anatomy fit's margin (``DRDMConfig.anatomy_fit``, core/view.py): pixels of the model's
    view kept around the anatomy when the view is fitted to it; ``"off"`` for the whole image; None
    for the model's own.  The values, the S/2 bound and the arguments are those of
    :func:`check_background_margin_option`."""
    return _pixels_or_off(value, size, name)


def check_keep_size_option(value, name: str = "--keep-size") -> Union[None, bool, str]:
    """Whether the final field's global zoom over the anatomy is removed (``DRDMConfig.keep_size``,
    core/keep_size.py): True / "on" (both ways), "inflation" (only an enlargement is taken out),
    False / "off", or None for the model's own.

    Args:
        value: a bool, "on" / "off" / "inflation" (any case), or None.
        name: option name for the message.

    Returns:
        None, True, False or ``"inflation"``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("on", "off", KEEP_SIZE_INFLATION):
        v = value.strip().lower()
        return KEEP_SIZE_INFLATION if v == KEEP_SIZE_INFLATION else v == "on"
    raise InputError(f"{name} must be 'on', 'off' or '{KEEP_SIZE_INFLATION}', got {value!r}")


def _pixels_or_off(value, size: Optional[int], name: str) -> Union[None, str, int]:
    """None, "off", or whole pixels from 0 to below S/2 (one :class:`InputError` line otherwise)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == BACKGROUND_OFF:
        return BACKGROUND_OFF
    return _pixels_below_half_side(value, size, name, f"'{BACKGROUND_OFF}' or a whole number of pixels",
                                   background_margin_fits)


def check_label_interp(value, name: str = "--label-interp") -> str:
    """A label interpolation method (:data:`LABEL_INTERPS`).

    Args:
        value: the method.
        name: option name for the message.
    """
    return check_choice(value, LABEL_INTERPS, name)


def check_positive(value, name: str, allow_none: bool = True) -> Optional[float]:
    """A finite number > 0 (a memory budget in GB, a wait in seconds), or None.

    Args:
        value: the number, a string of one, or None (when ``allow_none``).
        name: option name for the message.
        allow_none: accept None (returned unchanged).
    """
    if value is None and allow_none:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if isinstance(value, bool) or not (0 < v < float("inf")):
        raise InputError(f"{name}: expected a positive number, got {value!r}")
    return v


def check_bool(value, name: str) -> bool:
    """True or False (a bool, a NumPy bool, 0 or 1; strings are refused, never guessed).

    Args:
        value: the flag.
        name: option name for the message.
    """
    if isinstance(value, str) or not hasattr(value, "__bool__") or getattr(value, "ndim", 0) \
            or value not in (True, False):
        raise InputError(f"{name}: expected true or false, got {value!r}")
    return bool(value)


def arg_type(check: Callable, name: str, **kw) -> Callable[[str], object]:
    """An ``argparse`` ``type=`` calling ``check(value, name=name, **kw)``; its message is shown as is."""
    import argparse

    def parse(text: str):
        try:
            return check(value=text, name=name, **kw)
        except (DRDMError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name.lstrip("-").replace("-", "_")
    return parse
