"""Which path a pass of the inference engine (:mod:`~napari_drdm.core.fast`) takes.

Three candidates: generic PyTorch (any device), the fused oneDNN operators (CPU,
:mod:`~napari_drdm.core.onednn_ops`), and oneDNN with the **native kernels**
(:mod:`~napari_drdm.core.native`, 2D and 3D): the 10- and 20-channel stages at full and half
resolution run in compiled C kernels that vectorise over the width (no padded channels) and fuse
bias, LeakyReLU, the residual add and instance normalisation; oneDNN keeps the coarse levels.
They are built on first use with the system C compiler (:mod:`~napari_drdm.core.native_build`);
without one, the oneDNN path is used.  Whether they are faster depends on the machine, so the
first pass of each input shape and thread count times both paths and keeps the faster,
remembered across runs (:mod:`~napari_drdm.core.autotune`).  ``native=True/False`` and
``NAPARI_DRDM_NATIVE=0/1`` force the choice; with measuring off (``NAPARI_DRDM_AUTOTUNE=0``) a
CPU-flag rule decides (:func:`~napari_drdm.core.native_build.auto_enabled`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from . import native as _native
from . import native_build, onednn_ops

__all__ = ["PathChoice"]


def _native_env() -> Optional[bool]:
    """NAPARI_DRDM_NATIVE as a forced choice: True (1/on/true/yes), False (0/off/false/no), None (unset)."""
    from .environment import flag
    return flag("NATIVE")


def _native_build_id(lib) -> str:
    """The kernel library's file name (it carries a hash of the source, flags and compiler)."""
    return os.path.basename(getattr(lib, "_name", "") or "unknown")


class PathChoice:
    """The path choice of :class:`~napari_drdm.core.fast.InferenceEngine`, as a mixin.

    It works on the engine's options (``native``, ``fuse_requested``, ``channels_last``, ``pool``)
    and state: the decisions made so far ``_decisions``, the forced path while one is timed
    ``_forced``, the native runner ``_runner``, whether the network fits the kernels
    ``_native_fits``, and the engine's ``_sync``, ``_body``, ``_single_pass_locked`` and ``free``.
    """

    def backend(self, device: Optional[torch.device] = None) -> str:
        """'mkldnn' (fused oneDNN, CPU) or 'generic' (PyTorch functional ops, any device)."""
        device = device if device is not None else next(self.net.parameters()).device
        fuse = self.fuse_requested
        if fuse is None:
            fuse = device.type == "cpu" and onednn_ops.mkldnn_fusion_available() and self.channels_last
        if fuse and not (device.type == "cpu" and onednn_ops.mkldnn_fusion_available()):
            raise RuntimeError("fused oneDNN kernels need a CPU build of PyTorch with oneDNN (mkldnn)")
        if fuse and not self.channels_last:
            raise ValueError("the fused oneDNN path works in the channels-last layout")
        return "mkldnn" if fuse else "generic"

    def _pool_wanted(self, device) -> bool:
        """Whether passes use the work-tensor pool (oneDNN path, unless ``pool=False``)."""
        return self.backend(device) == "mkldnn" and self.pool is not False

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
        if _native_env() is False and self.native is not True:   # the kernels are not even loaded then
            return D("onednn", "forced by NAPARI_DRDM_NATIVE=0", "forced")
        if not self._native_wanted(x.device):
            return D("onednn", f"native kernels not used: {self._native_why}", "single candidate")
        if self.native is True:
            return D("native", "native=True", "forced")
        env = _native_env()
        if env is not None:
            return D("native" if env else "onednn", f"forced by NAPARI_DRDM_NATIVE={int(env)}", "forced")
        if not autotune.enabled():
            auto, why = native_build.auto_enabled()
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
            lib = native_build.load()
            if lib is None:
                ok, why = False, native_build.status()
            elif not self._native_fits:
                ok, why = False, "the network's layers do not fit the native kernels"
            else:
                ok, why = True, native_build.status()
        if self.native is True and not ok:
            raise RuntimeError(f"native kernels requested but not usable: {why}")
        if ok and self._runner is None:
            self._runner = _native.Runner(native_build.load())
        self._native_key, self._native_on, self._native_why = key, ok, why
        return ok
