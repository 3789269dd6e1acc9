"""The recursive ACNN-II U-Net of DRDM (reference "RecResACNet"), 2D and 3D.

Parameter names match the reference checkpoint exactly (``te1..te5, te_mid, te_out``,
``b1..b5, b_mid, b_out`` with ``.{0,1,2}.{conv0,ln,convs.0,convs.1}``, ``down1-3``, ``up1-3``,
``conv_out``, ``time_embed``), so ``upstream_cmr2d.pth`` loads strictly.  The modules are built
from the level declaration in :mod:`~napari_drdm.core.unet`, and one pass runs its wiring with
these modules as the back-end (:class:`_PlainOps`): the plain, differentiable reference path.

The network works in the reference's units: its output is a displacement field as a
**fraction of the image side S**.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn

from .config import T
from .unet import HEAD, LEVELS, UNetOps, recursive_estimate, run_unet, to_fraction

__all__ = ["sinusoid_table", "ACBlock", "DRDMNet"]


def sinusoid_table(n_steps: int = T, dim: int = 100) -> torch.Tensor:
    """Frozen time embedding: even column 2k = sin(t w_k), odd 2k+1 = cos(t w_k),
    w_k = 10000^(-4k/dim) computed in double then rounded to float32; t*w and sin/cos in float32."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    w = torch.pow(10000.0, -4.0 * k / dim).to(torch.float32)
    t = torch.arange(n_steps, dtype=torch.float32).unsqueeze(1)
    arg = t * w.unsqueeze(0)
    table = torch.empty(n_steps, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(arg)
    table[:, 1::2] = torch.cos(arg)
    return table


def _conv(ndim):
    return nn.Conv2d if ndim == 2 else nn.Conv3d


class ACBlock(nn.Module):
    """ACNN-II block (paper Table .5): r = conv3(x) [+ InstanceNorm]; f = conv3(act(r));
    f = conv3_dil3(act(f)); out = act(f + r); act = LeakyReLU(1e-6)."""

    def __init__(self, cin: int, cout: int, ndim: int, norm: bool):
        super().__init__()
        Conv = _conv(ndim)
        Norm = nn.InstanceNorm2d if ndim == 2 else nn.InstanceNorm3d
        # registration order follows the reference state_dict (ln before conv0)
        self.ln = Norm(cout, affine=True) if norm else None
        self.conv0 = Conv(cin, cout, 3, padding=1)
        self.convs = nn.ModuleList([Conv(cout, cout, 3, padding=1, dilation=1),
                                    Conv(cout, cout, 3, padding=3, dilation=3)])
        self.act = nn.LeakyReLU(1e-6)

    def forward(self, x):
        r = self.conv0(x)
        if self.ln is not None:
            r = self.ln(r)
        f = self.convs[0](self.act(r))
        f = self.convs[1](self.act(f))
        return self.act(f + r)


def _stage(chans: Sequence[int], ndim: int, norm: bool) -> nn.Sequential:
    return nn.Sequential(*[ACBlock(chans[i], chans[i + 1], ndim, norm) for i in range(3)])


def _temb(dim: int, c: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, c), nn.ReLU(), nn.Linear(c, c))


class DRDMNet(nn.Module):
    """U-Net with 4 resolution levels, 3 ACNN-II blocks per stage and a per-level time embedding
    (the levels are declared in :data:`~napari_drdm.core.unet.LEVELS`).

    ``forward(x, t, k=2)``: x (B, C, *[S]*d) with S divisible by 8, t int64 (B,) in 0..T-1.
    Returns the step estimate as a fraction of S, clamped to +-(S-1)/S.  With k > 1 the
    network is applied recursively to the *input* warped by the running estimate (paper
    eq. 12), the pieces being composed with border padding.

    Args:
        ndim: 2 or 3 spatial axes.
        n_steps: T, the number of diffusion times (rows of the time-embedding table).
        in_channels: image channels.
        channels: (c1, c2, c3), the widths of the three finest levels.
        time_dim: width of the sinusoid time embedding.
        fast: route ``forward`` through the inference engine in eval mode without gradients.
    """

    def __init__(self, ndim: int = 2, n_steps: int = T, in_channels: int = 1,
                 channels: Sequence[int] = (10, 20, 40), time_dim: int = 100, fast: bool = False):
        super().__init__()
        # fast=True (or net.fast = True): in eval mode without gradients, forward() runs the
        # optimised inference engine (core/fast.py: fused channels-last kernels, cached weights
        # and embeddings; equal up to float rounding).  Off by default here, so that this module
        # stays the plain reference implementation (the golden tests' chaotic T'=45 bands are
        # met by any rounding change only by chance, see benchmarks/README.md); the DRDM model
        # object, the CLI and the GUI use the engine by default (DRDM.fast).
        self.fast = bool(fast)
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        self.ndim, self.n_steps, self.in_channels = ndim, n_steps, in_channels
        widths = tuple(int(c) for c in channels)
        Conv = _conv(ndim)
        ConvT = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        self.time_embed = nn.Embedding(n_steps, time_dim)
        self.time_embed.weight.data.copy_(sinusoid_table(n_steps, time_dim))
        self.time_embed.weight.requires_grad_(False)
        # modules in the reference's registration order (per level: resampling, embedding, stage),
        # so that parameter order, and the optimiser state that follows it, is the reference's
        out: Dict[str, int] = {}
        prev = in_channels
        for lv in LEVELS:
            if lv.resample is not None:
                Resample = Conv if lv.kind == "down" else ConvT
                self.add_module(lv.resample, Resample(prev, prev, 4, 2, 1))
            cin = prev + (out[lv.skip] if lv.skip else 0)
            self.add_module(lv.embed, _temb(time_dim, cin))
            chans = [cin] + [widths[i] for i in lv.widths]
            self.add_module(lv.name, _stage(chans, ndim, lv.norm))
            prev = out[lv.name] = chans[-1]
        self.add_module(HEAD, Conv(prev, ndim, 3, padding=1))

    @classmethod
    def from_config(cls, cfg, fast: bool = False) -> "DRDMNet":
        """The network a :class:`~napari_drdm.core.config.DRDMConfig` describes (random weights).

        Args:
            cfg: the model configuration (ndim, n_steps, in_channels, channels, time_dim).
            fast: see the class.
        """
        return cls(cfg.ndim, cfg.n_steps, cfg.in_channels, cfg.channels, cfg.time_dim, fast=fast)

    def single_pass(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One U-Net pass with the plain modules: (B, C, S...) -> (B, d, S...) fraction of S, clamped.

        Args:
            x: the input (B, C, *spatial); t: int64 diffusion times (B,).
        """
        return to_fraction(run_unet(_PlainOps(self), x, t), x.shape[2])

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: int = 2) -> torch.Tensor:
        if self.fast and not self.training and not torch.is_grad_enabled():
            # inference through the optimised engine: same outputs up to float rounding
            return self.engine()(x, t, k)
        return self.forward_plain(x, t, k)

    def forward_plain(self, x: torch.Tensor, t: torch.Tensor, k: int = 2) -> torch.Tensor:
        """The plain eager implementation of :meth:`forward` (reference operation order).

        Args:
            x: the input (B, C, *spatial); t: int64 diffusion times (B,) or one int; k: K.
        """
        if not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        return recursive_estimate(self.single_pass, x, t, k)

    def engine(self, **options):
        """The optimised inference engine for this network (cached; ``options`` build a new one,
        see :class:`~napari_drdm.core.fast.InferenceEngine`)."""
        eng = self.__dict__.get("_fast_engine")
        if eng is None or options:
            from .fast import InferenceEngine
            eng = InferenceEngine(self, **options)
            self.__dict__["_fast_engine"] = eng
        return eng

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_fast_engine", None)          # caches only: rebuilt on demand
        return state

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class _PlainOps(UNetOps):
    """The U-Net back-end of the network's own modules: differentiable, the reference's order."""

    def __init__(self, net: "DRDMNet"):
        self.net = net

    def _bc(self, e: torch.Tensor) -> torch.Tensor:
        return e.view(e.shape[0], e.shape[1], *([1] * self.net.ndim))

    def embed(self, x, t):
        emb = self.net.time_embed(t)
        return [self._bc(getattr(self.net, lv.embed)(emb)) for lv in LEVELS]

    def enter(self, level, x, e):
        return x + e

    def down(self, level, h, e):
        y = getattr(self.net, level.resample)(h)
        return y * e if level.combine == "mul" else y + e

    def up_cat(self, level, skip, h, e):
        return torch.cat([skip, getattr(self.net, level.resample)(h)], dim=1) + e

    def stage(self, level, h):
        return getattr(self.net, level.name)(h)

    def head(self, h):
        return getattr(self.net, HEAD)(h)
