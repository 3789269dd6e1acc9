"""The DRDM U-Net declared once: its levels, the wiring every back-end runs, and the recursion.

The network (reference "RecResACNet") has seven stages of three ACNN-II blocks on four resolution
levels, each fed by a per-level time embedding.  :data:`LEVELS` lists them in execution order;
the plain modules (:class:`~napari_drdm.core.network.DRDMNet`) are built from it, and
:func:`run_unet` wires one pass from it for any back-end:

* the first stage reads the input plus its embedding;
* a stage one level down reads ``down(previous output) + embedding`` (at the bottleneck the
  embedding multiplies instead of adding);
* a stage one level up reads ``cat([skip, up(previous output)]) + embedding``, the skip being the
  output of the stage at the same resolution on the way down;
* ``conv_out`` maps the last stage to the d displacement channels.

A back-end implements :class:`UNetOps` (six operations).  Three exist: the network's own modules
(plain, differentiable, the reference's operation order; :mod:`~napari_drdm.core.network`), the
inference engine (oneDNN or generic PyTorch ops, cached weights, reused buffers;
:mod:`~napari_drdm.core.fast`) and the compiled kernels for the two finest levels
(:mod:`~napari_drdm.core.native`).

:func:`recursive_estimate` is the paper's eq. 12 (K recursions of one pass), shared by all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .spatial import frac_to_px, warp

__all__ = ["Level", "LEVELS", "HEAD", "EMBED", "UNetOps", "run_unet", "to_fraction", "recursive_estimate"]

#: the output convolution (d channels) and the frozen sinusoid table every embedding MLP reads
HEAD = "conv_out"
EMBED = "time_embed"


@dataclass(frozen=True)
class Level:
    """One stage of the U-Net and how its input is formed.

    Attributes:
        name: the stage module (three ACNN-II blocks ``<name>.0..2``).
        embed: its time-embedding MLP (output width = the stage's input channels).
        resample: the strided (down) or transposed (up) convolution applied to the previous
            stage's output; None for the first stage, which reads the network input.
        widths: output channels of the three blocks, as indices into ``channels`` (c1, c2, c3).
        norm: whether the blocks instance-normalise their first convolution.
        depth: resolution level, 0 = full, 1 = half, ...
        skip: for an up level, the earlier stage whose output is concatenated before the
            upsampled features.
        combine: how the embedding enters: "add", or "mul" at the bottleneck.
    """

    name: str
    embed: str
    resample: Optional[str]
    widths: Tuple[int, int, int]
    norm: bool
    depth: int
    skip: Optional[str] = None
    combine: str = "add"

    @property
    def kind(self) -> str:
        """"input" (the first stage), "down" or "up"."""
        if self.resample is None:
            return "input"
        return "down" if self.skip is None else "up"


LEVELS: Tuple[Level, ...] = (
    Level("b1", "te1", None, (0, 0, 0), norm=True, depth=0),
    Level("b2", "te2", "down1", (1, 1, 1), norm=True, depth=1),
    Level("b3", "te3", "down2", (2, 2, 2), norm=True, depth=2),
    Level("b_mid", "te_mid", "down3", (1, 1, 2), norm=True, depth=3, combine="mul"),
    Level("b4", "te4", "up1", (2, 1, 1), norm=False, depth=2, skip="b3"),
    Level("b5", "te5", "up2", (1, 0, 0), norm=False, depth=1, skip="b2"),
    Level("b_out", "te_out", "up3", (0, 0, 0), norm=False, depth=0, skip="b1"),
)

_SKIPS = frozenset(lv.skip for lv in LEVELS if lv.skip)


def _check_levels():
    # the wiring below relies on these: every down level reads a kept (skip) output, which it
    # does not consume, and every up level's skip lies at its own depth
    by_name = {lv.name: lv for lv in LEVELS}
    for prev, lv in zip(LEVELS, LEVELS[1:]):
        if lv.kind == "down" and (prev.name not in _SKIPS or lv.depth != prev.depth + 1):
            raise AssertionError(f"level {lv.name}: a down level must follow a kept stage one level up")
        if lv.kind == "up" and (by_name[lv.skip].depth != lv.depth or lv.depth != prev.depth - 1):
            raise AssertionError(f"level {lv.name}: its skip must lie at its own depth")


_check_levels()


class UNetOps:
    """What a back-end provides to run one pass of the U-Net (:func:`run_unet`).

    Values passed between the operations (``h``, ``skip``) are the back-end's own: dense tensors,
    channels-last work buffers, bordered planes; only :meth:`head` must return a dense tensor.
    """

    def embed(self, x: torch.Tensor, t) -> Sequence[Any]:
        """The time embedding of every level, in :data:`LEVELS` order (the back-end's own form).

        Args:
            x: the network input (B, C, *spatial).
            t: the diffusion times: an int64 tensor (B,) or, for back-ends that accept it, an int.
        """
        raise NotImplementedError

    def enter(self, level: Level, x: torch.Tensor, e) -> Any:
        """The first stage's input: ``x + e``.

        Args:
            level: the first level; x: the network input; e: its embedding.
        """
        raise NotImplementedError

    def down(self, level: Level, h, e) -> Any:
        """``resample(h) + e`` (``* e`` where ``level.combine == "mul"``); ``h`` stays valid (it is a skip).

        Args:
            level: the level being entered; h: the previous stage's output; e: the level's embedding.
        """
        raise NotImplementedError

    def up_cat(self, level: Level, skip, h, e) -> Any:
        """``cat([skip, resample(h)], channels) + e``; consumes ``skip`` and ``h``.

        Args:
            level: the level being entered; skip: the kept output at this depth;
            h: the previous stage's output; e: the level's embedding.
        """
        raise NotImplementedError

    def stage(self, level: Level, h) -> Any:
        """The level's three ACNN-II blocks; consumes ``h``.

        Args:
            level: the level; h: its input.
        """
        raise NotImplementedError

    def head(self, h) -> torch.Tensor:
        """The output convolution: the raw estimate (B, d, *spatial), before the clamp; consumes ``h``.

        Args:
            h: the last stage's output.
        """
        raise NotImplementedError


def run_unet(ops: UNetOps, x: torch.Tensor, t) -> torch.Tensor:
    """One pass of the U-Net through a back-end: the raw output of ``conv_out`` (before the clamp).

    Args:
        ops: the back-end.
        x: the network input (B, C, *spatial), spatial sizes divisible by 8.
        t: the diffusion times (see :meth:`UNetOps.embed`).
    """
    emb = ops.embed(x, t)
    kept: Dict[str, Any] = {}
    h = None
    for level, e in zip(LEVELS, emb):
        kind = level.kind
        if kind == "input":
            h = ops.enter(level, x, e)
        elif kind == "down":
            h = ops.down(level, h, e)
        else:
            h = ops.up_cat(level, kept.pop(level.skip), h, e)
        h = ops.stage(level, h)
        if level.name in _SKIPS:
            kept[level.name] = h
    return ops.head(h)


def to_fraction(u: torch.Tensor, S: int) -> torch.Tensor:
    """The network's raw output as its estimate: clamped to +-(S-1) pixels, in fractions of S.

    Args:
        u: the output of ``conv_out``; S: the image side in pixels (first spatial axis).
    """
    return torch.clamp(u * S, 1 - S, S - 1) / S


def recursive_estimate(single_pass: Callable[[torch.Tensor, Any], torch.Tensor], x: torch.Tensor, t,
                       k: int = 2, side: Optional[int] = None) -> torch.Tensor:
    """The paper's eq. 12: K passes, each on the *input* warped by the running estimate.

    ``running = pass(x)``; then K-1 times ``step = pass(warp(x, running))`` and
    ``running = step + warp(running, step)`` (composition with border padding).  Fractions of S.

    Args:
        single_pass: one clamped pass, ``single_pass(x, t)`` -> (B, d, *spatial) fraction of S.
        x: the network input (B, C, *spatial).
        t: the diffusion times, passed through to ``single_pass``.
        k: K, the number of passes (>= 1).
        side: the S that converts fractions to pixels (default: the input's first spatial side;
            a padded input passes the side of the image inside it).
    """
    S = x.shape[2] if side is None else int(side)
    running = single_pass(x, t)
    for _ in range(int(k) - 1):
        xk = warp(x, frac_to_px(running, S), "linear", "zeros")
        step = single_pass(xk, t)
        running = step + warp(running, frac_to_px(step, S), "linear", "border")
    return running
