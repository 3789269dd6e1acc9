"""Cheap periodic validation on held-out subjects.

Two kinds of numbers, both on a fixed, seeded selection of validation images so that successive
validations are comparable:

* ``val/loss/*``: the training loss terms at a few fixed t (fixed forward-process draws);
* ``val/T{T'}/{forward|paper|reference}/*``: paper Table 1 metrics (``field_metrics``: max and
  mean displacement in % of S, folding in % of pixels with det <= 0) of the forward field
  psi_{T':1} and of the field recovered by the reverse loop (``recover``) with each schedule,
  averaged over the images;
* ``val/T{T'}/cues/{paper|reference}/*`` (only with ``validation.cues``): the same metrics on a
  copy of those images carrying acquisition cues (a dark frame, a cut field of view, coarse voxels:
  :mod:`training.classic_augment` with every other augmentation off), drawn once from
  ``validation.seed`` and recovered from the same forward fields as the clean copy.  A recipe that
  trains on cued images and pulls clean ones elsewhere (``loss.w_teacher``) can move the two
  groups in opposite directions; the clean curve alone then says little about cued inputs.

``validation.anatomy_fit`` and ``validation.background_margin`` (pixels, null: off) recover as the
engine does with the inference options of the same names (``DRDM.generate_model_grid``): the reverse
loop runs on each image's view fitted to its anatomy, the field's empty background is replaced by
the extension of the rest, and the field is measured on the whole grid.  ``validation.keep_size``
(false, true or "inflation") then takes the recovered field's global zoom out as the inference
option of that name does (core/keep_size.py).  They make the recovered
figures those the held-out table (``benchmarks/weights_table.py``) measures with those options; the
forward field's figures are the raw draw's either way.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from .classic_augment import AUGMENT_DEFAULTS, augment, check_augment, check_overrides, check_pixels
from .data import ensure_core

ensure_core()

from napari_drdm.core.background import extend_into_background  # noqa: E402
from napari_drdm.core.config import DRDMConfig  # noqa: E402
from napari_drdm.core.forward import ForwardSampler  # noqa: E402
from napari_drdm.core.keep_size import KEEP_SIZE_INFLATION, remove_global_scale  # noqa: E402
from napari_drdm.core.losses import drdm_losses  # noqa: E402
from napari_drdm.core.metrics import field_metrics  # noqa: E402
from napari_drdm.core.recovery import recover  # noqa: E402
from napari_drdm.core.spatial import px_to_frac, warp  # noqa: E402
from napari_drdm.core.view import anatomy_views, field_from_view, to_view  # noqa: E402
from napari_drdm.errors import InputError  # noqa: E402
from napari_drdm.validate import check_keep_size_option  # noqa: E402

__all__ = ["VALIDATION_DEFAULTS", "ValidationCancelled", "Validator", "check_cues", "check_validation",
           "cue_augment"]

VALIDATION_DEFAULTS: Dict[str, Any] = {
    "every": 1000,          # steps between validations (0 = never)
    "at_end": True,         # also validate when train.steps is reached
    "at_start": False,      # also validate the starting weights (step 0 of a new run, e.g. fine-tuning)
    "n_images": 2,          # validation images (centres of n equal parts of the val split)
    "t_primes": [30, 45],   # T' of the Table-1 metrics
    "schedules": ["paper", "reference"],
    "loss_t": [10, 40, 70],  # t values of the validation loss
    "seed": 1234,
    "weights": "auto",      # raw | ema | both (auto: both when train.ema_decay > 0), training/ema.py
    "cues": {},             # augment keys for a cued copy of the images ({}: none), e.g. {p_zoom_out: 1}
    "anatomy_fit": None,    # px around the anatomy in the fitted view of the reverse loop (null: whole grid)
    "background_margin": None,  # px kept around the anatomy; the field beyond extended (null: off)
    "keep_size": False,     # the recovered field's global zoom over the anatomy removed: false, true, "inflation"
}

#: the augmentation a cued validation copy starts from: nothing but what ``validation.cues`` turns on
_NO_AUGMENT = dict(AUGMENT_DEFAULTS, p_affine=0.0, p_rotate3d=0.0, p_crop3d=0.0, p_flip=0.0,
                   p_autocontrast=0.0, p_intensity=0.0)


def cue_augment(vcfg: Dict[str, Any]) -> Dict[str, Any]:
    """The augmentation of the cued validation copy: every augmentation off, then ``vcfg["cues"]``."""
    return dict(_NO_AUGMENT, **(vcfg.get("cues") or {}))


def check_cues(vcfg: Dict[str, Any]) -> None:
    """Raise ValueError naming ``validation.cues`` when it is not a mapping of known augment keys
    with values in range."""
    check_overrides(vcfg.get("cues"), "validation.cues")
    try:
        check_augment(cue_augment(vcfg))
    except ValueError as e:
        raise ValueError(f"validation.cues: {e}") from None


class ValidationCancelled(Exception):
    """Raised by :meth:`Validator.run` when its ``should_stop`` says so (between reverse-loop steps)."""


def check_validation(vcfg: Dict[str, Any]) -> None:
    """Raise ValueError naming the key when ``validation.cues``, ``validation.anatomy_fit``,
    ``validation.background_margin`` or ``validation.keep_size`` is not usable."""
    check_cues(vcfg)
    for key in ("anatomy_fit", "background_margin"):
        check_pixels(vcfg.get(key), f"validation.{key}")
    try:
        check_keep_size_option(vcfg.get("keep_size"), "validation.keep_size")
    except InputError as e:
        raise ValueError(str(e)) from None


class Validator:
    def __init__(self, model_cfg: DRDMConfig, images: np.ndarray, vcfg: Dict[str, Any], loss_cfg: Dict[str, Any],
                 device, autocast_dtype: Optional[torch.dtype] = None):
        self.mcfg, self.v, self.loss_cfg, self.device = model_cfg, dict(VALIDATION_DEFAULTS, **vcfg), loss_cfg, device
        self.autocast_dtype = autocast_dtype
        n = min(int(self.v["n_images"]), len(images))
        pick = ((np.arange(n) + 0.5) * len(images) / max(n, 1)).astype(int)   # centres of n equal parts
        clean = torch.as_tensor(images[pick]).to(torch.float32).div(255.0).unsqueeze(1)
        self.images = clean.to(device)
        self.cued = None
        if self.v.get("cues") and n > 0:     # drawn on the CPU: the same copy on every device
            g = torch.Generator().manual_seed(int(self.v["seed"]) * 7919 + 1)
            self.cued = augment(clean, cue_augment(self.v), generator=g).clamp(0.0, 1.0).to(device)
        self.sampler = ForwardSampler(model_cfg)

    def __bool__(self):
        return self.images.shape[0] > 0

    def _net(self, net):
        def fn(x, t, k):
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                return net(x, t, k=k).float()
        return fn

    @torch.no_grad()
    def run(self, net, should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
        """The validation figures of ``net``.

        Args:
            net: the network (put in eval mode for the run, then back).
            should_stop: called between reverse-loop steps; when it returns True the run raises
                :class:`ValidationCancelled` within one step (a SIGTERM during a long validation).
        """
        out: Dict[str, float] = {}
        if not self:
            return out
        was_training = net.training
        net.eval()
        try:
            fn = self._net(net)
            out.update(self._loss(fn))
            out.update(self._table1(fn, should_stop))
        finally:
            net.train(was_training)
        return out

    def _loss(self, fn) -> Dict[str, float]:
        cfg, S, B = self.mcfg, self.mcfg.size, self.images.shape[0]
        sums: Dict[str, float] = {}
        ts = [int(t) for t in self.v["loss_t"] if 0 <= int(t) < cfg.n_steps]
        for t in ts:
            g = torch.Generator().manual_seed(int(self.v["seed"]) * 101 + t)
            fs = self.sampler.sample(t, batch=B, generator=g, device=self.device)
            img_t = warp(self.images, fs.forward_ddf, "linear", self.loss_cfg["image_padding"])
            tt = torch.full((B,), t, dtype=torch.int64, device=self.device)
            psi_hat = fn(img_t, tt, cfg.k_recursions)
            terms = drdm_losses(psi_hat, px_to_frac(fs.step_ddf, S), padding=self.loss_cfg["padding"],
                                w_dist=self.loss_cfg["w_dist"], w_ang=self.loss_cfg["w_ang"],
                                w_reg=self.loss_cfg["w_reg"], w_true_negdet=self.loss_cfg["true_negdet_weight"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) / max(len(ts), 1)
        return {f"val/loss/{k}": v for k, v in sums.items()}

    def _table1(self, fn, should_stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
        """Table-1 metrics of each T''s forward field and of each schedule's field recovered from
        it, for the clean images and (``validation.cues``) their cued copy ("cues/")."""
        S, B = self.mcfg.size, self.images.shape[0]
        groups = [("", self.images)] + ([("cues/", self.cued)] if self.cued is not None else [])
        out: Dict[str, float] = {}
        for tp in self.v["t_primes"]:
            tp = int(tp)
            g = torch.Generator().manual_seed(int(self.v["seed"]) * 977 + tp)
            fwd = self.sampler.sample(tp, batch=B, generator=g, device=self.device, return_step=False).forward_ddf
            fields: Dict[str, torch.Tensor] = {"forward": fwd}
            for group, images in groups:
                for sched in self.v["schedules"]:
                    fields[group + sched] = self._recover(fn, images, fwd, tp, sched, should_stop)
            for name, f in fields.items():
                per: List[Dict[str, float]] = [field_metrics(f[i], side=S) for i in range(B)]
                for key in ("max_disp_pct", "mean_disp_pct", "folding_pct"):
                    out[f"val/T{tp}/{name}/{key}"] = float(np.mean([p[key] for p in per]))
        return out

    def _recover(self, fn, images: torch.Tensor, fwd: torch.Tensor, tp: int, sched: str,
                 should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """The field recovered from ``fwd`` on the whole grid, with the validation's anatomy fit and
        background margin (as ``DRDM.generate_model_grid`` applies the inference options)."""
        cfg = self.mcfg
        fit, margin = self.v.get("anatomy_fit"), self.v.get("background_margin")
        views = anatomy_views(images, int(fit)) if fit is not None else None
        x_net = to_view(images, views) if views else images
        phi = fwd
        for fr in recover(fn, x_net, fwd, tp, schedule=sched, k=cfg.k_recursions, n_steps=cfg.n_steps,
                          compose_padding=cfg.compose_padding, image_interp=cfg.image_interp,
                          input_padding=cfg.input_padding):
            phi = fr.ddf
            if should_stop is not None and should_stop():
                raise ValidationCancelled()
        if margin is not None:
            phi, _ = extend_into_background(phi, x_net, int(margin), image_interp=cfg.image_interp)
        phi = field_from_view(phi, views) if views else phi
        keep = check_keep_size_option(self.v.get("keep_size"), "validation.keep_size")
        if keep:
            phi, _ = remove_global_scale(phi, images, image_interp=cfg.image_interp,
                                         inflation_only=keep == KEEP_SIZE_INFLATION)
        return phi
