"""What one explorer run is asked, worked out from the chosen layers, the model and the form.

Qt-free.  :func:`prepare_run` is the explorer's whole check before Run: an image layer and a
model must be chosen, the layers must hold what the model can deform (:func:`~._inputs.read_inputs`,
the engine's own checks, and the model's dimensionality against the data's) and the frames get a
memory plan (:func:`~._layers.plan_frames`).  It raises :class:`~napari_drdm.errors.InputError`
(a ``ValueError``) with the one line the dock shows beside a disabled Run, or returns a
:class:`RunRequest`: the arrays, the frame plan, the generation's arguments and where the output
layers go.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ..core.config import BACKGROUND_OFF, Schedule, margin_as_option
from ..errors import InputError
from ..validate import (
    check_anatomy_fit_option,
    check_background_margin_option,
    check_input_padding_option,
    check_keep_size_option,
)
from ._inputs import Inputs, output_geometry, read_inputs
from ._layers import FramePlan, label_dtype, plan_frames

__all__ = ["RunRequest", "prepare_run", "generation_params", "NO_IMAGE"]

NO_IMAGE = "No image layer: open an image or a sample (File > Open Sample > napari-drdm)."


@dataclass
class RunRequest:
    """Everything Run starts a generation with."""

    inputs: Inputs
    plan: FramePlan
    params: Dict[str, Any]                  # t_prime, seed, schedule, compose_padding, input_padding, k, fold_guard,
                                            # device (+ variant)
    out_scale: Tuple[float, ...]            # geometry of the output layers, frame axis left out
    out_translate: Tuple[float, ...]
    out_affine: Optional[np.ndarray]

    @property
    def geometry(self) -> tuple:
        """(scale, translate, affine) of the output layers."""
        return self.out_scale, self.out_translate, self.out_affine


def generation_params(generation: Dict[str, Any], config, device) -> Dict[str, Any]:
    """The generation's arguments: the form's options without the frame budget, the model's device,
    and a ``variant`` naming what departs from the model's defaults (e.g. "paper K2 zeros-padding guard").
    InputError (one line) when the input padding, background margin or anatomy fit does not suit the
    model (below S/2).

    Args:
        generation: the form's generation options (t_prime, seed, schedule, compose_padding,
            input_padding, background_margin, anatomy_fit, keep_size, k, budget_mib, fold_guard).
        config: the model's :class:`~napari_drdm.core.config.DRDMConfig`.
        device: the model's device.
    """
    p = dict(generation)
    p.pop("budget_mib", None)
    p["device"] = str(device)
    variant = []
    if p["schedule"] != config.schedule or p["k"] != config.k_recursions:
        variant.append(f"{p['schedule']} K{p['k']}")
    padding = p.get("compose_padding")
    if padding is not None and padding != config.compose_padding:
        variant.append(f"{padding}-padding")
    pad_in = check_input_padding_option(p.get("input_padding"), config.size, "Input padding")
    if pad_in is not None and pad_in != config.input_padding:
        variant.append(f"{pad_in}px-input-padding")
    margin = check_background_margin_option(p.get("background_margin"), config.size, "Background margin")
    if margin is not None and margin != margin_as_option(config.background_margin):
        variant.append("no-background-extension" if margin == BACKGROUND_OFF else f"{margin}px-background-margin")
    fit = check_anatomy_fit_option(p.get("anatomy_fit"), config.size, "Anatomy fit")
    if fit is not None and fit != margin_as_option(config.anatomy_fit):
        variant.append("whole-image-view" if fit == BACKGROUND_OFF else f"{fit}px-anatomy-fit")
    keep = check_keep_size_option(p.get("keep_size"), "Keep anatomy size")
    if keep is not None and keep != (config.keep_size or False):
        variant.append({True: "size-kept", False: "zoom-kept"}.get(keep, "inflation-removed"))
    if p["fold_guard"]:
        variant.append("guard")
    if variant:
        p["variant"] = " ".join(variant)
    return p


def _plan(inp: Inputs, config, generation: Dict[str, Any]) -> FramePlan:
    """How the run's frames are stored: T' forward frames, then one per reverse step, within the budget."""
    from ..core.recovery import reverse_timesteps
    t_prime, schedule = generation["t_prime"], generation["schedule"]
    n_rec = len(reverse_timesteps(t_prime, config.n_steps, schedule, config.loop_extra)) \
        if (t_prime > 0 or schedule == Schedule.REFERENCE) else 0
    lo, hi = float(np.min(inp.image)), float(np.max(inp.image))
    return plan_frames(inp.image.shape, t_prime, n_rec, label_dtype(inp.labels), (lo, hi),
                       generation["budget_mib"] * 2 ** 20)


def prepare_run(image_layer, labels_layer, model, no_model: str, generation: Dict[str, Any],
                world_point: Sequence[float], slice_of_volume: bool = False,
                cache: Optional[Dict[tuple, Optional[str]]] = None) -> RunRequest:
    """The run Run would start now; InputError (a ValueError) with a one-line reason when it cannot.

    Args:
        image_layer: the chosen image layer, or None.
        labels_layer: the chosen labels layer, or None.
        model: the loaded model, or None.
        no_model: why there is no model (shown when ``model`` is None).
        generation: the form's generation options (t_prime, seed, schedule, k, budget_mib, fold_guard).
        world_point: the viewer's current point: picks the slice or time frame a 2D model deforms.
        slice_of_volume: the user allows a 2D model on the slice on screen of a 3D volume.
        cache: memo of the full-array checks, kept by the dock between calls.
    """
    if image_layer is None:
        raise InputError(NO_IMAGE)
    if model is None:
        raise InputError(no_model)
    inp = read_inputs(image_layer, labels_layer, model.ndim, world_point, slice_of_volume, cache)
    plan = _plan(inp, model.config, generation)
    params = generation_params(generation, model.config, model.device)
    return RunRequest(inp, plan, params, *output_geometry(inp))
