"""The recursive ACNN-II U-Net of DRDM (reference "RecResACNet"), 2D and 3D.

Parameter names match the reference checkpoint exactly (``te1..te5, te_mid, te_out``,
``b1..b5, b_mid, b_out`` with ``.{0,1,2}.{conv0,ln,convs.0,convs.1}``, ``down1-3``, ``up1-3``,
``conv_out``, ``time_embed``), so ``upstream_cmr2d.pth`` loads strictly.

The network works in the reference's units: its output is a displacement field as a
**fraction of the image side S**.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .spatial import frac_to_px, warp

__all__ = ["sinusoid_table", "ACBlock", "DRDMNet"]


def sinusoid_table(n_steps: int = 80, dim: int = 100) -> torch.Tensor:
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
    """U-Net with 4 resolution levels, 3 ACNN-II blocks per stage and a per-level time embedding.

    ``forward(x, t, k=2)``: x (B, C, *[S]*d) with S divisible by 8, t int64 (B,) in 0..T-1.
    Returns the step estimate as a fraction of S, clamped to +-(S-1)/S.  With k > 1 the
    network is applied recursively to the *input* warped by the running estimate (paper
    eq. 12), the pieces being composed with border padding.
    """

    def __init__(self, ndim: int = 2, n_steps: int = 80, in_channels: int = 1,
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
        c1, c2, c3 = channels
        self.ndim, self.n_steps, self.in_channels = ndim, n_steps, in_channels
        Conv = _conv(ndim)
        ConvT = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
        self.time_embed = nn.Embedding(n_steps, time_dim)
        self.time_embed.weight.data.copy_(sinusoid_table(n_steps, time_dim))
        self.time_embed.weight.requires_grad_(False)
        self.te1 = _temb(time_dim, in_channels)
        self.b1 = _stage([in_channels, c1, c1, c1], ndim, True)
        self.down1 = Conv(c1, c1, 4, 2, 1)
        self.te2 = _temb(time_dim, c1)
        self.b2 = _stage([c1, c2, c2, c2], ndim, True)
        self.down2 = Conv(c2, c2, 4, 2, 1)
        self.te3 = _temb(time_dim, c2)
        self.b3 = _stage([c2, c3, c3, c3], ndim, True)
        self.down3 = Conv(c3, c3, 4, 2, 1)
        self.te_mid = _temb(time_dim, c3)
        self.b_mid = _stage([c3, c2, c2, c3], ndim, True)
        self.up1 = ConvT(c3, c3, 4, 2, 1)
        self.te4 = _temb(time_dim, 2 * c3)
        self.b4 = _stage([2 * c3, c3, c2, c2], ndim, False)
        self.up2 = ConvT(c2, c2, 4, 2, 1)
        self.te5 = _temb(time_dim, 2 * c2)
        self.b5 = _stage([2 * c2, c2, c1, c1], ndim, False)
        self.up3 = ConvT(c1, c1, 4, 2, 1)
        self.te_out = _temb(time_dim, 2 * c1)
        self.b_out = _stage([2 * c1, c1, c1, c1], ndim, False)
        self.conv_out = Conv(c1, ndim, 3, padding=1)

    def _bc(self, e: torch.Tensor) -> torch.Tensor:
        return e.view(e.shape[0], e.shape[1], *([1] * self.ndim))

    def single_pass(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One U-Net pass (skip connections are concatenated before the upsampled features): (B, C, S...) -> (B, d, S...) fraction of S, clamped."""
        emb = self.time_embed(t)
        h = x + self._bc(self.te1(emb))
        h1 = self.b1(h)
        h = self.down1(h1) + self._bc(self.te2(emb))
        h2 = self.b2(h)
        h = self.down2(h2) + self._bc(self.te3(emb))
        h3 = self.b3(h)
        h = self.down3(h3) * self._bc(self.te_mid(emb))
        h = self.b_mid(h)
        h = torch.cat([h3, self.up1(h)], dim=1) + self._bc(self.te4(emb))
        h = self.b4(h)
        h = torch.cat([h2, self.up2(h)], dim=1) + self._bc(self.te5(emb))
        h = self.b5(h)
        h = torch.cat([h1, self.up3(h)], dim=1) + self._bc(self.te_out(emb))
        h = self.b_out(h)
        u = self.conv_out(h)
        S = x.shape[2]
        return torch.clamp(u * S, 1 - S, S - 1) / S

    def check_input(self, x: torch.Tensor, t: torch.Tensor):
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"network input must have shape (B, {self.in_channels}, *spatial) with "
                             f"{self.ndim} spatial axes, got {tuple(x.shape)}")
        if any(s % 8 for s in x.shape[2:]):
            raise ValueError(f"spatial sizes must be divisible by 8, got {tuple(x.shape[2:])}")
        if t.dtype != torch.int64 or t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must be an int64 tensor of shape ({x.shape[0]},), got {t.dtype} {tuple(t.shape)}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, k: int = 2) -> torch.Tensor:
        if self.fast and not self.training and not torch.is_grad_enabled():
            # inference through the optimised engine: same outputs up to float rounding
            return self.engine()(x, t, k)
        return self.forward_plain(x, t, k)

    def forward_plain(self, x: torch.Tensor, t: torch.Tensor, k: int = 2) -> torch.Tensor:
        """The plain eager implementation of :meth:`forward` (reference operation order)."""
        if not torch.jit.is_scripting() and not isinstance(t, torch.Tensor):
            t = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
        S = x.shape[2]
        running = self.single_pass(x, t)
        for _ in range(int(k) - 1):
            xk = warp(x, frac_to_px(running, S), "linear", "zeros")
            step = self.single_pass(xk, t)
            running = step + warp(running, frac_to_px(step, S), "linear", "border")
        return running

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
