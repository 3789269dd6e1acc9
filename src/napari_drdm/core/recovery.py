"""Deformation recovery (paper Algorithm 2) as a generator: one frame per reverse step.

Works on the model grid (S^d pixels).  The image and labels of every frame are resampled from
the originals with the accumulated field, never warped repeatedly.

Loop lengths (:class:`~napari_drdm.core.config.Schedule`):

* ``schedule="paper"``: T' steps, t = T'-1 .. 0;
* ``schedule="reference"``: what the authors' code does, all T steps t = T-1 .. 0 whatever T' is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F

from .config import DEFAULT_SCHEDULE, Schedule, T
from .network import DRDMNet
from .spatial import compose, frac_to_px, warp, warp_labels
from .unet import recursive_estimate

__all__ = ["RecoveryFrame", "reverse_timesteps", "recover", "padded_estimate"]


@dataclass
class RecoveryFrame:
    """State after one reverse step (pixel fields on the model grid, batch-first tensors)."""

    step: int                     # 1-based reverse step index
    n_steps: int                  # total reverse steps in this loop
    t: int                        # diffusion time used by the network for this step
    image: torch.Tensor           # (B, C, S...) warp(I0, phi)
    labels: Optional[torch.Tensor]  # (B, 1, S...) warp_labels(L0, phi) or None
    ddf: torch.Tensor             # phi: accumulated field (pixels)
    step_ddf: torch.Tensor        # psi_hat of this step (pixels)


def reverse_timesteps(t_prime: int, n_steps: int = T,
                      schedule: Union[Schedule, str] = DEFAULT_SCHEDULE, loop_extra: int = 0):
    """The diffusion times visited by the reverse loop, first to last.

    Args:
        t_prime: T', the forward time the generation starts from (0..n_steps).
        n_steps: T.
        schedule: a :class:`~napari_drdm.core.config.Schedule` or its name.
        loop_extra: steps the paper loop starts above T' (t = T'-1+loop_extra .. 0, at most
            T-1; none at T' = 0); 0 is the paper's Algorithm 2.  The reference loop ignores it.
    """
    schedule = Schedule.parse(schedule)
    if not 0 <= int(t_prime) <= n_steps:
        raise ValueError(f"T' must lie in 0..{n_steps}, got {t_prime}")
    if schedule is Schedule.PAPER:
        first = min(n_steps - 1, int(t_prime) - 1 + int(loop_extra)) if int(t_prime) > 0 else -1
    else:
        first = n_steps - 1
    return list(range(first, -1, -1))


def padded_estimate(net: Callable, x: torch.Tensor, t: torch.Tensor, k: int, padding: int) -> torch.Tensor:
    """The network's K-recursion estimate (paper eq. 12) with its input surrounded by ``padding``
    pixels of mirrored image, cropped back to the input's grid.

    The network then never sees the edge of the field of view as the edge of its canvas: no dark
    frame where the anatomy touches the border (it inflates content in a dark frame), and the
    convolutions' zero padding lies outside the image.  The recursion runs here, with single passes
    (``net(x, t, 1)``), so that fractions convert to pixels with the image's own side S, as in
    training, not the padded side (:func:`~napari_drdm.core.unet.recursive_estimate`).  ``padding=0``
    is exactly ``net(x, t, k)``'s recursion.

    Args:
        net: ``net(x, t, k)`` returning the estimate as a fraction of the side (a DRDMNet, its
            engine or the model's network call).
        x: the input (B, C, *[S]*d); t: int64 diffusion times (B,); k: K (>= 1).
        padding: pixels added on each side (reflection; S + 2 * padding divisible by 8).
    """
    nd = x.dim() - 2
    xp = F.pad(x, [int(padding)] * (2 * nd), mode="reflect") if padding else x
    running = recursive_estimate(lambda xi, ti: net(xi, ti, 1), xp, t, k, side=x.shape[2])
    if padding:
        running = running[(slice(None), slice(None)) + (slice(padding, -padding),) * nd]
    return running


def recover(net: Callable, image0: torch.Tensor, forward_ddf: torch.Tensor, t_prime: int, *,
            labels0: Optional[torch.Tensor] = None, schedule: Union[Schedule, str] = DEFAULT_SCHEDULE,
            k: int = 2, n_steps: int = T, compose_padding: str = "zeros", image_interp: str = "cubic",
            label_interp: str = "nearest", net_input: Optional[torch.Tensor] = None,
            labels_every_step: bool = True, fast: Optional[bool] = None,
            step_guard: Optional[Callable] = None, field_guard: Optional[Callable] = None,
            input_padding: int = 0, loop_extra: int = 0) -> Iterator[RecoveryFrame]:
    """Yield one :class:`RecoveryFrame` per reverse step.

    Args:
        net: ``net(x, t, k)`` returns the step estimate as a fraction of S (the reference network).
        image0: (B, C, S...) model-grid image the network sees (min-max normalised).
        forward_ddf: psi_{T':1} in pixels.
        t_prime: T'.
        labels0: integer labels (B, 1, S...) or None.
        schedule: the loop length (:class:`~napari_drdm.core.config.Schedule` or its name).
        k: K, the network's internal recursions.
        n_steps: T.
        compose_padding: padding of the composition of each step into the accumulated field.
        image_interp: interpolation of the image the network sees each step.
        label_interp: interpolation of the labels ("nearest" or "linear_argmax").
        net_input: optional different tensor to feed the network (defaults to image0).
        labels_every_step: False warps the labels only at the last step (faster batch export).
        fast: for a :class:`~napari_drdm.core.network.DRDMNet`, True runs its optimised inference
            engine (core/fast.py), False its plain modules; None (default) calls ``net`` as given
            (a DRDMNet then follows its ``fast`` attribute, off by default; DRDM models pass the engine).
        step_guard: optional function of a pixel field returning a corrected one (the fold guard,
            core/foldguard.py), applied to each step's psi_hat before it is composed.
        field_guard: the same for the accumulated field after each composition (what the next
            step sees).
        input_padding: pixels of mirrored image around the network's input each step
            (:func:`padded_estimate`); 0, the reference, feeds the image as it is.
        loop_extra: steps the paper loop starts above T' (:func:`reverse_timesteps`).
    """
    if fast is not None and isinstance(net, DRDMNet):
        net = net.engine() if fast else net.forward_plain
    S = image0.shape[2]
    steps = reverse_timesteps(t_prime, n_steps, schedule, loop_extra)
    phi = forward_ddf
    net_img0 = image0 if net_input is None else net_input
    current = warp(net_img0, phi, image_interp, "zeros")
    B = current.shape[0]
    for i, t in enumerate(steps, start=1):
        tt = torch.full((B,), t, dtype=torch.int64, device=image0.device)
        est = padded_estimate(net, current, tt, k, input_padding) if input_padding else net(current, tt, k)
        u = frac_to_px(est, S)
        if step_guard is not None:
            u = step_guard(u)
        phi = compose(u, phi, compose_padding)
        if field_guard is not None:
            phi = field_guard(phi)
        current = warp(net_img0, phi, image_interp, "zeros")
        img = current if net_input is None else warp(image0, phi, image_interp, "zeros")
        lab = None
        if labels0 is not None and (labels_every_step or i == len(steps)):
            lab = warp_labels(labels0, phi, label_interp)
        yield RecoveryFrame(step=i, n_steps=len(steps), t=t, image=img, labels=lab, ddf=phi, step_ddf=u)
