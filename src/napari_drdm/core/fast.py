"""The optimised inference path of DRDM: the same numbers as the plain modules, less time.

What it does (measured in ``benchmarks/speed.py``; figures in ``benchmarks/README.md``):

* **No autograd**: the work runs under ``torch.inference_mode``; results are ordinary tensors
  when the caller is outside inference mode (``torch.no_grad`` there).
* **Memory layout**: activations stay channels-last (``channels_last`` / ``channels_last_3d``).
  On the CPU, oneDNN's NHWC kernels are faster than the blocked NCHW ones for these narrow layers
  (10/20/40 channels) and no layout reorders are needed between layers (the plain NCHW network
  spends ~10 % of a pass reordering).
* **Fused CPU kernels (oneDNN)**: in every ACNN-II block the third convolution adds the residual
  in place (``r += conv(f)``), instance normalisation is a two-pass channels-last computation
  done in place (the stock op returns NCHW and its ``var_mean`` over non-contiguous axes is 6x
  slower), and every convolution writes into a reused buffer (see ``alloc``).
* **Output channels padded** to oneDNN's AVX2 block of 8 (10 -> 16, 20 -> 24) with zero filters:
  a partial block is handled slowly (1.2-1.3x per convolution); the padding is dropped by the
  copy or elementwise step that follows anyway.
* **Native kernels** (2D and 3D; :mod:`~napari_drdm.core.native`): the 10- and 20-channel
  stages at full and half resolution run in compiled C kernels that vectorise over the width
  (no padded channels) and fuse bias, LeakyReLU, the residual add and instance normalisation;
  oneDNN keeps the coarse levels.  Built on first use with the system C compiler; without one,
  the oneDNN path above is used.  Whether they are faster depends on the machine, so the first
  pass of each input shape and thread count times both paths and keeps the faster, remembered
  across runs (:mod:`~napari_drdm.core.autotune`).
* **Time embeddings**: the per-level MLPs run once per diffusion time t (cached); when a batch
  shares one t (always so in the reverse loop) they are folded into the preceding biases.
* **Weights** are converted once and cached; the cache follows in-place parameter updates
  (version counters), ``load_state_dict``, device moves, or :meth:`InferenceEngine.refresh`.
* **CUDA** (generic path): channels-last, cuDNN autotuning for the duration of a call, optional
  mixed precision (``amp_dtype=torch.bfloat16`` / ``torch.float16``; off by default: one pass
  moves by 55 % (bf16) / 10 % (fp16) of its mean output with the published checkpoint, and bf16
  makes recovered fields 60-90 % larger; benchmarks/README.md), optional CUDA-graph replay
  (``cuda_graphs=True``).
* **torch.compile**: optional (``compile=True``, generic path), off by default: on the two-core
  CPU it did not beat the oneDNN path (``benchmarks/speed.py --compile``).

Exactness: in float32 the output equals :meth:`DRDMNet.forward_plain` up to float rounding
(other summation orders inside convolutions and normalisation statistics): ~1e-6 for outputs of
~0.02, inside the golden tolerances (tests/test_fast_path.py).

Use::

    engine = net.engine()                 # cached InferenceEngine(net); net.engine(**options) for others
    u = engine(x, t, k=2)                 # = net.forward_plain(x, t, k) up to rounding

``DRDM`` models use it by default (``model.fast``); a bare ``DRDMNet`` routes ``forward`` here in
eval mode without gradients when ``net.fast`` is set.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import native as _native
from .unet import HEAD, LEVELS, Level, UNetOps, recursive_estimate, run_unet, to_fraction

__all__ = ["InferenceEngine", "mkldnn_fusion_available", "channels_last_format"]


def mkldnn_fusion_available() -> bool:
    """True when this PyTorch build has oneDNN's fused convolution operators (x86/ARM CPU builds)."""
    try:
        ops = torch.ops.mkldnn
        return bool(torch.backends.mkldnn.is_available()) and hasattr(ops, "_convolution_pointwise") \
            and hasattr(ops, "_convolution_pointwise_")
    except (AttributeError, RuntimeError):  # pragma: no cover - exotic builds
        return False


_cpu_capability = _native.cpu_capability


def _native_env() -> Optional[bool]:
    """NAPARI_DRDM_NATIVE as a forced choice: True (1/on/true/yes), False (0/off/false/no), None (unset)."""
    from .environment import flag
    return flag("NATIVE")


def _native_build_id(lib) -> str:
    """The kernel library's file name (it carries a hash of the source, flags and compiler)."""
    return os.path.basename(getattr(lib, "_name", "") or "unknown")


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


class InferenceEngine(UNetOps):
    """Inference-only evaluation of a :class:`~napari_drdm.core.network.DRDMNet`.

    Holds no parameters of its own: it reads the network's and caches converted copies.  It is
    also the oneDNN / generic back-end of the U-Net wiring (:class:`~napari_drdm.core.unet.UNetOps`:
    ``embed``, ``enter``, ``down``, ``up_cat``, ``stage``, ``head``), and lends the native back-end
    its work-tensor pool (``alloc``/``free``), its upsampling (``up``) and its converted weights
    (``conv_params``, ``norm_params``).

    Parameters
    ----------
    net: the network (any device; the engine follows it).
    channels_last: keep activations channels-last; default: yes.
    fuse: use oneDNN fused convolutions on the CPU; default: when available.
    amp_dtype: ``torch.bfloat16`` / ``torch.float16`` for CUDA autocast; ignored on the CPU.
    compile: wrap the single pass in ``torch.compile`` (generic path only; optional, off by default).
    cudnn_benchmark: let cuDNN pick the fastest algorithms (CUDA only; default: yes).
    pool: reuse work tensors (oneDNN path; default: yes).
    pad_channels: pad block output channels to the CPU's vector block (default: on AVX2).
    cuda_graphs: replay each (shape, K) forward from a captured CUDA graph (opt-in, CUDA only).
    native: run the network's two finest levels in the compiled kernels of
        :mod:`~napari_drdm.core.native` (CPU, float32, oneDNN path); default (None): where they
        build, whichever of the two paths was measured faster for the input's shape, batch and
        thread count (:mod:`~napari_drdm.core.autotune`, :meth:`path_decision`;
        ``NAPARI_DRDM_NATIVE=0/1`` forces).  ``True`` uses them wherever they build and raises if
        they cannot be used; ``False`` never.
    """

    def __init__(self, net: nn.Module, channels_last: Optional[bool] = None, fuse: Optional[bool] = None,
                 amp_dtype: Optional[torch.dtype] = None, compile: bool = False, cudnn_benchmark: bool = True,
                 pool: Optional[bool] = None, pad_channels: Optional[bool] = None, cuda_graphs: bool = False,
                 native: Optional[bool] = None):
        if amp_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype}")
        self.net = net
        self.ndim = int(net.ndim)
        self.channels_last = True if channels_last is None else bool(channels_last)
        self.fuse_requested = fuse
        self.amp_dtype = None if amp_dtype == torch.float32 else amp_dtype
        self.compile = bool(compile)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self._sig = None
        self._convs: Dict[str, _Conv] = {}
        self._norms: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._emb_cache: Dict[tuple, List[torch.Tensor]] = {}
        self._compiled = None
        self._last_t = (None, None, None)
        self._backend = "generic"
        self._pool = None
        self._pool_key = None
        self.pool = pool
        self.pad_channels = pad_channels
        self.cuda_graphs = bool(cuda_graphs)
        self._capturing = False
        self._graphs: Dict[tuple, tuple] = {}
        self._mods = None
        self._lock = threading.RLock()
        self._shapes: Dict[tuple, tuple] = {}
        self._prepacked: Dict[tuple, torch.Tensor] = {}
        self.slope = self._find_slope(net)
        self.native = native
        self._runner = None
        self._native_fits = False
        self._native_key, self._native_on, self._native_why = None, False, ""
        self._decisions: Dict[tuple, object] = {}      # (sig, shape, device, threads, ...) -> autotune.Decision
        self._forced: Optional[bool] = None            # set while the autotuner times one path
        self._arch_id = ""

    # ------------------------------------------------------------------ caches
    @staticmethod
    def _find_slope(net) -> float:
        for m in net.modules():
            if isinstance(m, nn.LeakyReLU):
                return float(m.negative_slope)
        return 1e-6

    def _signature(self):
        # called every pass: read the parameter dicts of a cached module list (walking the module
        # tree each time cost ~1.4 ms per pass); a device or dtype move changes data_ptr, an
        # in-place update (load_state_dict, an optimiser step) the version counter.  Replacing a
        # submodule needs refresh().
        if self._mods is None:
            self._mods = [m for m in self.net.modules() if m._parameters]
        return tuple((p.data_ptr(), self._stamp(p)) for m in self._mods for p in m._parameters.values()
                     if p is not None)

    @staticmethod
    def _stamp(p: torch.Tensor):
        try:
            return p._version
        except RuntimeError:
            # an inference tensor (a network built under torch.inference_mode) has no
            # version counter: fingerprint its values instead (~3 us per tensor, only then)
            with torch.inference_mode():
                q = p.detach().float()
                return (float(q.sum()), float((q * q).sum()))

    def refresh(self):
        """Forget cached weights, embeddings and work tensors (rebuilt automatically on changes,
        except when a submodule of the network is replaced: then call this)."""
        self._sig = None
        self._mods = None
        self._pool, self._pool_key = None, None
        self._runner = None
        self._graphs = {}
        self._emb_cache.clear()
        self._compiled = None

    def _fmt(self):
        return channels_last_format(self.ndim) if self.channels_last else None

    def backend(self, device: Optional[torch.device] = None) -> str:
        """'mkldnn' (fused oneDNN, CPU) or 'generic' (PyTorch functional ops, any device)."""
        device = device if device is not None else next(self.net.parameters()).device
        fuse = self.fuse_requested
        if fuse is None:
            fuse = device.type == "cpu" and mkldnn_fusion_available() and self.channels_last
        if fuse and not (device.type == "cpu" and mkldnn_fusion_available()):
            raise RuntimeError("fused oneDNN kernels need a CPU build of PyTorch with oneDNN (mkldnn)")
        if fuse and not self.channels_last:
            raise ValueError("the fused oneDNN path works in the channels-last layout")
        return "mkldnn" if fuse else "generic"

    def _pad_quantum(self, device) -> int:
        """Output-channel multiple for the block convolutions (0: no padding).

        oneDNN's direct NHWC kernels work on blocks of 8 (AVX2) output channels; 10 or 20 leave a
        partial block that is handled slowly: measured on an AVX2 CPU, 10->16 output channels
        ran 1.3x (2D) to 1.25x (3D) faster than 10->10.  Only enabled where measured (AVX2)."""
        pad = self.pad_channels
        if pad is None:
            pad = self.backend(device) == "mkldnn" and self._pool_wanted(device) and _cpu_capability() == "AVX2"
        if not pad:
            return 0
        return 16 if str(_cpu_capability()).startswith("AVX512") else 8

    def native_in_use(self, device: Optional[torch.device] = None, shape: Optional[Sequence[int]] = None) -> bool:
        """Whether passes run the compiled kernels of :mod:`~napari_drdm.core.native` (see ``native``).

        Args:
            device: the device of the inputs (default: the network's).
            shape: an input shape (B, C, *spatial): the path passes of that shape take (measured on
                first use, see :meth:`path_decision`).  Without it: whether the kernels are a
                candidate at all (built, fitting, not turned off)."""
        device = device if device is not None else next(self.net.parameters()).device
        if shape is not None:
            return self.path_decision(shape, device).path == "native"
        self._sync()
        return self._native_wanted(device)

    def path_decision(self, shape: Sequence[int], device: Optional[torch.device] = None, t: int = 40):
        """How passes of input ``shape`` run on ``device``: an :class:`~napari_drdm.core.autotune.Decision`
        (path "native" / "onednn" / "generic", the reason and, when measured, the timings).
        Measures on first use of the combination (a few passes on a random input at time ``t``).

        Args:
            shape: (B, C, *spatial) of the network input.
            device: default: the network's.
            t: the diffusion time of the probe passes."""
        from . import autotune
        device = device if device is not None else next(self.net.parameters()).device
        with self._lock:
            self._sync()
            if self.backend(device) != "mkldnn":
                return autotune.Decision("generic", f"{self.backend(device)} backend on {device.type}",
                                         "single candidate")
            dtype = next(self.net.parameters()).dtype
            if dtype != torch.float32:
                return autotune.Decision("onednn", f"native kernels not used: {dtype} weights (float32 only)",
                                         "single candidate")
            key = self._tune_key(tuple(shape), device)
            got = self._decisions.get(key)
            if got is None:
                x = torch.rand(tuple(shape), generator=torch.Generator().manual_seed(0)).to(device) - 0.5
                self._single_pass_locked(x, int(t))
                got = self._decisions[key]
            return got

    def _tune_key(self, shape, device):
        if len(self._decisions) > 64:         # bounded (shapes of one session are few)
            self._decisions.clear()
        return (self._arch_id, shape, device.type, torch.get_num_threads(), self.native, _native_env())

    def _native_for(self, x: torch.Tensor, t) -> bool:
        """Whether this pass runs the native kernels: forced (tuning, ``native=True``,
        ``NAPARI_DRDM_NATIVE``), or the measured choice for this shape and thread count."""
        if self._forced is not None:
            return self._forced
        key = self._tune_key(tuple(x.shape), x.device)
        d = self._decisions.get(key)
        if d is None:
            d = self._decisions[key] = self._decide(x, t)
        return d.path == "native"

    def _decide(self, x, t):
        from . import autotune
        D = autotune.Decision
        if not self._native_wanted(x.device):
            return D("onednn", f"native kernels not used: {self._native_why}", "single candidate")
        if self.native is True:
            return D("native", "native=True", "forced")
        env = _native_env()
        if env is not None:
            return D("native" if env else "onednn", f"forced by NAPARI_DRDM_NATIVE={int(env)}", "forced")
        if not autotune.enabled():
            auto, why = _native.auto_enabled()
            return D("native" if auto else "onednn", f"NAPARI_DRDM_AUTOTUNE=0, CPU-flag rule: {why}", "rule")
        lib = self._runner.lib
        key = autotune.make_key(device=x.device.type, ndim=self.ndim, shape=tuple(x.shape[2:]),
                                batch=int(x.shape[0]), channels=int(x.shape[1]), threads=torch.get_num_threads(),
                                torch=torch.__version__, kernels=_native_build_id(lib), net=self._arch_id)

        def run(native: bool):
            def one():
                self._forced = native
                try:
                    u = self._body(x, t)
                finally:
                    self._forced = None
                if not native:
                    self.free(u)
            return one
        # oneDNN first: it wins ties (no compiled code involved)
        return autotune.decide(key, {"onednn": run(False), "native": run(True)})

    def _arch(self) -> str:
        """A short fingerprint of the network's layer shapes and dtype (not its weights)."""
        import hashlib
        shapes = [(n, tuple(c.w.shape), c.cout, str(c.w.dtype)) for n, c in sorted(self._convs.items())]
        return hashlib.sha256(repr((shapes, self._native_fits)).encode()).hexdigest()[:12]

    def _native_wanted(self, device) -> bool:
        """Whether the native kernels are a candidate for this engine (built, fitting, allowed);
        decided once per weight signature, device type and option (reason in ``_native_why``)."""
        key = (self._sig, device.type, self.native)
        if key == self._native_key:
            return self._native_on
        if self.native is False or self.backend(device) != "mkldnn" or not self._pool_wanted(device):
            ok, why = False, "off for this engine (native=False, no oneDNN path or no work-tensor pool)"
        else:
            lib = _native.load()
            if lib is None:
                ok, why = False, _native.status()
            elif not self._native_fits:
                ok, why = False, "the network's layers do not fit the native kernels"
            else:
                ok, why = True, _native.status()
        if self.native is True and not ok:
            raise RuntimeError(f"native kernels requested but not usable: {why}")
        if ok and self._runner is None:
            self._runner = _native.Runner(_native.load())
        self._native_key, self._native_on, self._native_why = key, ok, why
        return ok

    def _pool_wanted(self, device) -> bool:
        return self.backend(device) == "mkldnn" and self.pool is not False

    def _sync(self):
        sig = self._signature()
        if sig == self._sig:
            return
        net = self.net
        fmt = self._fmt()
        dtype = next(net.parameters()).dtype
        convs, norms = {}, {}
        q = self._pad_quantum(next(net.parameters()).device)
        for name, m in net.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                in_block = name.endswith((".conv0", ".convs.0", ".convs.1"))
                convs[name] = _Conv(m, fmt, dtype, pad_to=q if in_block else 0)
            elif isinstance(m, (nn.InstanceNorm2d, nn.InstanceNorm3d)):
                norms[name] = (m.weight.detach(), m.bias.detach(), float(m.eps))
        self._convs, self._norms = convs, norms
        self._native_fits = dtype == torch.float32 and all(
            _native.supports(m) for name, m in net.named_modules()
            if name == HEAD or name.split(".")[0] in _native.NATIVE_STAGES and isinstance(m, (nn.Conv2d, nn.Conv3d)))
        if self._runner is not None:
            self._runner.reset()
        self._prepacked, self._shapes = {}, {}
        self._arch_id = self._arch()
        self._emb_cache.clear()
        self._compiled = None
        self._sig = sig

    def _embeddings(self, t: torch.Tensor, device) -> Tuple[List[torch.Tensor], bool]:
        """Per-level embedding vectors, in the order of :data:`~napari_drdm.core.unet.LEVELS`.

        Uniform t (one value for the whole batch): vectors of shape (C,), cached per t.
        Mixed t: (B, C) per sample (not cached).
        """
        net = self.net
        mods = [getattr(net, lv.embed) for lv in LEVELS]
        if self._capturing:      # CUDA graph capture: no host reads, per-sample vectors
            emb = net.time_embed(t)
            return [m(emb) for m in mods], False
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            # one device->host read per time tensor (the K passes of a step share it)
            try:
                ver = t._version
            except RuntimeError:          # inference tensors have no version counter
                ver = None
            if t is not self._last_t[0] or ver != self._last_t[1]:
                self._last_t = (t, ver, t.tolist())
            tl = self._last_t[2]
        elif isinstance(t, torch.Tensor):
            tl = t.tolist()
        else:
            tl = [int(t)]
        uniform = all(v == tl[0] for v in tl)
        if uniform:
            key = (int(tl[0]), device)
            got = self._emb_cache.get(key)
            if got is None:
                tt = torch.tensor([int(tl[0])], dtype=torch.int64, device=device)
                emb = net.time_embed(tt)
                got = [m(emb)[0].contiguous() for m in mods]
                if len(self._emb_cache) > 4 * net.n_steps:
                    self._emb_cache.clear()
                self._emb_cache[key] = got
            return got, True
        tt = t if isinstance(t, torch.Tensor) else torch.tensor(tl, dtype=torch.int64)
        emb = net.time_embed(tt.to(device))
        return [m(emb) for m in mods], False

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

    # ------------------------------------------------------------------ the network
    def _body(self, x: torch.Tensor, t) -> torch.Tensor:
        """The U-Net up to its last convolution (raw output, before the clamp)."""
        if self._backend == "mkldnn" and x.dtype == torch.float32 and self._native_for(x, t):
            return run_unet(_native.NativeOps(self, self._runner, torch.get_num_threads()), x, t)
        return run_unet(self, x, t)

    def _single_pass_impl(self, x: torch.Tensor, t) -> torch.Tensor:
        with torch.inference_mode():          # work tensors never leave this block
            u = self._body(x, t)
        # the same clamp as DRDMNet.single_pass (outside inference mode when the caller is: the
        # result is then an ordinary tensor)
        out = to_fraction(u.float(), x.shape[2]).contiguous()
        fmt = self._fmt()
        if fmt is not None and u.is_contiguous(memory_format=fmt):
            self.free(u)                      # a pooled work tensor (the native path's is not)
        return out

    @staticmethod
    def _grad_off():
        # inference_mode when the caller is in it (DRDM.generate, recover, the benchmark); else
        # no_grad, so that the outputs stay ordinary tensors (an inference tensor cannot be
        # modified in place or saved for backward later, e.g. in a training loop's validation)
        return contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.no_grad()

    def _context(self, device):
        stack = contextlib.ExitStack()
        stack.enter_context(self._grad_off())
        if device.type == "cuda":
            if self.cudnn_benchmark:
                stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=True,
                                                               deterministic=False,
                                                               allow_tf32=torch.backends.cudnn.allow_tf32))
            if self.amp_dtype is not None:
                stack.enter_context(torch.autocast("cuda", dtype=self.amp_dtype))
        return stack

    def single_pass(self, x: torch.Tensor, t) -> torch.Tensor:
        """One U-Net pass, as :meth:`DRDMNet.single_pass` (fraction of S, clamped).

        Thread-safe: calls on one engine are serialised (they share work buffers); on a CPU two
        generations at once would compete for the same cores anyway."""
        with self._lock:
            return self._single_pass_locked(x, t)

    def _single_pass_locked(self, x: torch.Tensor, t) -> torch.Tensor:
        self._sync()
        self._backend = self.backend(x.device)
        if self._pool_wanted(x.device):
            key = (tuple(x.shape), x.dtype, x.device)
            if key != self._pool_key:          # keep the work tensors of one input shape only
                self._pool, self._pool_key = {}, key
                if self._runner is not None:
                    self._runner.pool = {}
        else:
            self._pool, self._pool_key = None, None
        with self._context(x.device):
            if self.compile and self._backend == "generic":
                if self._compiled is None:
                    self._compiled = torch.compile(self._single_pass_impl, dynamic=False)
                return self._compiled(x, t)
            return self._single_pass_impl(x, t)

    def forward(self, x: torch.Tensor, t, k: int = 2) -> torch.Tensor:
        """Paper eq. 12 with K = k recursions, as :meth:`DRDMNet.forward`.

        t: an int (one time for the batch) or an int64 tensor (B,).
        """
        if self.cuda_graphs and x.is_cuda and not self._capturing:
            return self._graph_forward(x, t, int(k))
        if not isinstance(t, torch.Tensor):
            t = int(t)
        with self._grad_off():
            return recursive_estimate(self.single_pass, x, t, k)

    __call__ = forward

    # ------------------------------------------------------------------ CUDA graphs (opt-in)
    def _graph_forward(self, x: torch.Tensor, t, k: int) -> torch.Tensor:
        """forward() replayed from a captured CUDA graph: one launch for the ~300 kernels of a
        step's network part, which at small sizes are bound by launch and Python overhead.
        One graph per (shape, dtype, k); inputs are copied into static buffers."""
        tt = t if isinstance(t, torch.Tensor) else torch.full((x.shape[0],), int(t), dtype=torch.int64)
        tt = tt.to(device=x.device, dtype=torch.int64)
        with self._lock:
            self._sync()
            key = (tuple(x.shape), x.dtype, x.device, k, self._sig)
            g = self._graphs.get(key)
            if g is None:
                if len(self._graphs) >= 8:
                    self._graphs.clear()
                g = self._graphs[key] = self._capture(x, tt, k)
            static_x, static_t, graph, static_out = g
            static_x.copy_(x)
            static_t.copy_(tt)
            graph.replay()
            return static_out.clone()

    def _capture(self, x, t, k):
        static_x, static_t = x.clone(), t.clone()
        self._capturing = True
        try:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):           # warm-up: cuDNN autotuning, cached grids
                for _ in range(3):
                    self.forward(static_x, static_t, k)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.forward(static_x, static_t, k)
        finally:
            self._capturing = False
        return static_x, static_t, graph, static_out
