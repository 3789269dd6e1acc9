"""One step's batch and loss of the DRDM training loop (paper Algorithm 1, training/train.py).

``training_batch`` draws the clean images, augments them, samples t and the forward fields and
warps the images; ``loss_terms`` scores an estimate against the forward sampler's step.  Both are
used as they are by ``benchmarks/train_step.py``, which times them.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from .classic_augment import augment
from .data import ensure_core
from .streams import draws

ensure_core()

from napari_drdm.core.losses import drdm_losses  # noqa: E402
from napari_drdm.core.spatial import px_to_frac, warp  # noqa: E402

__all__ = ["training_batch", "loss_terms"]


def training_batch(bank, sampler, aug_cfg, gens, mcfg, dev, marks: Optional[List[float]] = None,
                   image_padding: str = "zeros", n: Optional[int] = None):
    """One batch of Algorithm 1: ``(x0, t, fs, I_t)``.

    Args:
        bank: the :class:`SliceBank` to draw the clean images from.
        sampler: the :class:`ForwardSampler` of the model configuration ``mcfg``.
        aug_cfg: the ``augment`` section.
        gens: the run's generators (``aug``, ``field`` and, when present, ``t``).
        mcfg: the model configuration.
        dev: the device of the batch.
        marks: if given, ``time.perf_counter()`` is appended after the augmentation, the forward
            sampler and the warp (for benchmarks/train_step.py).
        image_padding: ``loss.image_padding``: what the warp of I_0 reads outside the image,
            ``zeros`` (SPEC, the reference) or ``border`` (the edge values: no dark band where the
            field pulls content in from outside; training/README.md "Dark frames").
        n: if given, only the first ``n`` images of the bank's next batch (the teacher batch,
            training/pulls.py).

    Returns:
        the augmented clean images, t ~ U{0..T-1} per sample (host tensor), the forward sampler's
        fields (``forward_ddf`` psi_{t:1}, ``step_ddf`` psi_t, pixels) and I_t = warp(x0, psi_{t:1}).
    """
    x0 = bank.next_batch()
    x0 = augment(x0 if n is None else x0[:n], aug_cfg, gens["aug"])
    if marks is not None:
        marks.append(time.perf_counter())
    t = torch.randint(0, mcfg.n_steps, (x0.shape[0],), generator=gens.get("t", gens["field"]))
    fs = sampler.sample(t, draws=draws(mcfg, x0.shape[0], gens["field"], dev), device=dev)
    if marks is not None:
        marks.append(time.perf_counter())
    img_t = warp(x0, fs.forward_ddf, "linear", image_padding)
    if marks is not None:
        marks.append(time.perf_counter())
    return x0, t, fs, img_t


def loss_terms(psi_hat, fs, size: int, lcfg: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The training loss of ``psi_hat`` against the forward sampler's step ``fs.step_ddf``, with the
    ``loss`` section's padding and weights (``drdm_losses``; ``total`` is what is minimised)."""
    return drdm_losses(psi_hat.float(), px_to_frac(fs.step_ddf, size), padding=lcfg["padding"],
                       w_dist=float(lcfg["w_dist"]), w_ang=float(lcfg["w_ang"]), w_reg=float(lcfg["w_reg"]),
                       w_true_negdet=float(lcfg["true_negdet_weight"] or 0.0))
