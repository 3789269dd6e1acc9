"""The options of an export run (:class:`ExportOptions`): their checks, the settings a run records
in ``run.json`` (its identity for ``--resume``), and what a model's side bounds."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

from ..core.config import margin_as_option
from .jobspec import parse_t_prime

__all__ = ["ExportOptions", "check_model_options", "margin_used", "fit_used", "size_kept"]


@dataclass
class ExportOptions:
    mode: str = "augment"                 # "augment" (Algorithm 3) or "pairs" (Algorithm 4)
    per_image: int = 1
    t_prime: str = "reference"            # T' spec (T'_aug in pairs mode)
    t_prime_syn: str = "45"               # pairs mode only
    seed: int = 0
    schedule: Optional[str] = None        # None: the model's default
    compose_padding: Optional[str] = None  # reverse-loop composition, "border" or "zeros"; None: the model's
    input_padding: Optional[int] = None    # px of mirrored image around the network's input; None: the model's
    background_margin: Union[None, int, str] = None  # px kept around the anatomy, or "off"; None: the model's
    anatomy_fit: Union[None, int, str] = None  # px around the anatomy in the fitted view, or "off"; None: the model's
    keep_size: Union[None, bool, str] = None   # the field's global zoom over the anatomy removed; None: the model's
    k: Optional[int] = None
    batch: int = 4
    inverse: bool = False
    inverse_iterations: int = 50
    label_interp: str = "nearest"
    weights: Optional[str] = None         # None: bundled model of the input's dimension
    device: str = "auto"
    size: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    shard: Tuple[int, int] = (0, 1)
    strict: bool = False                  # stop at the first unusable input instead of skipping it
    fold_guard: bool = False              # written fields fold-free on the input's grid (core/foldguard.py)
    retry_skipped: bool = False           # with resume: retry inputs an earlier run skipped
    max_memory: Optional[float] = None    # GB for the memory estimate (None: the memory available)
    lock_wait: float = 0.0                # seconds to wait for another writer of OUT to finish

    def validate(self) -> "ExportOptions":
        """Check every option (one line naming it and what was expected); returns self."""
        from ..validate import (
            check_anatomy_fit_option,
            check_background_margin_option,
            check_bool,
            check_choice,
            check_compose_padding,
            check_device,
            check_input_padding_option,
            check_int,
            check_k,
            check_keep_size_option,
            check_label_interp,
            check_model_size,
            check_positive,
            check_schedule,
            check_seed,
        )
        check_choice(self.mode, ("augment", "pairs"), "mode")
        self.per_image = check_int("--per-image", self.per_image, 1, 10 ** 6)
        self.seed = check_seed(self.seed)
        self.k = check_k(self.k, "--k")
        self.batch = check_int("--batch", self.batch, 1, 4096)
        self.inverse_iterations = check_int("--inverse-iterations", self.inverse_iterations, 0, 10 ** 5)
        self.size = check_model_size(self.size)
        self.device = check_device(self.device)
        check_schedule(self.schedule)
        check_compose_padding(self.compose_padding)
        self.input_padding = check_input_padding_option(self.input_padding)   # S/2: per model, see check_model_options
        self.background_margin = check_background_margin_option(self.background_margin)
        self.anatomy_fit = check_anatomy_fit_option(self.anatomy_fit)
        self.keep_size = check_keep_size_option(self.keep_size)
        check_label_interp(self.label_interp)
        self.max_memory = check_positive(self.max_memory, "--max-memory (GB)")
        self.fold_guard = check_bool(self.fold_guard, "--fold-guard")
        parse_t_prime(self.t_prime, self.per_image)
        if self.mode == "pairs":
            parse_t_prime(self.t_prime_syn, self.per_image)
        return self

    def loop_options(self) -> dict:
        """The reverse loop's keyword options of :meth:`napari_drdm.model.DRDM.generate_model_grid`
        (None: the model's own), in one place for every generation an export makes."""
        return {"schedule": self.schedule, "k": self.k, "fold_guard": self.fold_guard,
                "compose_padding": self.compose_padding, "input_padding": self.input_padding,
                "background_margin": self.background_margin, "anatomy_fit": self.anatomy_fit,
                "keep_size": self.keep_size}

    def bounded_options(self) -> tuple:
        """The options a model's side bounds (< S/2, :func:`check_model_options`)."""
        return (self.input_padding, self.background_margin, self.anatomy_fit)

    def settings(self) -> dict:
        d = asdict(self)
        for k in ("batch", "device", "resume", "overwrite", "shard", "strict", "retry_skipped", "max_memory",
                  "lock_wait"):
            d.pop(k)
        d["weights"] = self.weights or "auto"
        if self.mode != "pairs":
            d["t_prime_syn"] = None
        return d


def check_model_options(model, opts: ExportOptions) -> None:
    """The options a model's side S bounds (``input_padding``, ``background_margin`` and
    ``anatomy_fit`` < S/2): InputError, one line naming the option, when ``model`` cannot use them."""
    from ..validate import check_anatomy_fit_option, check_background_margin_option, check_input_padding_option
    check_input_padding_option(opts.input_padding, model.size, "--input-padding")
    check_background_margin_option(opts.background_margin, model.size, "--background-margin")
    check_anatomy_fit_option(opts.anatomy_fit, model.size, "--anatomy-fit")


def margin_used(model, opts: ExportOptions):
    """The background margin a row was made with: pixels, or "off"."""
    from ..model import resolve_background_margin
    return margin_as_option(resolve_background_margin(opts.background_margin, model.config))


def fit_used(model, opts: ExportOptions):
    """The anatomy fit a row was made with: pixels, or "off" (the whole image)."""
    from ..model import resolve_anatomy_fit
    return margin_as_option(resolve_anatomy_fit(opts.anatomy_fit, model.config))


def size_kept(model, opts: ExportOptions) -> bool:
    """Whether a row was made with the field's global zoom removed (core/keep_size.py)."""
    from ..model import resolve_keep_size
    return resolve_keep_size(opts.keep_size, model.config)
