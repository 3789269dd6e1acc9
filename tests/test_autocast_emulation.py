"""benchmarks/autocast_emulation.py: CUDA autocast's bf16/fp16 numerics reproduced on the CPU
(used by ``benchmarks/speed.py --amp`` to measure what reduced precision does to the outputs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.autocast_emulation import AutocastEmulation, EmulatedAutocastEngine
from napari_drdm.core.fast import InferenceEngine
from napari_drdm.core.network import DRDMNet

LOW = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dt", LOW)
def test_convolution_rounds_operands_and_result(dt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 9, 9, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    with AutocastEmulation(dt) as mode:
        y = F.conv2d(x, w, b, padding=1)
    assert y.dtype == dt and mode.calls["lower"] == 1
    want = F.conv2d(x.to(dt).float(), w.to(dt).float(), b.to(dt).float(), padding=1).to(dt)
    assert torch.equal(y, want)
    # and it is not the float32 result rounded once: the operands were rounded first
    assert not torch.equal(y, F.conv2d(x, w, b, padding=1).to(dt))


@pytest.mark.parametrize("dt", LOW)
def test_float32_ops_and_type_promotion(dt):
    a = torch.rand(5).to(dt) + 0.5
    with AutocastEmulation(dt) as mode:
        r = torch.rsqrt(a)                   # on autocast's float32 list
        s = a + torch.ones(5)                # not listed: ordinary promotion -> float32
        k = F.leaky_relu(a, 0.01)            # not listed: stays in the low type
        lin = F.linear(torch.ones(2, 5), torch.ones(3, 5))
    assert r.dtype == torch.float32 and mode.calls["fp32"] == 1
    assert s.dtype == torch.float32 and k.dtype == dt and lin.dtype == dt


def test_rejects_float32():
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        AutocastEmulation(torch.float32)


def test_emulated_engine_on_a_network():
    torch.manual_seed(0)
    net = DRDMNet(2, channels=(4, 8, 8)).eval()
    x = torch.rand(1, 1, 32, 32)
    t = torch.tensor([7])
    with torch.inference_mode():
        ref = InferenceEngine(net, fuse=False)(x, t, k=2)
        outs = {dt: EmulatedAutocastEngine(net, dt)(x, t, k=2) for dt in LOW}
    for dt, y in outs.items():
        assert y.dtype == torch.float32 and y.shape == ref.shape and torch.isfinite(y).all()
        rel = float((y - ref).abs().mean() / ref.abs().mean())
        assert 0 < rel < 0.5, (dt, rel)          # rounded, yet the same computation
