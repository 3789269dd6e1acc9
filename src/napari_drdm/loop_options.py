"""A generation's reverse-loop options resolved against the model's own settings.

Each option of :meth:`~napari_drdm.model.DRDM.iter_generate` that a model also stores (its
``DRDMConfig``) means "the model's own" when None.  The pixel options that can be switched off
(``background_margin``, ``anatomy_fit``) also take ``"off"``
(:data:`~napari_drdm.core.config.BACKGROUND_OFF`), which a configuration writes as None.  A bad
value is one :class:`~napari_drdm.errors.InputError` line naming the option (the model's side S
bounds them all below S/2).
"""
from __future__ import annotations

from typing import Optional, Union

from .core.config import BACKGROUND_OFF, DRDMConfig
from .validate import check_anatomy_fit_option, check_background_margin_option, check_input_padding_option, check_keep_size_option

__all__ = ["resolve_input_padding", "resolve_background_margin", "resolve_anatomy_fit", "resolve_keep_size"]


def resolve_input_padding(value, cfg: DRDMConfig) -> int:
    """The input padding a generation uses: ``value``, or for None the model's own."""
    v = check_input_padding_option(value, cfg.size, "input_padding")
    return cfg.input_padding if v is None else v


def _own_or_off(v, own: Optional[int]) -> Optional[int]:
    """A checked pixels-or-off option: None -> the model's ``own``, "off" -> None, pixels as given."""
    if v is None:
        return own
    return None if v == BACKGROUND_OFF else v


def resolve_background_margin(value, cfg: DRDMConfig) -> Optional[int]:
    """The background margin a generation uses (None: no extension): ``value``, "off", or for None
    the model's own."""
    return _own_or_off(check_background_margin_option(value, cfg.size, "background_margin"), cfg.background_margin)


def resolve_anatomy_fit(value, cfg: DRDMConfig) -> Optional[int]:
    """The anatomy fit a generation uses (None: the whole image): ``value``, "off", or for None the
    model's own."""
    return _own_or_off(check_anatomy_fit_option(value, cfg.size, "anatomy_fit"), cfg.anatomy_fit)


def resolve_keep_size(value, cfg: DRDMConfig) -> Union[bool, str]:
    """Whether a generation removes the final field's global zoom (core/keep_size.py): ``value``
    (True / False / "on" / "off" / "inflation"), or for None the model's own.  Returns True, False
    or ``"inflation"`` (truthy: only an enlargement is taken out)."""
    v = check_keep_size_option(value, "keep_size")
    return cfg.keep_size if v is None else v          # DRDMConfig checked it: False, True or "inflation"
