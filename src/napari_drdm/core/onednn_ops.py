"""The oneDNN / generic operation set of the inference engine (:mod:`~napari_drdm.core.fast`).

:class:`OneDNNOps` is the engine's back-end of the U-Net wiring (:class:`~napari_drdm.core.unet.UNetOps`)
on the CPU's fused oneDNN operators, or on PyTorch's functional operators on any other device:

* **Memory layout**: activations stay channels-last (``channels_last`` / ``channels_last_3d``).
  On the CPU, oneDNN's NHWC kernels are faster than the blocked NCHW ones for these narrow layers
  (10/20/40 channels) and no layout reorders are needed between layers (the plain NCHW network
  spends ~10 % of a pass reordering).
* **Fused CPU kernels (oneDNN)**: in every ACNN-II block the third convolution adds the residual
  in place (``r += conv(f)``), instance normalisation is a two-pass channels-last computation
  done in place (the stock op returns NCHW and its ``var_mean`` over non-contiguous axes is 6x
  slower), and every convolution writes into a reused buffer (see :meth:`OneDNNOps.alloc`).
* **Output channels padded** to oneDNN's AVX2 block of 8 (10 -> 16, 20 -> 24) with zero filters:
  a partial block is handled slowly (1.2-1.3x per convolution); the padding is dropped by the
  copy or elementwise step that follows anyway.

The weights come converted (:class:`_Conv`, built by the engine when the network changes); the
same work-tensor pool, upsampling and converted weights serve the native back-end
(:class:`~napari_drdm.core.native.NativeOps`) for the levels it leaves to oneDNN.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .native_build import cpu_capability
from .unet import HEAD, Level, UNetOps

__all__ = ["OneDNNOps", "mkldnn_fusion_available", "channels_last_format"]


def mkldnn_fusion_available() -> bool:
    """True when this PyTorch build has oneDNN's fused convolution operators (x86/ARM CPU builds)."""
    try:
        ops = torch.ops.mkldnn
        return bool(torch.backends.mkldnn.is_available()) and hasattr(ops, "_convolution_pointwise") \
            and hasattr(ops, "_convolution_pointwise_")
    except (AttributeError, RuntimeError):  # pragma: no cover - exotic builds
        return False


def channels_last_format(ndim: int):
    """The channels-last memory format for ``ndim`` spatial axes."""
    return torch.channels_last if ndim == 2 else torch.channels_last_3d


class _Conv:
    """One convolution's parameters in the engine's working layout."""

    __slots__ = ("w", "b", "padding", "stride", "dilation", "output_padding", "transposed", "cout")

    def __init__(self, m: nn.Module, fmt, dtype, pad_to: int = 0):
        w = m.weight.detach().to(dtype)
        b = m.bias.detach().to(dtype) if m.bias is not None else None
        self.cout = int(w.shape[0])
        if pad_to and self.cout % pad_to and not isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            # zero output channels up to a multiple of the CPU's vector width (see _block)
            P = -(-self.cout // pad_to) * pad_to
            w = torch.cat([w, w.new_zeros((P - self.cout,) + tuple(w.shape[1:]))])
            b = torch.cat([b, b.new_zeros(P - self.cout)]) if b is not None else None
        self.w = w.contiguous(memory_format=fmt) if fmt is not None else w.contiguous()
        self.b = b.contiguous() if b is not None else None
        self.padding = list(m.padding)
        self.stride = list(m.stride)
        self.dilation = list(m.dilation)
        self.transposed = isinstance(m, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        self.output_padding = list(m.output_padding) if self.transposed else None


class OneDNNOps(UNetOps):
    """The oneDNN (CPU) / generic (any device) operations of the inference engine, as a mixin of
    :class:`~napari_drdm.core.fast.InferenceEngine`.

    It works on the engine's state: ``ndim``, ``channels_last``, ``pad_channels``, ``slope``,
    the converted weights ``_convs`` / ``_norms``, the back-end of the current pass ``_backend``
    ("mkldnn" or "generic"), the work-tensor pool ``_pool`` (None: no pool), the per-shape caches
    ``_shapes`` / ``_prepacked``, and its ``backend``, ``_pool_wanted`` and ``_embeddings``.
    """

    def _fmt(self):
        return channels_last_format(self.ndim) if self.channels_last else None

    def _pad_quantum(self, device) -> int:
        """Output-channel multiple for the block convolutions (0: no padding).

        oneDNN's direct NHWC kernels work on blocks of 8 (AVX2) output channels; 10 or 20 leave a
        partial block that is handled slowly: measured on an AVX2 CPU, 10->16 output channels
        ran 1.3x (2D) to 1.25x (3D) faster than 10->10.  Only enabled where measured (AVX2)."""
        pad = self.pad_channels
        if pad is None:
            pad = self.backend(device) == "mkldnn" and self._pool_wanted(device) and cpu_capability() == "AVX2"
        if not pad:
            return 0
        return 16 if str(cpu_capability()).startswith("AVX512") else 8

    # ------------------------------------------------------------------ building blocks
    def _bc(self, e: torch.Tensor, uniform: bool) -> torch.Tensor:
        """Embedding vector -> broadcastable (1 or B, C, 1, ...)."""
        if uniform:
            return e.view(1, -1, *([1] * self.ndim))
        return e.view(e.shape[0], e.shape[1], *([1] * self.ndim))

    # Work tensors.  On the CPU (oneDNN path) every intermediate comes from a free list keyed by
    # shape and goes back to it as soon as it is dead: glibc hands large blocks back to the OS
    # when they are freed, and a fresh allocation then page-faults (zero-fills) all of its
    # pages again; at 128^3 that was 0.6 million faults and ~20 % of a pass.  Convolutions
    # write into such a buffer through oneDNN's in-place "dst += conv(x)" form after zeroing it
    # (conv(x) + 0 is exactly conv(x)).
    def alloc(self, shape, like: torch.Tensor):
        """A work tensor of ``shape`` with the dtype and device of ``like`` (channels-last; from the
        pool on the oneDNN path).

        Args:
            shape: (B, C, *spatial); like: a tensor of the wanted dtype and device."""
        shape = tuple(shape)
        if self._pool is not None:
            lst = self._pool.get((shape, like.dtype))
            if lst:
                return lst.pop()
        fmt = self._fmt()
        return torch.empty(shape, dtype=like.dtype, device=like.device,
                           memory_format=fmt if fmt is not None else torch.contiguous_format)

    def free(self, *ts):
        """Give dead work tensors back to the pool (no-op without one).

        Args:
            ts: tensors from :meth:`alloc` or the engine's operations, not used afterwards."""
        if self._pool is not None:
            for t in ts:
                lst = self._pool.setdefault((tuple(t.shape), t.dtype), [])
                if len(lst) < 4:            # bounded
                    lst.append(t)

    def _out_shape(self, x, c: _Conv):
        key = (id(c), x.shape)
        got = self._shapes.get(key)
        if got is None:
            got = self._shapes[key] = self._out_shape_calc(x, c)
        return got

    def _packed(self, x, c: _Conv):
        """The weight in oneDNN's own layout for this input shape (saves a reorder per call)."""
        key = (id(c), x.shape)
        got = self._prepacked.get(key)
        if got is None:
            try:
                got = torch.ops.mkldnn._reorder_convolution_weight(
                    c.w, c.padding, c.stride, c.dilation, 1, list(x.shape))
            except (RuntimeError, AttributeError):      # pragma: no cover - builds without it
                got = c.w
            self._prepacked[key] = got
        return got

    def _out_shape_calc(self, x, c: _Conv):
        k = c.w.shape[2:]
        sp = []
        for i, n in enumerate(x.shape[2:]):
            if c.transposed:
                sp.append((n - 1) * c.stride[i] - 2 * c.padding[i] + c.dilation[i] * (k[i] - 1)
                          + c.output_padding[i] + 1)
            else:
                sp.append((n + 2 * c.padding[i] - c.dilation[i] * (k[i] - 1) - 1) // c.stride[i] + 1)
        cout = c.w.shape[1] if c.transposed else c.w.shape[0]
        return (x.shape[0], cout) + tuple(sp)

    def _conv(self, x, c: _Conv, bias=None, post: Optional[str] = None):
        b = c.b if bias is None else bias
        if self._backend == "mkldnn":
            if c.transposed:
                y = torch.ops.mkldnn._convolution_transpose_pointwise(
                    x, c.w, b, c.padding, c.output_padding, c.stride, c.dilation, 1, "none", [], "")
                return F.leaky_relu_(y, self.slope) if post == "leaky_relu" else y
            if self._pool is not None:
                y = self.alloc(self._out_shape(x, c), x).zero_()
                torch.ops.mkldnn._convolution_pointwise_(
                    y, x, self._packed(x, c), b, c.padding, c.stride, c.dilation, 1, "add", None, None, [], None)
                return F.leaky_relu_(y, self.slope) if post == "leaky_relu" else y
            if post == "leaky_relu":
                return torch.ops.mkldnn._convolution_pointwise(
                    x, c.w, b, c.padding, c.stride, c.dilation, 1, "leaky_relu", [self.slope], "")
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.w, b, c.padding, c.stride, c.dilation, 1, "none", [], "")
        if c.transposed:
            fn = F.conv_transpose2d if self.ndim == 2 else F.conv_transpose3d
            y = fn(x, c.w, b, c.stride, c.padding, c.output_padding, 1, c.dilation)
        else:
            fn = F.conv2d if self.ndim == 2 else F.conv3d
            y = fn(x, c.w, b, c.stride, c.padding, c.dilation, 1)
        return F.leaky_relu(y, self.slope) if post == "leaky_relu" else y

    def _conv_add_(self, x, other, c: _Conv):
        """other <- conv(x) + other (in place where the backend allows)."""
        if self._backend == "mkldnn":
            return torch.ops.mkldnn._convolution_pointwise_(
                other, x, self._packed(x, c), c.b, c.padding, c.stride, c.dilation, 1, "add", None, None, [],
                None)
        y = self._conv(x, c)
        return y.add_(other)

    def _leaky(self, r):
        if self._pool is not None:
            return torch.ops.aten.leaky_relu.out(r, self.slope, out=self.alloc(r.shape, r))
        return F.leaky_relu(r, self.slope)

    def _norm_(self, r, name):
        """Instance norm, in place where possible."""
        w, b, eps = self._norms[name]
        if self._backend == "mkldnn":
            # Channels-last instance norm (the stock op returns NCHW and its var_mean over
            # non-contiguous axes is 6x slower): two-pass statistics,
            # y = (x - mean) * (rsqrt(var + eps) * w) + b.
            dims = tuple(range(2, 2 + self.ndim))
            mean = r.mean(dim=dims, keepdim=True)
            r.sub_(mean)
            sq = torch.mul(r, r, out=self.alloc(r.shape, r))
            var = sq.mean(dim=dims, keepdim=True)
            self.free(sq)
            scale = torch.rsqrt(var + eps) * self._bc(w, True)
            return torch.addcmul(self._bc(b, True), r, scale, out=r)
        y = F.instance_norm(r, None, None, w, b, True, 0.0, eps)
        fmt = self._fmt()
        return y.contiguous(memory_format=fmt) if fmt is not None else y

    def _block(self, prefix: str, x, norm: bool):
        c0 = self._convs[prefix + ".conv0"]
        if c0.w.shape[0] != c0.cout:
            return self._block_padded(prefix, x, norm)
        r = self._conv(x, c0)
        fmt = self._fmt()
        if fmt is not None and not r.is_contiguous(memory_format=fmt):
            # a 1-channel input is ambiguous (NCHW == NHWC) and oneDNN may answer NCHW
            r = r.contiguous(memory_format=fmt)
        if norm:
            r = self._norm_(r, prefix + ".ln")
        a = self._leaky(r)
        f = self._conv(a, self._convs[prefix + ".convs.0"], post="leaky_relu")
        self.free(a)
        out = self._conv_add_(f, r, self._convs[prefix + ".convs.1"])     # conv(f) + r, into r
        self.free(f)
        return F.leaky_relu_(out, self.slope)

    def _compact(self, y, C):
        """The first C channels of a padded work tensor, as a dense tensor (then y is freed)."""
        out = self.alloc((y.shape[0], C) + tuple(y.shape[2:]), y).copy_(y[:, :C])
        self.free(y)
        return out

    def _block_padded(self, prefix: str, x, norm: bool):
        """:meth:`_block` with output channels padded by zero filters (oneDNN path only):
        the same numbers, each padded result compacted back to C channels by one copy."""
        c0, c1, c2 = (self._convs[prefix + k] for k in (".conv0", ".convs.0", ".convs.1"))
        C = c0.cout
        r = self._compact(self._conv(x, c0), C)
        if norm:
            r = self._norm_(r, prefix + ".ln")
        a = self._leaky(r)
        f = F.leaky_relu_(self._compact(self._conv(a, c1), C), self.slope)
        self.free(a)
        g = self._conv(f, c2)
        self.free(f)
        r.add_(g[:, :C])                                                   # conv(f) + r
        self.free(g)
        return F.leaky_relu_(r, self.slope)

    def up(self, level: Level, h, e, cs: int):
        """(up(h), folded): the level's transposed convolution, with the embedding channels
        e[cs:] folded into its bias when the batch shares one t (folded = True); otherwise the
        caller adds them.

        Args:
            level: an up level; h: the previous stage's output (channels-last);
            e: the level's embedding (from :meth:`embed`); cs: the skip's channel count."""
        vec, uniform = e
        c = self._convs[level.resample]
        if uniform and c.b is not None:
            return self._conv(h, c, bias=c.b + vec[cs:]), True
        return self._conv(h, c), False

    def conv_params(self, name: str) -> _Conv:
        """The converted parameters of the network's convolution ``name`` (weights, bias,
        geometry; ``cout`` is the true output width when the weights are padded)."""
        return self._convs[name]

    def norm_params(self, name: str) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """(weight, bias, eps) of the network's instance normalisation ``name``."""
        return self._norms[name]

    # ------------------------------------------------------------------ the U-Net back-end
    def embed(self, x: torch.Tensor, t):
        E, uniform = self._embeddings(t, x.device)
        return [(e, uniform) for e in E]

    def enter(self, level: Level, x: torch.Tensor, e):
        vec, uniform = e
        h = torch.add(x, self._bc(vec, uniform), out=self.alloc(x.shape, x))
        fmt = self._fmt()
        if fmt is not None and not h.is_contiguous(memory_format=fmt):
            h = h.contiguous(memory_format=fmt)
        return h

    def down(self, level: Level, h, e):
        vec, uniform = e
        c = self._convs[level.resample]
        if level.combine == "mul":
            return self._conv(h, c).mul_(self._bc(vec, uniform))
        if uniform and c.b is not None:
            return self._conv(h, c, bias=c.b + vec)        # time embedding folded into the bias
        return self._conv(h, c).add_(self._bc(vec, uniform))

    def up_cat(self, level: Level, skip, h, e):
        """cat([skip, up(h)]) + e, written once into a channels-last buffer."""
        vec, uniform = e
        cs = skip.shape[1]
        up, folded = self.up(level, h, e, cs)
        if not folded:
            up.add_(self._bc(vec[..., cs:], uniform))
        self.free(h)
        out = self.alloc((skip.shape[0], cs + up.shape[1]) + tuple(skip.shape[2:]), up)
        torch.add(skip, self._bc(vec[..., :cs], uniform), out=out[:, :cs])
        out[:, cs:].copy_(up)
        self.free(skip)
        return out

    def stage(self, level: Level, h):
        for i in range(3):
            y = self._block(f"{level.name}.{i}", h, level.norm)
            self.free(h)                                   # a stage's input is dead after use
            h = y
        return h

    def head(self, h):
        u = self._conv(h, self._convs[HEAD])
        self.free(h)
        return u
