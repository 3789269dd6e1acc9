"""Pulls that hold a fine-tune near reference weights, so it learns the kit's images without
drifting on the inputs the kit has no training images of (chest CT: docs/weights.md).

Two kinds, both off by default:

- the **anchor** (``loss.w_anchor``): ``w * sum((theta - theta_ref)^2)``, an L2 pull on the
  parameters themselves ("L2-SP");
- the **teacher** (``loss.w_teacher``): a pull on what the network *does*.  Each step draws a
  second, small batch (``loss.teacher_batch`` images) with its own augmentation
  (``loss.teacher_augment``: overrides of the ``augment`` section, e.g. anatomy filling the view
  and no dark frame), deforms it with the forward sampler like the training batch, and adds
  ``w * |psi - psi_ref|^2 / |psi_ref|^2`` (summed over the batch; the reference network's
  estimate ``psi_ref`` on the same deformed images).  The parameters may move anywhere that leaves
  those inputs' estimates alone, which the anchor does not allow.  With ``loss.teacher_edge_px``
  > 0 the target is ``psi_ref`` times a window that is 1 farther than that many pixels from the
  border and falls linearly to ``loss.teacher_edge_floor`` on it (:func:`edge_window`): the pull
  then asks for less motion in the band along the border than the reference network makes there.

The reference weights are ``loss.anchor`` / ``loss.teacher`` (a weights file, a training
checkpoint or a bundled name), else the run's ``init``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .classic_augment import check_augment, check_overrides
from .data import ensure_core
from .init_weights import InitError, load_init

ensure_core()

from napari_drdm.core.network import DRDMNet  # noqa: E402

__all__ = ["anchor_weights", "check_teacher", "edge_window", "teacher_augment", "teacher_net", "teacher_term"]


def _reference_net(cfg: Dict[str, Any], mcfg, key: str) -> Tuple[DRDMNet, Dict[str, Any]]:
    """The network a pull holds the run near: ``loss.<key>`` (``anchor`` or ``teacher``), else the
    run's ``init``, loaded on the host; with its provenance."""
    source = cfg["loss"].get(key) or cfg.get("init")
    if not source:
        raise InitError(f"loss.w_{key} > 0 needs loss.{key} or init: the weights to stay near")
    ref = DRDMNet.from_config(mcfg)
    return ref, load_init(ref, str(source), str(cfg.get("init_inflate") or "centre"))


def anchor_weights(cfg: Dict[str, Any], mcfg, dev, say=print) -> Optional[List[torch.Tensor]]:
    """The weights the anchor pulls towards (``loss.w_anchor`` > 0): ``loss.anchor``, else the
    run's ``init``; one tensor per parameter, in ``parameters()`` order.  None when ``w_anchor`` is 0."""
    w = float(cfg["loss"].get("w_anchor") or 0.0)
    if w <= 0:
        return None
    ref, info = _reference_net(cfg, mcfg, "anchor")
    say(f"anchored to {info['source']} (sha256 {info['sha256'][:12]}...), w_anchor {w:g}")
    return [p.detach().float().to(dev) for p in ref.parameters()]


def check_teacher(cfg: Dict[str, Any]) -> None:
    """Validate the teacher keys of a configuration's ``loss`` section (one clear ``ValueError``
    per bad value), the teacher batch's merged augmentation included.

    Args:
        cfg: the configuration; its ``loss`` section holds ``w_teacher`` (number >= 0),
            ``teacher_batch`` (integer >= 1) and ``teacher_augment`` (a mapping of ``augment`` keys).
    """
    lcfg = cfg["loss"]
    w = lcfg.get("w_teacher", 0.0)
    if w is None:
        w = 0.0
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not float(w) >= 0.0:
        raise ValueError(f"loss.w_teacher must be a number >= 0 (0: off), got {w!r}")
    n = lcfg.get("teacher_batch", 2)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"loss.teacher_batch must be an integer >= 1, got {n!r}")
    px = lcfg.get("teacher_edge_px", 0)
    if isinstance(px, bool) or not isinstance(px, int) or px < 0:
        raise ValueError(f"loss.teacher_edge_px must be a whole number of pixels >= 0 (0: off), got {px!r}")
    floor = lcfg.get("teacher_edge_floor", 0.5)
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= float(floor) <= 1.0:
        raise ValueError(f"loss.teacher_edge_floor must be a number from 0 to 1, got {floor!r}")
    check_overrides(lcfg.get("teacher_augment"), "loss.teacher_augment")
    check_augment(teacher_augment(cfg))


def teacher_augment(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher batch's augmentation: the run's ``augment`` section with ``loss.teacher_augment``
    on top (checked by :func:`check_teacher` when the configuration is loaded)."""
    out = dict(cfg["augment"])
    out.update(cfg["loss"].get("teacher_augment") or {})
    return out


def teacher_net(cfg: Dict[str, Any], mcfg, dev, say=print) -> Optional[DRDMNet]:
    """The frozen reference network of the teacher term, or None when ``loss.w_teacher`` is 0."""
    w = float(cfg["loss"].get("w_teacher") or 0.0)
    if w <= 0:
        return None
    ref, info = _reference_net(cfg, mcfg, "teacher")
    ref.to(dev).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    px = int(cfg["loss"].get("teacher_edge_px") or 0)
    edge = f", tapered to {float(cfg['loss'].get('teacher_edge_floor', 0.5)):g} over {px} px at the border" if px else ""
    say(f"teacher {info['source']} (sha256 {info['sha256'][:12]}...), w_teacher {w:g}, "
        f"{int(cfg['loss'].get('teacher_batch', 2))} images a step{edge}")
    return ref


def edge_window(shape, px: int, floor: float, device=None) -> torch.Tensor:
    """A window over a grid of ``shape`` (the spatial sizes): 1 at points ``px`` or more pixels
    from the nearest border, falling linearly to ``floor`` on the border pixels themselves.

    Args:
        shape: the grid's spatial sizes, e.g. (H, W) or (D, H, W).
        px: the width of the band in pixels (0: a window of ones).
        floor: the window's value on the border, from 0 to 1.
        device: where to build it.

    Returns:
        A float tensor of ``shape``.
    """
    w = torch.ones(tuple(shape), device=device)
    if px <= 0:
        return w
    for axis, n in enumerate(shape):
        i = torch.arange(n, device=device, dtype=torch.float32)
        dist = torch.minimum(i, n - 1 - i)                    # pixels to the nearer border along this axis
        ramp = floor + (1.0 - floor) * (dist / px).clamp(max=1.0)
        view = [1] * len(shape)
        view[axis] = n
        w = torch.minimum(w, ramp.view(view))
    return w


def teacher_term(psi: torch.Tensor, psi_ref: torch.Tensor, weight: float,
                 window: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight * |psi - target|^2 / |target|^2`` over one batch of deformed images, where the
    target is ``psi_ref``, times ``window`` when one is given.

    Args:
        psi: the trained network's estimates on the teacher batch (gradients flow through them).
        psi_ref: the reference network's estimates on the same images (no gradient).
        weight: ``loss.w_teacher``.
        window: None, or a tensor over the spatial grid (:func:`edge_window`) multiplying ``psi_ref``.

    Returns:
        A scalar; 0 when the trained network's estimates equal the target.
    """
    psi, target = psi.float(), psi_ref.detach().float()
    if window is not None:
        target = target * window.to(target.device, target.dtype)
    return weight * ((psi - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-12)
