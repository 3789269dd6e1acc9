"""Native CPU kernels for the network's two finest levels (optional, built on first use).

The network spends most of a pass in its 10- and 20-channel layers at full and half resolution.
oneDNN's AVX2 convolutions compute output channels in blocks of 8, so 10 channels cost 16 and 20
cost 24.  ``_native/kernels.c`` vectorises over the image width instead and fuses bias,
LeakyReLU, the residual add and instance normalisation around the convolutions.
:class:`NativeOps` is a back-end of the U-Net wiring (:class:`~napari_drdm.core.unet.UNetOps`,
2D or 3D) that runs the levels at full and half resolution (:data:`NATIVE_STAGES`; with the
AVX-512 build also the 40-channel quarter-resolution levels, :data:`WIDE_STAGES`, see
:func:`stages_for`) and the output convolution with those kernels and hands the rest to the oneDNN back-end
(:class:`~napari_drdm.core.fast.InferenceEngine`), converting between its bordered planes and
channels-last tensors where the two meet.  Same numbers up to float rounding (other summation
orders).

The library is compiled and loaded by :mod:`~napari_drdm.core.native_build` (its :func:`load`,
:func:`status`, :func:`build_library`, :func:`auto_enabled` and :func:`cpu_capability` are
re-exported here).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .native_build import auto_enabled, build_library, cpu_capability, load, status
from .unet import HEAD, LEVELS, Level, UNetOps

__all__ = ["load", "status", "cpu_capability", "auto_enabled", "build_library", "pack_conv", "PAD", "NativeOps",
           "NATIVE_STAGES", "WIDE_STAGES", "stages_for", "supports", "Planes", "Runner"]

#: the stages these kernels run: the 10/20-channel levels at full and half resolution
NATIVE_STAGES = tuple(lv.name for lv in LEVELS if lv.depth <= 1)
#: the stages the AVX-512 build runs: also the quarter-resolution levels (40 channels), where its
#: tiles beat oneDNN's too (issue 15's AVX-512 Xeon, one thread, the other core busy: a cmr2d
#: pass at 2D 256 took 0.78x and 0.95x the time of the AVX-512 build on NATIVE_STAGES alone in
#: two runs, 2D 128 0.87x, 3D 64 0.84x; adding the bottleneck level too was not consistently faster)
WIDE_STAGES = tuple(lv.name for lv in LEVELS if lv.depth <= 2)


def stages_for(lib) -> Tuple[str, ...]:
    """The stages the kernel library ``lib`` runs: :data:`WIDE_STAGES` for the AVX-512 build,
    :data:`NATIVE_STAGES` for the AVX2 and portable builds (not measured against oneDNN there)."""
    return WIDE_STAGES if lib is not None and lib.drdm_kernels_simd() >= 2 else NATIVE_STAGES

PAD = 3                      # border of every plane buffer: the largest dilation of the 3x3 convolutions
SLACK = 16                   # floats after the last plane (vector loads of the last row)
MODE_STORE, MODE_LEAKY, MODE_RES_LEAKY, MODE_STORE_AND_LEAKY = 0, 1, 2, 3


# ---------------------------------------------------------------------------- weights and buffers
def pack_conv(w: torch.Tensor, b: Optional[torch.Tensor], cout: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Cout, Cin, [3,] 3, 3) weights -> blocks of 5 output channels, each laid out [ci][kz][ky][kx][j]."""
    w = w[:cout].detach().float().contiguous()
    order = tuple(range(1, w.dim())) + (0,)
    blocks = [w[s:s + 5].permute(*order).reshape(-1) for s in range(0, cout, 5)]
    bias = (b[:cout].detach().float() if b is not None else torch.zeros(cout)).contiguous()
    return torch.cat(blocks).contiguous(), bias


def supports(m) -> bool:
    """True for a 3x3 (2D) / 3x3x3 (3D), stride-1 convolution with padding = dilation <= PAD."""
    import torch.nn as nn
    if not isinstance(m, (nn.Conv2d, nn.Conv3d)):
        return False
    nd = 2 if isinstance(m, nn.Conv2d) else 3
    d = tuple(m.dilation)
    return (tuple(m.kernel_size) == (3,) * nd and tuple(m.stride) == (1,) * nd and m.groups == 1
            and m.padding_mode == "zeros" and d == (d[0],) * nd and tuple(m.padding) == d and d[0] <= PAD)


class Planes:
    """A (B, C, *spatial) float32 image (2D or 3D) stored as zero-bordered planes (see kernels.c)."""

    __slots__ = ("buf", "B", "C", "spatial")

    def __init__(self, buf: torch.Tensor, B: int, C: int, spatial: Tuple[int, ...]):
        self.buf, self.B, self.C, self.spatial = buf, B, C, tuple(spatial)

    @property
    def nd(self) -> int:
        return len(self.spatial)

    @property
    def dhw(self) -> Tuple[int, int, int]:
        """(D, H, W); D = 1 in 2D."""
        return (1,) * (3 - self.nd) + self.spatial

    @property
    def ptr(self) -> int:
        return self.buf.data_ptr()

    def _padded_view(self) -> torch.Tensor:
        shape = tuple(n + 2 * PAD for n in self.spatial)
        n = self.B * self.C * math.prod(shape)
        return self.buf[:n].view(self.B, self.C, *shape)

    def dense(self) -> torch.Tensor:
        """A (B, C, *spatial) copy without the border (tests, debugging)."""
        inner = tuple(slice(PAD, PAD + n) for n in self.spatial)
        return self._padded_view()[(slice(None), slice(None)) + inner].clone()


class Runner:
    """Per-engine state of the native path: packed weights and a pool of plane buffers."""

    def __init__(self, lib):
        self.lib = lib
        self.stages = stages_for(lib)           # the stages run on planes
        self.weights: Dict[str, tuple] = {}
        self.pool: Dict[tuple, List[torch.Tensor]] = {}

    def reset(self):
        self.weights = {}
        self.pool = {}

    def planes(self, B: int, C: int, spatial: Tuple[int, ...]) -> Planes:
        key = (B, C) + tuple(spatial)
        lst = self.pool.get(key)
        if lst:
            return Planes(lst.pop(), B, C, spatial)
        n = B * C * math.prod(s + 2 * PAD for s in spatial) + SLACK
        return Planes(torch.zeros(n), B, C, spatial)        # zero borders, never written

    def free(self, *ps: Planes):
        for p in ps:
            lst = self.pool.setdefault((p.B, p.C) + p.spatial, [])
            if len(lst) < 6:
                lst.append(p.buf)

    def packed(self, eng, name: str):
        """(packed weights, bias, Cout, Cin, dilation) of one of the engine's 3x3(x3) convolutions."""
        got = self.weights.get(name)
        if got is None:
            c = eng.conv_params(name)
            wp, bp = pack_conv(c.w, c.b, c.cout)
            got = self.weights[name] = (wp, bp, c.cout, int(c.w.shape[1]), int(c.dilation[0]))
        return got

    def norm(self, eng, name: str):
        got = self.weights.get(name)
        if got is None:
            g, b, eps = eng.norm_params(name)
            got = self.weights[name] = (g.detach().float().contiguous(), b.detach().float().contiguous(), eps)
        return got

    def conv(self, eng, name: str, src: Planes, mode: int, out: Optional[Planes] = None,
             res: Optional[Planes] = None, out2: Optional[Planes] = None, threads: int = 1) -> Planes:
        wp, bp, cout, cin, dil = self.packed(eng, name)
        if cin != src.C:
            raise ValueError(f"{name}: expected {cin} input channels, got {src.C}")
        if out is None:
            out = self.planes(src.B, cout, src.spatial)
        D, H, W = src.dhw
        self.lib.drdm_conv(src.nd, src.ptr, src.B, cin, PAD, out.ptr, cout, PAD, D, H, W, dil, wp.data_ptr(),
                           bp.data_ptr(), mode, res.ptr if res is not None else None,
                           out2.ptr if out2 is not None else None, eng.slope, threads)
        return out


def _add_vec(e: torch.Tensor, uniform: bool, lo: int, hi: int) -> Tuple[torch.Tensor, int]:
    """Embedding slice as a contiguous float32 array and its per-sample stride (0 = shared)."""
    if uniform:
        return e[lo:hi].float().contiguous(), 0
    return e[:, lo:hi].float().contiguous(), hi - lo


def _block(runner: Runner, eng, p: str, h: Planes, norm: bool, threads: int) -> Planes:
    """One ACNN-II block on planes: r = conv0(h) [-> instance norm]; a = act(r);
    f = act(convs0(a)); r <- act(convs1(f) + r).  h is freed."""
    if norm:
        r = runner.conv(eng, p + ".conv0", h, MODE_STORE, threads=threads)
        runner.free(h)
        a = runner.planes(r.B, r.C, r.spatial)
        g, bt, eps = runner.norm(eng, p + ".ln")
        D, H, W = r.dhw
        runner.lib.drdm_instnorm_leaky(r.nd, r.ptr, r.B, r.C, PAD, D, H, W, g.data_ptr(), bt.data_ptr(), eps,
                                       a.ptr, eng.slope, threads)
    else:
        a = runner.planes(h.B, eng.conv_params(p + ".conv0").cout, h.spatial)
        r = runner.conv(eng, p + ".conv0", h, MODE_STORE_AND_LEAKY, out2=a, threads=threads)
        runner.free(h)
    f = runner.conv(eng, p + ".convs.0", a, MODE_LEAKY, threads=threads)
    runner.free(a)
    runner.conv(eng, p + ".convs.1", f, MODE_RES_LEAKY, out=r, res=r, threads=threads)
    runner.free(f)
    return r


def _stage(runner, eng, name, h, norm, threads) -> Planes:
    for i in range(3):
        h = _block(runner, eng, f"{name}.{i}", h, norm, threads)
    return h


def _channels_last(nd: int):
    return torch.channels_last if nd == 2 else torch.channels_last_3d


def _to_nhwc(runner, eng, p: Planes, threads: int) -> torch.Tensor:
    """A channels-last work tensor of the engine holding the planes' values (p stays valid)."""
    out = eng.alloc((p.B, p.C) + p.spatial, p.buf)             # channels-last work tensor
    if not out.is_contiguous(memory_format=_channels_last(p.nd)):     # pragma: no cover - pool invariant
        out = torch.empty_like(out, memory_format=_channels_last(p.nd))
    D, H, W = p.dhw
    runner.lib.drdm_planes_to_nhwc(p.nd, p.ptr, PAD, p.C, out.data_ptr(), p.B, D, H, W, threads)
    return out


def _nhwc_into(runner, t: torch.Tensor, dst: Planes, c0: int, add: Optional[Tuple[torch.Tensor, int]],
               threads: int):
    fmt = _channels_last(dst.nd)
    if not t.is_contiguous(memory_format=fmt):
        t = t.contiguous(memory_format=fmt)
    D, H, W = dst.dhw
    runner.lib.drdm_nhwc_to_planes(dst.nd, t.data_ptr(), t.shape[1], dst.ptr, PAD, dst.C, c0, t.shape[0], D, H, W,
                                   add[0].data_ptr() if add is not None else None, add[1] if add else 0, threads)


def _from_nhwc(runner, eng, t: torch.Tensor, threads: int) -> Planes:
    """Planes holding a channels-last work tensor's values (t is given back to the engine)."""
    p = runner.planes(t.shape[0], t.shape[1], tuple(t.shape[2:]))
    _nhwc_into(runner, t, p, 0, None, threads)
    eng.free(t)
    return p


class NativeOps(UNetOps):
    """The U-Net back-end of the compiled kernels (one pass; built per pass by the engine).

    Levels in the runner's ``stages`` (:func:`stages_for`) and the output convolution run on bordered planes
    (:class:`Planes`); the others, and the strided and transposed convolutions, on the engine's
    channels-last tensors.  A value is converted when it reaches an operation of the other kind.

    Args:
        eng: the oneDNN back-end (:class:`~napari_drdm.core.fast.InferenceEngine`) for the rest.
        runner: the engine's :class:`Runner` (packed weights, plane buffers, the library).
        threads: OpenMP threads for the kernels.
    """

    def __init__(self, eng, runner: Runner, threads: int):
        self.eng, self.runner, self.threads = eng, runner, int(threads)

    def _nhwc(self, h, keep: bool = False):
        """h as a channels-last tensor; planes are given back unless ``keep``."""
        if not isinstance(h, Planes):
            return h
        n = _to_nhwc(self.runner, self.eng, h, self.threads)
        if not keep:
            self.runner.free(h)
        return n

    def _planes(self, h) -> Planes:
        return h if isinstance(h, Planes) else _from_nhwc(self.runner, self.eng, h, self.threads)

    def embed(self, x, t):
        return self.eng.embed(x, t)

    def enter(self, level: Level, x, e):
        if level.name not in self.runner.stages:
            return self.eng.enter(level, x, e)
        vec, uniform = e
        B, Cin = x.shape[:2]
        spatial = tuple(x.shape[2:])
        nd = len(spatial)
        D, H, W = (1,) * (3 - nd) + spatial
        xc = x.float().contiguous()
        X = self.runner.planes(B, Cin, spatial)
        a1, s1 = _add_vec(vec, uniform, 0, Cin)
        self.runner.lib.drdm_planes_add(nd, xc.data_ptr(), 0, Cin, X.ptr, PAD, Cin, 0, B, D, H, W, a1.data_ptr(),
                                        s1, self.threads)
        return X

    def down(self, level: Level, h, e):
        n = self._nhwc(h, keep=True)                   # h is a skip: it stays
        d = self.eng.down(level, n, e)
        if n is not h:
            self.eng.free(n)
        return d

    def up_cat(self, level: Level, skip, h, e):
        h = self._nhwc(h)
        if level.name not in self.runner.stages:
            return self.eng.up_cat(level, self._nhwc(skip), h, e)
        return _up_cat(self.runner, self.eng, level, self._planes(skip), h, e, self.threads)

    def stage(self, level: Level, h):
        if level.name not in self.runner.stages:
            return self.eng.stage(level, self._nhwc(h))
        return _stage(self.runner, self.eng, level.name, self._planes(h), level.norm, self.threads)

    def head(self, h) -> torch.Tensor:
        h = self._planes(h)
        wp, bp, cout, cin, dil = self.runner.packed(self.eng, HEAD)
        u = torch.empty((h.B, cout) + h.spatial, dtype=torch.float32)
        D, H, W = h.dhw
        self.runner.lib.drdm_conv(h.nd, h.ptr, h.B, cin, PAD, u.data_ptr(), cout, 0, D, H, W, dil, wp.data_ptr(),
                                  bp.data_ptr(), MODE_STORE, None, None, self.eng.slope, self.threads)
        self.runner.free(h)
        return u


def _up_cat(runner, eng, level: Level, skip: Planes, h: torch.Tensor, e, threads) -> Planes:
    """cat([skip, up(h)]) + e as planes (skip and h are freed)."""
    vec, uniform = e
    cs = skip.C
    up, folded = eng.up(level, h, e, cs)
    add_up = None if folded else _add_vec(vec, uniform, cs, vec.shape[-1])
    eng.free(h)
    out = runner.planes(skip.B, cs + up.shape[1], skip.spatial)
    es, st = _add_vec(vec, uniform, 0, cs)
    D, H, W = skip.dhw
    runner.lib.drdm_planes_add(skip.nd, skip.ptr, PAD, cs, out.ptr, PAD, out.C, 0, skip.B, D, H, W, es.data_ptr(),
                               st, threads)
    _nhwc_into(runner, up, out, cs, add_up, threads)
    runner.free(skip)
    return out
