"""CUDA mixed precision (``torch.autocast("cuda", bf16 / fp16)``), reproduced on a CPU.

What it is for: the effect of reduced precision on the *outputs* (the Table 1 metrics of whole
generations) can be measured without a GPU.  The timing effect cannot; that needs the GPU itself.

How: the network's generic (PyTorch functional) path runs with real ``bfloat16`` / ``float16``
tensors on the CPU, and a :class:`~torch.overrides.TorchFunctionMode` applies autocast's rules
from the PyTorch "Autocast Op Reference" (CUDA lists):

* the ops autocast runs in lower precision (convolutions, transposed convolutions, linear layers,
  matrix products) get their floating inputs, weights and biases rounded to the low type; they
  are then computed in float32 from those rounded values and the result is rounded to the low
  type: tensor cores multiply bf16/fp16 operands exactly and accumulate in float32;
* the ops autocast runs in float32 (``rsqrt``, ``pow``, ``exp``, ``log``, ``sum``, ``norm``, ...) get
  float32 inputs;
* every other op runs in the type its inputs have, with PyTorch's ordinary type promotion
  (``float32 + bfloat16 -> float32``; instance normalisation of a bf16 tensor gives bf16), as it
  does under CUDA autocast.

What differs from a GPU: the order of summation inside convolutions (cuDNN picks its own
algorithms) and the rounding inside fused GPU kernels.  Differences of that kind are float32
rounding, orders of magnitude below the bf16/fp16 rounding this emulates.

Use::

    eng = EmulatedAutocastEngine(net, torch.bfloat16)
    u = eng(x, t, k=2)        # like InferenceEngine(net, amp_dtype=torch.bfloat16) on a GPU
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from napari_drdm.core.fast import InferenceEngine

__all__ = ["AutocastEmulation", "EmulatedAutocastEngine"]

# PyTorch Autocast Op Reference, "CUDA Ops that can autocast to float16" (the same list applies
# to bfloat16); the functions this network and its helpers can reach.
_LOWER = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
          F.linear, torch.matmul, torch.mm, torch.mv, torch.bmm, torch.addmm, torch.baddbmm,
          torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.__matmul__}
# "CUDA Ops that can autocast to float32" (those this network could reach)
_FP32 = {torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__,
         torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.sum, torch.Tensor.sum,
         torch.norm, torch.Tensor.norm, F.layer_norm, F.group_norm, F.softmax, F.log_softmax,
         torch.reciprocal, torch.Tensor.reciprocal, torch.cumsum, torch.prod, F.normalize}


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


class AutocastEmulation(TorchFunctionMode):
    """Autocast's per-op casting rules on any device (see the module docstring)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        self.dtype = dtype
        self.calls = {"lower": 0, "fp32": 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            self.calls["lower"] += 1
            low = self.dtype

            def up(t):   # round to the low type, compute from the rounded values in float32
                return t.to(low).float() if t.is_floating_point() else t
            out = func(*_map(args, up), **_map(kwargs, up))
            return _map(out, lambda t: t.to(low) if t.is_floating_point() else t)
        if func in _FP32:
            self.calls["fp32"] += 1
            def f32(t):
                return t.float() if t.is_floating_point() else t
            return func(*_map(args, f32), **_map(kwargs, f32))
        return func(*args, **kwargs)


class EmulatedAutocastEngine(InferenceEngine):
    """The generic engine path under :class:`AutocastEmulation`: what
    ``InferenceEngine(net, amp_dtype=dtype)`` computes on a GPU, on any device."""

    def __init__(self, net, dtype: torch.dtype):
        super().__init__(net, fuse=False)
        self.emulated_dtype = dtype

    def _single_pass_impl(self, x, t):
        with AutocastEmulation(self.emulated_dtype):
            return super()._single_pass_impl(x, t)
