"""The optimised inference path (core/fast.py, fast sampler) against the plain implementation.

Single network passes and single reverse steps must agree within 1e-4 (issue 6); the forward
sampler's fast route is bit-identical for power-of-two sizes.  Whole chaotic generations are not
compared pointwise (GOLDEN.md 6.3).  Timing is never asserted (shared, noisy machines).
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ref_path

from napari_drdm.core.config import DRDMConfig
from napari_drdm.core.fast import InferenceEngine, mkldnn_fusion_available
from napari_drdm.core.forward import ForwardSampler, LazyFrames
from napari_drdm.core.network import DRDMNet
from napari_drdm.core.recovery import recover
from napari_drdm.core.spatial import compose, frac_to_px, warp

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _net(ndim, seed=0):
    torch.manual_seed(seed)
    return DRDMNet(ndim).eval()


def _img(ndim, S, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((batch, 1) + (S // 4,) * ndim, generator=g)
    mode = "bilinear" if ndim == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=(S,) * ndim, mode=mode, align_corners=True)


BACKENDS = [dict(), dict(fuse=False), dict(fuse=False, channels_last=False)]


@pytest.mark.parametrize("ndim,S", [(2, 32), (2, 40), (3, 16)])
@pytest.mark.parametrize("opts", BACKENDS, ids=["default", "generic-cl", "generic-nchw"])
def test_engine_matches_plain_network(ndim, S, opts):
    net = _net(ndim)
    eng = InferenceEngine(net, **opts)
    x = _img(ndim, S, batch=2)
    with torch.inference_mode():
        for t in ([0, 0], [37, 37], [79, 5]):           # uniform (folded biases) and mixed t
            tt = torch.tensor(t)
            ref1 = net.forward_plain(x, tt, 1)
            out1 = eng(x, tt, 1)
            assert (out1 - ref1).abs().max().item() <= TOL
            assert (eng.single_pass(x, tt) - net.single_pass(x, tt)).abs().max().item() <= TOL
            ref2 = net.forward_plain(x, tt, 2)
            out2 = eng(x, tt, 2)
            assert out2.shape == ref2.shape and out2.dtype == ref2.dtype
            assert (out2 - ref2).abs().max().item() <= TOL
            assert (out2 - ref2).abs().max().item() <= 1e-4 * max(1.0, ref2.abs().max().item())


def test_default_backend_on_this_build():
    """An x86-64 CPU build with oneDNN (every official one) runs the fused oneDNN path by default."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        pytest.skip("not an x86-64 PyTorch build with oneDNN")
    assert mkldnn_fusion_available()
    assert _net(2).engine().backend(torch.device("cpu")) == "mkldnn"


@pytest.mark.parametrize("fusion", [True, False], ids=["onednn-build", "no-onednn-build"])
def test_backend_choice(monkeypatch, fusion):
    """The engine's choice given what the build offers: fused oneDNN on a CPU that has it and in the
    channels-last layout, the generic path otherwise; forcing fusion where it cannot run is an error."""
    from napari_drdm.core import onednn_ops
    monkeypatch.setattr(onednn_ops, "mkldnn_fusion_available", lambda: fusion)
    net, cpu, cuda = _net(2), torch.device("cpu"), torch.device("cuda")
    assert InferenceEngine(net).backend(cpu) == ("mkldnn" if fusion else "generic")
    assert InferenceEngine(net, fuse=False).backend(cpu) == "generic"
    assert InferenceEngine(net, channels_last=False).backend(cpu) == "generic"
    assert InferenceEngine(net).backend(cuda) == "generic"            # no oneDNN on a GPU
    with pytest.raises(RuntimeError, match="oneDNN"):
        InferenceEngine(net, fuse=True).backend(cuda)
    if fusion:
        assert InferenceEngine(net, fuse=True).backend(cpu) == "mkldnn"
        with pytest.raises(ValueError, match="channels-last"):
            InferenceEngine(net, fuse=True, channels_last=False).backend(cpu)
    else:
        with pytest.raises(RuntimeError, match="oneDNN"):
            InferenceEngine(net, fuse=True).backend(cpu)


def test_forward_routing_and_modes():
    net = _net(2)
    assert net.fast is False                    # the module stays the plain reference by default
    net.fast = True
    x, t = _img(2, 32), torch.tensor([11])
    with torch.inference_mode():
        fast = net(x, t, 2)
    assert "_fast_engine" in net.__dict__
    net.fast = False
    with torch.inference_mode():
        plain = net(x, t, 2)
    assert (fast - plain).abs().max().item() <= TOL
    # gradients wanted or training mode: always the plain modules (the engine is inference-only)
    net.fast = True
    xg = x.clone().requires_grad_(True)
    out = net(xg, t, 2)
    out.sum().backward()
    assert xg.grad is not None
    net.train()
    with torch.no_grad():
        out_train = net(x, t, 2)
    assert (out_train - plain).abs().max().item() <= TOL
    net.eval()
    # under no_grad (not inference mode) the engine returns ordinary tensors
    with torch.no_grad():
        out = net(x, t, 2)
    assert not out.is_inference()
    out.add_(1.0)
    # an int time works like a tensor
    with torch.inference_mode():
        assert (net(x, 11, 2) - fast).abs().max().item() == 0.0


def test_engine_follows_weight_changes():
    net = _net(2)
    net.fast = True
    x, t = _img(2, 32), torch.tensor([3])
    with torch.inference_mode():
        before = net(x, t, 1)
    with torch.no_grad():
        net.conv_out.weight.mul_(2.0)          # (a conv before an instance norm would cancel)
        net.te2[0].bias.add_(0.5)
    with torch.inference_mode():
        after = net(x, t, 1)
        plain = net.forward_plain(x, t, 1)
    assert (after - plain).abs().max().item() <= TOL
    assert (after - before).abs().max().item() > 1e-3
    net2 = _net(2, seed=5)
    net.load_state_dict(net2.state_dict())
    with torch.inference_mode():
        assert (net(x, t, 1) - net2.forward_plain(x, t, 1)).abs().max().item() <= TOL


def test_pickle_and_deepcopy_drop_engine():
    net = _net(2)
    net.fast = True
    x, t = _img(2, 32), torch.tensor([3])
    with torch.inference_mode():
        ref = net(x, t, 2)
    assert "_fast_engine" in net.__dict__
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert "_fast_engine" not in other.__dict__
        with torch.inference_mode():
            assert (other(x, t, 2) - ref).abs().max().item() == 0.0


@pytest.mark.parametrize("ndim,S,interp,padding", [(2, 32, "cubic", "zeros"), (3, 16, "linear", "border")])
def test_one_reverse_step_matches_plain(ndim, S, interp, padding):
    net = _net(ndim)
    cfg = DRDMConfig.default(ndim, S)
    x0 = _img(ndim, S)
    smp = ForwardSampler(cfg)
    psi = smp.sample(20, batch=1, generator=torch.Generator().manual_seed(0), return_step=False).forward_ddf
    frames = {}
    with torch.inference_mode():
        for fast in (False, True):
            gen = recover(net, x0, psi, 20, schedule="paper", k=2, compose_padding=padding,
                          image_interp=interp, fast=fast)
            frames[fast] = next(gen)
    a, b = frames[False], frames[True]
    for key in ("step_ddf", "ddf", "image"):
        # pixels; the 1e-4 bound of issue 6 is on fractions of S (network units)
        diff = (getattr(a, key) - getattr(b, key)).abs().max().item()
        assert diff <= TOL * (S if key != "image" else 1), (key, diff)


@pytest.mark.parametrize("ndim,S", [(2, 256), (2, 128), (3, 32), (3, 64)])
def test_fast_sampler_bit_identical(ndim, S):
    cfg = DRDMConfig.default(ndim, S)
    plain, fast = ForwardSampler(cfg, fast=False), ForwardSampler(cfg, fast=True)
    draws = plain.draw(3, torch.Generator().manual_seed(7))
    t = [45, 4, 0] if ndim == 2 else [30, 1, 0]
    a = plain.sample(t, draws=draws, return_frames=True, return_grid=True)
    b = fast.sample(t, draws=draws, return_frames=True, return_grid=True)
    assert torch.equal(a.grid["D64"], b.grid["D64"]) and torch.equal(a.grid["d64"], b.grid["d64"])
    assert torch.equal(a.forward_ddf, b.forward_ddf) and torch.equal(a.step_ddf, b.step_ddf)
    assert isinstance(b.frames, LazyFrames) and isinstance(a.frames, list)
    assert len(a.frames) == len(b.frames) == max(t)
    for i in (0, len(a.frames) // 2, -1):
        assert torch.equal(a.frames[i], b.frames[i])
    assert all(torch.equal(x, y) for x, y in zip(a.frames[:3], b.frames[:3]))


@pytest.mark.parametrize("ndim", [2, 3])
def test_fast_integrate_takes_counts_in_any_order_bit_identical(ndim):
    """The fast integration runs the samples in descending order of their counts (a prefix of the
    batch per composition): counts in any order, with ties and zeros, give the plain loop's
    numbers bit for bit, back in the caller's order, and a kept state is not changed by the
    compositions after it."""
    cfg = DRDMConfig.default(ndim, 32)
    plain, fast = ForwardSampler(cfg, fast=False), ForwardSampler(cfg, fast=True)
    g = torch.Generator().manual_seed(11)
    keep = [0, 1, 2, 4, 6, 9]
    for counts in ([2, 0, 9, 4], [6, 6, 1], [0, 0], [3], [1, 9, 9, 0, 5]):
        field = torch.randn((len(counts), ndim) + (cfg.control_grid,) * ndim, generator=g) * 0.02
        c = torch.tensor(counts)
        a, ka = plain.integrate(field, c, keep)
        b, kb = fast.integrate(field, c, keep)
        assert torch.equal(a, b), counts
        assert set(kb) == {k for k in keep if k <= max(counts)} and set(ka) <= set(kb)
        for k in ka:
            assert torch.equal(ka[k], kb[k]), (counts, k)
        for i, n in enumerate(counts):      # a sample whose count is reached keeps its state
            for k in kb:
                if k >= n:
                    assert torch.equal(kb[k][i], b[i]), (counts, i, k)
        assert torch.equal(b[c == 0], torch.zeros_like(b[c == 0]))


@pytest.mark.parametrize("ndim,S", [(2, 40), (2, 24), (3, 40), (2, 8)])
def test_fast_sampler_other_sizes(ndim, S):
    cfg = DRDMConfig.default(ndim, S)
    plain, fast = ForwardSampler(cfg, fast=False), ForwardSampler(cfg, fast=True)
    draws = plain.draw(1, torch.Generator().manual_seed(3))
    a = plain.sample(25, batch=1, draws=draws)
    b = fast.sample(25, batch=1, draws=draws)
    scale = a.forward_ddf.abs().max().item()
    assert (a.forward_ddf - b.forward_ddf).abs().max().item() <= 1e-5 * scale
    assert (a.step_ddf - b.step_ddf).abs().max().item() <= 1e-5 * max(scale, 1e-3)


def test_model_fast_flag(tiny_ckpt2d):
    from napari_drdm.model import DRDM
    model = DRDM.from_checkpoint(tiny_ckpt2d)
    assert model.fast and model.sampler.fast
    img = _img(2, 32)[0, 0].numpy()
    fast = model.generate(img, t_prime=4, seed=1, schedule="paper")
    model.fast = False
    assert not model.sampler.fast
    plain = model.generate(img, t_prime=4, seed=1, schedule="paper")
    np.testing.assert_array_equal(fast.forward_ddf, plain.forward_ddf)
    # 4 steps of a random network: large folded fields amplify rounding a little (pixels)
    np.testing.assert_allclose(fast.ddf, plain.ddf, atol=2e-2)
    model.fast = True
    x = torch.as_tensor(np.stack([img, img.T]))[:, None]
    phi, psi = model.generate_model_grid(x, 4, seeds=[1, 2], schedule="paper")
    assert phi.shape == (2, 2, 32, 32)


# ---------------------------------------------------------------- golden tolerances, fast path
def test_fast_path_golden_network_and_step(golden2d_net, ref_net2d):
    g = golden2d_net
    x = torch.from_numpy(g["network/x_256"])
    eng = ref_net2d.engine()
    with torch.inference_mode():
        out = eng(x, torch.full((2,), 40, dtype=torch.int64), 2)
    np.testing.assert_allclose(out.numpy(), g["network/t40_K2"], atol=2e-5)


def test_fast_path_golden_teacher_forced(ref_net2d):
    g = np.load(ref_path("golden_2d_recovery.npz"))
    T, S = torch.from_numpy, 256
    x0, prev = T(g["recovery/x0"]), T(g["recovery/T45/psi_Tp1"])
    eng = ref_net2d.engine()
    with torch.inference_mode():
        inp = warp(x0, frac_to_px(prev, S), "cubic", "zeros")
        u = eng(inp, torch.tensor([44]), 2)
        np.testing.assert_allclose(u.numpy(), g["recovery/paperTp/u_step1"], atol=5e-5)
        phi = compose(frac_to_px(u, S), frac_to_px(prev, S), "zeros") / S
        np.testing.assert_allclose(phi.numpy(), g["recovery/paperTp/phi_after_step1"], atol=5e-5)


def _golden_psi(g, tag):
    draws = [torch.from_numpy(g[f"recovery/{tag}/draw_{k}_s{s}"]) for k in ("clean", "noise") for s in (64, 32, 16, 8)]
    tp = int(g[f"recovery/{tag}/Tprime"])
    return ForwardSampler(DRDMConfig.default(2, 256)).sample(tp, batch=1, draws=draws, return_step=False).forward_ddf


def test_fast_path_golden_t10_loop(ref_net2d):
    """The stable T'=10 loop, pointwise, through the engine (tolerances of test_golden_recovery)."""
    from napari_drdm.core.metrics import field_metrics
    g = np.load(ref_path("golden_2d_recovery_t10.npz"))
    S = 256
    x0 = torch.from_numpy(g["recovery/x0"])
    with torch.inference_mode():
        frames = list(recover(ref_net2d, x0, _golden_psi(g, "T10"), 10, schedule="paper", k=2,
                              compose_padding="zeros", image_interp="cubic", fast=True))
    for k in (1, 2, 3):
        np.testing.assert_allclose((frames[k - 1].ddf / S).numpy(), g[f"recovery/paperT10/phi_after_step{k}"],
                                   atol=1e-4)
    np.testing.assert_allclose((frames[-1].ddf / S).numpy(), g["recovery/paperT10/phi_final"], atol=5e-4)
    np.testing.assert_allclose(frames[-1].image.numpy(), g["recovery/paperT10/img_rec"], atol=5e-3)
    m = field_metrics(frames[-1].ddf[0], side=S)
    assert abs(m["max_disp_pct"] - float(g["metrics/paperT10/max_pct"])) < 0.05


@pytest.mark.parametrize("mode", ["code80", "paperTp"])
def test_fast_path_golden_t45_first_steps(ref_net2d, mode):
    """The chaotic T'=45 loops: the first three steps pointwise, as test_golden_recovery does
    (whole loops are compared statistically: benchmarks/README.md)."""
    g = np.load(ref_path("golden_2d_recovery.npz"))
    S = 256
    x0 = torch.from_numpy(g["recovery/x0"])
    gen = recover(ref_net2d, x0, _golden_psi(g, "T45"), 45, schedule="reference" if mode == "code80" else "paper",
                  k=2, compose_padding="zeros", image_interp="cubic", fast=True)
    with torch.inference_mode():
        frames = [next(gen) for _ in range(3)]
    np.testing.assert_allclose((frames[0].ddf / S).numpy(), g[f"recovery/{mode}/phi_after_step1"], atol=1e-4)
    np.testing.assert_allclose((frames[1].ddf / S).numpy(), g[f"recovery/{mode}/phi_after_step2"], atol=2e-3)
    np.testing.assert_allclose((frames[2].ddf / S).numpy(), g[f"recovery/{mode}/phi_after_step3"], atol=2e-2)


# ---------------------------------------------------------------- the benchmark runs
def test_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "speed.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--sizes", "2d32", "--repeats", "1",
                        "--batch-sizes", "1,2", "--threads", "1", "--json", str(out), "--no-memory-probe"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("overhead_ratio", "speedup_vs_eager", "sizes", "environment"):
        assert key in res
    assert res["overhead_ratio"]["2d32"] > 0 and res["speedup_vs_eager"]["2d32"] > 0
    size = res["sizes"]["2d32"]
    for key in ("reverse_step_s", "network_pass_s", "generation_s", "forward_sampler_s", "samples_per_s"):
        assert key in size, key
    # the CPU model and the chosen path with its reason (issue 15)
    assert res["environment"]["cpu_model"]
    dec = size["path_decision"]
    assert dec["path"] in ("native", "onednn", "generic") and dec["reason"] and dec["source"]
    if dec["source"] == "measured":
        assert set(dec["medians_ms"]) == {"native", "onednn"}
        assert size["default_vs_fastest_path"]["fastest"] in ("native_only", "onednn_only")


def test_engine_thread_safe():
    """Two threads sharing one engine (GUI worker + export) get the single-threaded answers."""
    import threading
    net = _net(2)
    eng = net.engine()
    xs = [_img(2, 32, seed=s) for s in range(4)]
    t = torch.tensor([9])
    with torch.inference_mode():
        want = [eng(x, t, 2) for x in xs]
    got = {}

    def work(i):
        with torch.inference_mode():
            for _ in range(5):
                got[i] = eng(xs[i], t, 2)

    th = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for h in th:
        h.start()
    for h in th:
        h.join()
    for i in range(4):
        assert torch.equal(got[i], want[i])


def test_engine_with_a_network_built_under_inference_mode():
    """Parameters created under torch.inference_mode have no version counter; the engine still
    follows in-place weight changes (load_state_dict inside inference mode)."""
    with torch.inference_mode():
        net = _net(2)
        other = _net(2, seed=5)
        x = _img(2, 32)
        t = torch.tensor([20])
        eng = net.engine()
        before = eng(x, t, k=2)
        torch.testing.assert_close(before, net.forward_plain(x, t, 2), atol=1e-5, rtol=0)
        net.load_state_dict(other.state_dict())          # copy_ in place: same data_ptr
        after = eng(x, t, k=2)
        torch.testing.assert_close(after, other.forward_plain(x, t, 2), atol=1e-5, rtol=0)
        assert (after - before).abs().max() > 1e-4
