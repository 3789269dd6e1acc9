"""The optimised inference path of DRDM: the same numbers as the plain modules, less time.

What it does (measured in ``benchmarks/speed.py``; figures in ``benchmarks/README.md``):

* **No autograd**: the work runs under ``torch.inference_mode``; results are ordinary tensors
  when the caller is outside inference mode (``torch.no_grad`` there).
* **oneDNN on the CPU** (:mod:`~napari_drdm.core.onednn_ops`): channels-last activations, fused
  convolutions that write into reused work tensors, in-place instance normalisation, output
  channels padded to the CPU's vector block.
* **Native kernels** for the finest levels (:mod:`~napari_drdm.core.native`), where they build
  and were measured faster for the input's shape and thread count
  (:mod:`~napari_drdm.core.path_choice`, :mod:`~napari_drdm.core.autotune`).
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
import threading
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from . import native as _native
from .onednn_ops import OneDNNOps, _Conv, channels_last_format, mkldnn_fusion_available
from .path_choice import PathChoice
from .unet import HEAD, LEVELS, recursive_estimate, run_unet, to_fraction

__all__ = ["InferenceEngine", "mkldnn_fusion_available", "channels_last_format"]


class InferenceEngine(PathChoice, OneDNNOps):
    """Inference-only evaluation of a :class:`~napari_drdm.core.network.DRDMNet`.

    Holds no parameters of its own: it reads the network's and caches converted copies.  It is
    also the oneDNN / generic back-end of the U-Net wiring (:class:`~napari_drdm.core.unet.UNetOps`:
    ``embed``, ``enter``, ``down``, ``up_cat``, ``stage``, ``head``; the operations are those of
    :class:`~napari_drdm.core.onednn_ops.OneDNNOps`), and lends the native back-end its
    work-tensor pool (``alloc``/``free``), its upsampling (``up``) and its converted weights
    (``conv_params``, ``norm_params``).  Which path a pass takes is decided by
    :class:`~napari_drdm.core.path_choice.PathChoice` (``backend``, :meth:`path_decision`,
    :meth:`native_in_use`).  This class holds the options, the caches (converted weights, time
    embeddings), the calling context and the CUDA-graph replay.

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

    def _sync(self):
        """Convert the network's weights again if they changed since the last pass (see _signature)."""
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
            if name == HEAD or name.split(".")[0] in _native.WIDE_STAGES and isinstance(m, (nn.Conv2d, nn.Conv3d)))
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
