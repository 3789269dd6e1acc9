"""One source of truth for a DRDM model's settings (saved inside every checkpoint) and for the
choices and defaults the rest of the package shares: T, the reverse-loop schedules, the
default schedule and the composition paddings a user may ask for."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional, Tuple

from ..errors import InputError

__all__ = ["DRDMConfig", "T", "Schedule", "SCHEDULE_NAMES", "DEFAULT_SCHEDULE", "COMPOSE_PADDINGS",
           "check_input_padding", "check_loop_extra",
           "check_background_margin", "check_anatomy_fit", "BACKGROUND_OFF", "KEEP_SIZE_INFLATION",
           "keep_size_name", "margin_as_option"]

KEEP_SIZE_INFLATION = "inflation"   # DRDMConfig.keep_size: only an enlargement of the anatomy is taken out


def keep_size_name(value) -> str:
    """A keep-size setting as the command line writes it: "on" (True), "inflation", or "off"
    (False, None)."""
    if value == KEEP_SIZE_INFLATION:
        return KEEP_SIZE_INFLATION
    return "on" if value is True else "off"


#: T, the number of diffusion times of the reference model (t is 0-based, 0..T-1)
T = 80


class Schedule(str, Enum):
    """Length of the reverse loop (a ``str``: ``Schedule.PAPER == "paper"``).

    ``PAPER``: T' steps, t = T'-1 .. 0 (the paper's Algorithm 2).
    ``REFERENCE``: all T steps, t = T-1 .. 0 whatever T' is (what the authors' code does).
    """

    PAPER = "paper"
    REFERENCE = "reference"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, name: str = "schedule") -> "Schedule":
        """A schedule from its name (or a :class:`Schedule`).

        Raises :class:`~napari_drdm.errors.InputError` (a ``ValueError``) otherwise, one line
        naming ``name`` and the accepted names.

        Args:
            value: one of :data:`SCHEDULE_NAMES` or a :class:`Schedule`.
            name: how the value is called in the error message.
        """
        try:
            return cls(value)
        except ValueError:
            raise InputError(f"{name} must be one of {', '.join(SCHEDULE_NAMES)}, got {value!r}") from None


#: the schedule names, for command-line choices and menus
SCHEDULE_NAMES = tuple(s.value for s in Schedule)

#: the loop generation runs unless told otherwise: chosen by measurement with the published 2D
#: checkpoint (at T' = 45 the same displacement as the paper loop with half the folding)
DEFAULT_SCHEDULE = Schedule.REFERENCE

#: how the reverse loop may compose each step into the accumulated field (``recover``'s
#: ``compose_padding``): "border" repeats the edge displacement for points that leave the image,
#: "zeros" takes none there (the authors' 2D code).  A model records its own; a user may override it.
COMPOSE_PADDINGS = ("border", "zeros")


def check_loop_extra(value, n_steps: int = T) -> int:
    """A valid ``loop_extra``: a whole number of steps from 0 to T.

    Raises:
        InputError: (a ValueError) one line naming the value and what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value \
            or not 0 <= int(value) <= n_steps:
        raise InputError(f"loop_extra must be a whole number of steps from 0 to T = {n_steps}, got {value!r}")
    return int(value)


def input_padding_fits(value: int, size: Optional[int] = None) -> bool:
    """The rule of ``input_padding``: >= 0, a multiple of 4 (the padded side, S + 2 * padding, stays
    divisible by 8) and, when the model's side ``size`` is known, below S / 2."""
    return value >= 0 and value % 4 == 0 and (not size or value < size // 2)


def check_input_padding(value, size: int) -> int:
    """A valid ``input_padding`` for a model of side ``size``: a whole number of pixels >= 0, a
    multiple of 4 (the padded side, S + 2 * padding, stays divisible by 8), below S / 2.

    Raises:
        InputError: (a ValueError) one line naming the value and what was expected.
    """
    return _checked_pixels(value, size, "input_padding", "", "a multiple of 4 ", input_padding_fits)


def _checked_pixels(value, size: int, field: str, alternative: str, what: str, fits) -> int:
    """``value`` as whole pixels that ``fits(v, size)``; else one :class:`InputError` line naming
    ``field``, ``alternative`` (e.g. "None (off) or ") and what was expected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise InputError(f"{field} must be {alternative}a whole number of pixels, got {value!r}")
    v = int(value)
    if not fits(v, size):
        raise InputError(f"{field} must be {alternative}{what}from 0 to below S/2 = {size // 2} pixels, got {v}")
    return v


#: the value that turns the background extension off where None means "the model's own" (an
#: inference option); in a configuration, off is None
BACKGROUND_OFF = "off"


def margin_as_option(margin: Optional[int]):
    """A configuration's ``background_margin`` as the option that asks for it: pixels, or
    :data:`BACKGROUND_OFF` for None (as the manifest, the menus and set-inference show it)."""
    return BACKGROUND_OFF if margin is None else int(margin)


def background_margin_fits(value: int, size: Optional[int] = None) -> bool:
    """The rule of ``background_margin``: >= 0 and, when the model's side ``size`` is known, below S / 2."""
    return value >= 0 and (not size or value < size // 2)


def check_background_margin(value, size: int) -> Optional[int]:
    """A valid ``background_margin`` for a model of side ``size``: None (off: the reverse loop's field
    is returned as it is, the reference's behaviour) or a whole number of pixels from 0 to below S / 2
    (core/background.py: the field farther than that from anything bright is replaced by the
    harmonic extension of the field around it).

    Raises:
        InputError: (a ValueError) one line naming the value and what was expected.
    """
    if value is None:
        return None
    return _checked_pixels(value, size, "background_margin", "None (off) or ", "", background_margin_fits)


def check_anatomy_fit(value, size: int) -> Optional[int]:
    """A valid ``anatomy_fit`` for a model of side ``size``: None (off: the model sees the whole
    image, the reference's behaviour) or a whole number of pixels from 0 to below S / 2, the margin
    kept around the anatomy when the model's view is fitted to it (core/view.py).

    Raises:
        InputError: (a ValueError) one line naming the value and what was expected.
    """
    if value is None:
        return None
    return _checked_pixels(value, size, "anatomy_fit", "None (off) or ", "", background_margin_fits)


@dataclass
class DRDMConfig:
    """Everything needed to rebuild a model and reproduce its generations.

    Defaults are the reference implementation's; ``size`` is the model's
    isotropic side S in pixels.
    """

    ndim: int = 2
    size: int = 256
    n_steps: int = T                        # T; t is 0-based, 0..T-1
    in_channels: int = 1
    channels: Tuple[int, int, int] = (10, 20, 40)
    time_dim: int = 100
    # forward sampler
    control_grid: int = 64                  # control points per axis, covering 2x the field of view
    scales: Tuple[int, ...] = (64, 32, 16, 8)
    sigma: float = 4e-5                     # fraction of the control grid
    noise_ratio: float = 0.08               # disturbance field amplitude relative to sigma
    alpha: float = 0.6                      # n_t = floor(t^alpha)
    beta: float = 1.3                       # n_{t:1} = clamp(floor(2 t^beta / 3), 1, max_compositions)
    max_compositions: int = 200
    field_scale: str = "reference"          # 'reference' (x S/64, as trained upstream) or 'geometric' (x 2)
    sampler_padding: str = "border"
    # recovery (reverse loop)
    k_recursions: int = 2                   # K, internal recursions of the network
    compose_padding: str = "zeros"          # reverse-loop composition: zeros (2D cardiac) / border (3D)
    image_interp: str = "cubic"             # image fed to the network each step: cubic (2D) / linear (3D)
    schedule: str = DEFAULT_SCHEDULE.value  # default loop: 'reference' (all T steps) or 'paper' (T' steps)
    loop_extra: int = 0                     # the paper loop starts this many steps above T' (0: Algorithm 2)
    input_padding: int = 0                  # px of mirrored image around the network's input (0: the reference)
    background_margin: Optional[int] = None  # px kept around the anatomy; the field beyond is extended (None: off)
    anatomy_fit: Optional[int] = None       # px around the anatomy when the view is fitted to it (None: whole image)
    keep_size: Any = False                  # the final field's global zoom over the anatomy removed (core/keep_size.py):
                                            # False, True (both ways) or "inflation" (only an enlargement)
    extra: Dict[str, Any] = field(default_factory=dict)  # provenance, free-form

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.scales = tuple(int(s) for s in self.scales)
        if self.ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {self.ndim}")
        if self.size % 8:
            raise ValueError(f"model side S must be divisible by 8, got {self.size}")
        if self.ndim == 3 and self.image_interp == "cubic":
            self.image_interp = "linear"
        self.schedule = Schedule.parse(self.schedule).value
        self.loop_extra = check_loop_extra(self.loop_extra, self.n_steps)
        self.input_padding = check_input_padding(self.input_padding, self.size)
        self.background_margin = check_background_margin(self.background_margin, self.size)
        self.anatomy_fit = check_anatomy_fit(self.anatomy_fit, self.size)
        if not (isinstance(self.keep_size, bool) or self.keep_size == KEEP_SIZE_INFLATION):
            raise InputError(f"keep_size must be true, false or '{KEEP_SIZE_INFLATION}', got {self.keep_size!r}")

    @classmethod
    def default(cls, ndim: int, size: int | None = None, **kw) -> "DRDMConfig":
        """Reference settings for 2D (cardiac config) or 3D (lct config)."""
        if ndim == 2:
            return cls(ndim=2, size=size or 256, compose_padding="zeros", image_interp="cubic", **kw)
        return cls(ndim=3, size=size or 128, compose_padding="border", image_interp="linear", **kw)

    def field_factor(self) -> float:
        """Multiplier from control-grid fractions to image fractions (S/64 upstream, 2 geometric)."""
        if self.field_scale == "reference":
            return self.size / self.control_grid
        if self.field_scale == "geometric":
            return 2.0
        return float(self.field_scale)

    def loop_extra_for(self, schedule=None) -> int:
        """The steps above T' the loop ``schedule`` (default: the model's) starts with: the model's
        ``loop_extra`` for the paper loop, 0 for the reference loop (what a record writes)."""
        return self.loop_extra if Schedule.parse(self.schedule if schedule is None else schedule) is Schedule.PAPER else 0

    def recover_options(self, schedule=None, k=None, compose_padding=None, input_padding=None) -> Dict[str, Any]:
        """The keyword options of :func:`~napari_drdm.core.recovery.recover` for this model.

        The model's ``loop_extra`` goes with them: a model's paper loop is its own, whichever way
        the paper loop was asked for (the reference loop ignores it).

        Args:
            schedule: the loop (a :class:`Schedule` or its name); default: the model's.
            k: K, the network's internal recursions; default: the model's.
            compose_padding: one of :data:`COMPOSE_PADDINGS`; default: the model's.
            input_padding: pixels of mirrored image around the network's input
                (:func:`check_input_padding`); default: the model's.
        """
        return {"schedule": Schedule.parse(self.schedule if schedule is None else schedule),
                "k": int(self.k_recursions if k is None else k), "n_steps": self.n_steps,
                "compose_padding": self.compose_padding if compose_padding is None else compose_padding,
                "image_interp": self.image_interp, "loop_extra": self.loop_extra,
                "input_padding": self.input_padding if input_padding is None
                else check_input_padding(input_padding, self.size)}

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        d["scales"] = list(self.scales)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DRDMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        kw = {k: v for k, v in d.items() if k in names}
        cfg = cls(**kw)
        if unknown:
            cfg.extra = dict(cfg.extra, ignored_keys=sorted(unknown))
        return cfg

    def replace(self, **kw) -> "DRDMConfig":
        return dataclasses.replace(self, **kw)
