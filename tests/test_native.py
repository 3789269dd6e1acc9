"""The compiled CPU kernels (core/native.py, core/_native/kernels.c, built by core/native_build.py)
against PyTorch references, and the engine's use of them (same numbers as the plain network up to
float rounding)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from napari_drdm.core import native, native_build
from napari_drdm.core.fast import InferenceEngine
from napari_drdm.core.network import DRDMNet

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the native kernels are optional")
P = native.PAD


@pytest.fixture(scope="module", params=["simd", "avx2", "portable"])
def lib(request, tmp_path_factory):
    """This CPU's build (the engine's), the AVX2 build where this CPU gets the AVX-512 one, and
    the portable C build."""
    torch.set_num_threads(1)
    if request.param == "simd":
        got = native.load()
        assert got is not None, native.status()       # with a compiler, the build must work
        return got
    if request.param == "avx2":
        if native_build.simd_level() < 2:
            pytest.skip("this CPU's build is the AVX2 (or portable) one: tested as 'simd'")
        got = native.build_library(simd=1, cache_dir=tmp_path_factory.mktemp("kernels"))
        assert got.drdm_kernels_simd() == 1
        return got
    got = native.build_library(simd=False, cache_dir=tmp_path_factory.mktemp("kernels"))
    assert got.drdm_kernels_simd() == 0
    return got


def planes_of(x: torch.Tensor) -> native.Planes:
    p = native.Runner(None).planes(x.shape[0], x.shape[1], tuple(x.shape[2:]))
    inner = tuple(slice(P, P + n) for n in x.shape[2:])
    p._padded_view()[(slice(None), slice(None)) + inner] = x
    return p


def border_is_zero(p: native.Planes) -> bool:
    view = p._padded_view().clone()
    view[(slice(None), slice(None)) + tuple(slice(P, P + n) for n in p.spatial)] = 0
    return bool((view == 0).all())


def dhw(x):
    return (1,) * (5 - x.dim()) + tuple(x.shape[2:])


def run_conv(lib, x, w, b, dil, mode, res=None, slope=1e-2, threads=2):
    B, Cin = x.shape[:2]
    Cout = w.shape[0]
    wp, bp = native.pack_conv(w, b, Cout)
    src = planes_of(x)
    zeros = torch.zeros((B, Cout) + tuple(x.shape[2:]))
    out = planes_of(zeros) if res is None else planes_of(res)
    out2 = planes_of(zeros)
    lib.drdm_conv(x.dim() - 2, src.ptr, B, Cin, P, out.ptr, Cout, P, *dhw(x), dil, wp.data_ptr(), bp.data_ptr(),
                  mode, out.ptr if res is not None else None,
                  out2.ptr if mode == native.MODE_STORE_AND_LEAKY else None, slope, threads)
    assert border_is_zero(out) and border_is_zero(out2)
    return out.dense(), out2.dense()


CONV_CASES = [(10, 10, (9, 32), 1), (10, 10, (11, 24), 3), (1, 10, (7, 8), 1), (20, 7, (5, 12), 1),
              (3, 2, (6, 20), 3), (4, 4, (4, 4), 1),
              (10, 10, (4, 5, 16), 1), (5, 10, (7, 6, 12), 3), (2, 3, (3, 4, 4), 1),
              # the AVX-512 tiles: 64-pixel tiles, then a rest of 1-4 vectors of 16 (the last partial)
              (10, 10, (3, 70), 1), (5, 7, (4, 100), 3), (3, 10, (2, 128), 2), (2, 4, (3, 49), 1),
              (10, 5, (2, 3, 81), 1)]


@pytest.mark.parametrize("Cin,Cout,spatial,dil", CONV_CASES)
def test_conv_matches_pytorch(lib, Cin, Cout, spatial, dil):
    """2D and 3D; widths with a partial vector (12, 20, 4, 70, 100, 49, 81); every fused store mode."""
    nd = len(spatial)
    conv = F.conv2d if nd == 2 else F.conv3d
    g = torch.Generator().manual_seed(Cin * 100 + Cout + spatial[-1])
    x = torch.randn((2, Cin) + spatial, generator=g)
    w = torch.randn((Cout, Cin) + (3,) * nd, generator=g) * 0.3
    b = torch.randn(Cout, generator=g)
    ref = conv(x, w, b, padding=dil, dilation=dil)
    tol = dict(atol=1e-5, rtol=1e-5)
    got, _ = run_conv(lib, x, w, b, dil, native.MODE_STORE)
    torch.testing.assert_close(got, ref, **tol)
    got, _ = run_conv(lib, x, w, b, dil, native.MODE_LEAKY)
    torch.testing.assert_close(got, F.leaky_relu(ref, 1e-2), **tol)
    r = torch.randn(ref.shape, generator=g)
    got, _ = run_conv(lib, x, w, b, dil, native.MODE_RES_LEAKY, res=r)       # in place: out is res
    torch.testing.assert_close(got, F.leaky_relu(ref + r, 1e-2), **tol)
    got, got2 = run_conv(lib, x, w, b, dil, native.MODE_STORE_AND_LEAKY)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got2, F.leaky_relu(ref, 1e-2), **tol)


@pytest.mark.parametrize("spatial", [(8, 16), (4, 6, 8)])
def test_conv_dense_output(lib, spatial):
    nd = len(spatial)
    x = torch.randn((1, 10) + spatial)
    w, b = torch.randn((2, 10) + (3,) * nd), torch.randn(2)
    wp, bp = native.pack_conv(w, b, 2)
    src = planes_of(x)
    out = torch.full((1, 2) + spatial, float("nan"))
    lib.drdm_conv(nd, src.ptr, 1, 10, P, out.data_ptr(), 2, 0, *dhw(x), 1, wp.data_ptr(), bp.data_ptr(), 0, None,
                  None, 0.0, 1)
    ref = (F.conv2d if nd == 2 else F.conv3d)(x, w, b, padding=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial", [(16, 24), (5, 12), (33, 7), (3, 5, 12)])
def test_instance_norm_and_leaky(lib, spatial):
    g = torch.Generator().manual_seed(sum(spatial))
    x = torch.randn((2, 3) + spatial, generator=g) * 3 + 1
    gamma, beta = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    r, a = planes_of(x), planes_of(torch.zeros_like(x))
    lib.drdm_instnorm_leaky(x.dim() - 2, r.ptr, 2, 3, P, *dhw(x), gamma.data_ptr(), beta.data_ptr(), 1e-5, a.ptr,
                            0.1, 2)
    ref = F.instance_norm(x, weight=gamma, bias=beta, eps=1e-5)
    torch.testing.assert_close(r.dense(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.dense(), F.leaky_relu(ref, 0.1), atol=1e-5, rtol=1e-5)
    assert border_is_zero(r) and border_is_zero(a)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("spatial", [(5, 12), (3, 4, 8)])
def test_layout_copies(lib, per_sample, spatial):
    B, C = 2, 3
    nd = len(spatial)
    fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
    x = torch.randn((B, C) + spatial)
    add = torch.randn(B, C) if per_sample else torch.randn(C)
    stride = C if per_sample else 0
    bshape = (B, C) + (1,) * nd if per_sample else (1, C) + (1,) * nd
    expect = x + add.reshape(bshape)
    # channels-last -> planes (into channels 2..4 of a 6-channel buffer) and back
    dst = planes_of(torch.zeros((B, 6) + spatial))
    nhwc = x.contiguous(memory_format=fmt)
    lib.drdm_nhwc_to_planes(nd, nhwc.data_ptr(), C, dst.ptr, P, 6, 2, B, *dhw(x), add.contiguous().data_ptr(), stride,
                            2)
    torch.testing.assert_close(dst.dense()[:, 2:5], expect)
    assert (dst.dense()[:, :2] == 0).all() and (dst.dense()[:, 5:] == 0).all() and border_is_zero(dst)
    # planes -> planes with an add, from a dense (P=0) source
    dst2 = planes_of(torch.zeros_like(x))
    xc = x.contiguous()
    lib.drdm_planes_add(nd, xc.data_ptr(), 0, C, dst2.ptr, P, C, 0, B, *dhw(x), add.contiguous().data_ptr(), stride,
                        2)
    torch.testing.assert_close(dst2.dense(), expect)
    # planes -> channels-last
    back = torch.empty_like(x).contiguous(memory_format=fmt)
    lib.drdm_planes_to_nhwc(nd, dst2.ptr, P, C, back.data_ptr(), B, *dhw(x), 2)
    torch.testing.assert_close(back, expect)


# ---------------------------------------------------------------------------- the engine
def _net(seed=0, ndim=2):
    torch.manual_seed(seed)
    net = DRDMNet(ndim).eval()
    with torch.no_grad():          # non-trivial normalisation parameters
        for name, p in net.named_parameters():
            if name.endswith(".ln.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".ln.bias"):
                p.uniform_(-0.3, 0.3)
    return net


@pytest.mark.parametrize("ndim,S,t", [(2, 16, [3]), (2, 24, [40]), (2, 40, [5, 5]), (2, 32, [1, 70]), (2, 72, [9]),
                                     (3, 16, [7]), (3, 24, [2, 60])])
def test_engine_native_matches_plain(ndim, S, t):
    """Level-2 widths with a partial vector (S/2 = 12, 20), a level-1 width of a 64-pixel tile and a
    rest (72), batches, mixed t, 2D and 3D."""
    torch.set_num_threads(1)
    net = _net(ndim=ndim)
    eng = InferenceEngine(net, native=True)            # (the default too on AVX2 CPUs)
    assert eng.native_in_use(), native.status()
    g = torch.Generator().manual_seed(S)
    x = torch.rand((len(t), 1) + (S,) * ndim, generator=g)
    tt = torch.tensor(t)
    with torch.no_grad():
        got, ref = eng.single_pass(x, tt), net.single_pass(x, tt)
        assert (got - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()) / 0.1)
        torch.testing.assert_close(eng(x, tt, 2), net.forward_plain(x, tt, 2), atol=1e-4, rtol=0)
        # the oneDNN-only path agrees as well
        torch.testing.assert_close(InferenceEngine(net, native=False).single_pass(x, tt), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim,S", [(2, 24), (3, 16)])
def test_engine_both_stage_sets_match_plain(ndim, S):
    """The stages on planes are chosen per build (stages_for: the AVX-512 build adds the
    quarter-resolution levels); either set gives the plain network's numbers, whichever build
    this machine has."""
    torch.set_num_threads(1)
    assert set(native.NATIVE_STAGES) < set(native.WIDE_STAGES)
    net = _net(2, ndim=ndim)
    x, t = torch.rand((1, 1) + (S,) * ndim, generator=torch.Generator().manual_seed(1)), torch.tensor([20])
    eng = InferenceEngine(net, native=True)
    with torch.no_grad():
        ref = net.single_pass(x, t)
        eng.single_pass(x, t)                           # makes the runner
        assert eng._runner.stages == native.stages_for(eng._runner.lib)
        for stages in (native.NATIVE_STAGES, native.WIDE_STAGES):
            eng._runner.stages = stages
            torch.testing.assert_close(eng.single_pass(x, t), ref, atol=1e-5, rtol=0)


def test_engine_native_follows_weight_changes():
    torch.set_num_threads(1)
    net = _net(1)
    eng = InferenceEngine(net, native=True)
    x, t = torch.rand(1, 1, 16, 16), torch.tensor([10])
    with torch.no_grad():
        before = eng.single_pass(x, t)
        net.b1[0].convs[0].weight.mul_(1.5)              # a level-1 (native) layer
        after = eng.single_pass(x, t)
        assert (after - before).abs().max() > 1e-4
        torch.testing.assert_close(after, net.single_pass(x, t), atol=1e-5, rtol=0)


def test_engine_native_true_needs_fitting_layers():
    net = DRDMNet(2).eval().double()                    # float64: not for these kernels
    with pytest.raises(RuntimeError, match="native kernels requested"):
        InferenceEngine(net, native=True).native_in_use(torch.device("cpu"))
    assert not InferenceEngine(net).native_in_use(torch.device("cpu"))


def _in_subprocess(code: str, **env):
    e = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


_PROBE = """
    import torch
    from napari_drdm.core import native, native_build
    from napari_drdm.core.fast import InferenceEngine
    from napari_drdm.core.network import DRDMNet
    torch.manual_seed(0)
    net = DRDMNet(2).eval()
    eng = InferenceEngine(net)
    x, t = torch.rand(1, 1, 16, 16), torch.tensor([3])
    with torch.no_grad():
        d = (eng.single_pass(x, t) - net.single_pass(x, t)).abs().max().item()
    print(eng.native_in_use(), d < 1e-5)
    print(native.status())
    try:
        InferenceEngine(net, native=True).native_in_use()
        print("no error")
    except RuntimeError as exc:
        print("error:", exc)
"""


def test_disabled_by_environment_falls_back_to_onednn():
    out = _in_subprocess(_PROBE, NAPARI_DRDM_NATIVE="0").splitlines()
    assert out[0] == "False True"
    assert "NAPARI_DRDM_NATIVE=0" in out[1]
    assert out[2].startswith("error: native kernels requested but not usable")


def test_failed_build_falls_back_to_onednn(tmp_path):
    out = _in_subprocess(_PROBE, CC="false", NAPARI_DRDM_CACHE=str(tmp_path)).splitlines()
    assert out[0] == "False True"
    assert out[1].startswith("build failed") and "oneDNN path used" in out[1]
    assert not any(p.suffix == ".so" for p in tmp_path.iterdir())           # no half-written library


def test_compiler_without_avx512_falls_back_to_the_avx2_build(tmp_path):
    """On an AVX-512 CPU, a compiler that refuses -mavx512f still gives the AVX2 kernels."""
    if native_build.simd_level() < 2:
        pytest.skip("this CPU's build is not the AVX-512 one")
    real = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc")
    cc = tmp_path / "cc-no-avx512"
    cc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -mavx512f ] && exit 1; done\nexec {real} "$@"\n')
    cc.chmod(0o755)
    probe = "from napari_drdm.core import native_build as nb\nlib = nb.load()\nprint(lib.drdm_kernels_simd(), nb.status())"
    out = _in_subprocess(probe, CC=str(cc), NAPARI_DRDM_CACHE=str(tmp_path / "cache")).splitlines()
    assert out[0].startswith("1 native kernels built (AVX2/FMA"), out


def test_flag_rule_without_autotuning(monkeypatch):
    """With measuring off (NAPARI_DRDM_AUTOTUNE=0) the CPU-flag rule decides: the kernels only on
    AVX2 CPUs; native=True and NAPARI_DRDM_NATIVE=1 override."""
    net = _net(2)
    shape = (1, 1, 16, 16)
    monkeypatch.delenv("NAPARI_DRDM_NATIVE", raising=False)
    monkeypatch.setenv("NAPARI_DRDM_AUTOTUNE", "0")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    auto, why = native.auto_enabled()
    assert not auto and "AVX512" in why
    d = InferenceEngine(net).path_decision(shape)
    assert d.path == "onednn" and d.source == "rule" and "AVX512" in d.reason
    assert InferenceEngine(net, native=True).native_in_use(torch.device("cpu"), shape)
    monkeypatch.setenv("NAPARI_DRDM_NATIVE", "1")
    d = InferenceEngine(net).path_decision(shape)
    assert d.path == "native" and d.source == "forced"
    monkeypatch.setenv("NAPARI_DRDM_NATIVE", "0")
    assert InferenceEngine(net).path_decision(shape).path == "onednn"


def test_unwritable_cache_falls_back_to_a_temporary_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    (tmp_path / "tmp").mkdir()
    out = _in_subprocess("""
        from napari_drdm.core import native_build
        print(native_build.load() is not None, native_build._state["path"])
    """, NAPARI_DRDM_CACHE=str(blocker / "cache"), TMPDIR=str(tmp_path / "tmp"))
    ok, path = out.split()
    assert ok == "True" and path.startswith(str(tmp_path / "tmp" / "napari-drdm-"))


@pytest.mark.parametrize("device,fusion,built,path", [
    ("cpu", True, True, "oneDNN, or oneDNN + native kernels where measured faster"),
    ("cpu", True, False, "oneDNN"),
    ("cpu", False, True, "generic PyTorch"),
    ("cuda", True, True, "generic PyTorch on cuda (channels-last, float32)"),
])
def test_cli_info_reports_the_inference_path(capsys, monkeypatch, device, fusion, built, path):
    """`drdm info` names the path the engine takes on the device it would use, given whether the
    build has oneDNN fusion (made up here) and whether the native kernels compiled (here: the real
    library, or none)."""
    import json

    from napari_drdm import model
    from napari_drdm.cli import main
    from napari_drdm.core import native_build, onednn_ops

    monkeypatch.setattr(model, "pick_device", lambda *a, **k: torch.device(device))
    monkeypatch.setattr(onednn_ops, "mkldnn_fusion_available", lambda: fusion)
    lib = native.load() if built else None
    if built and lib is None:
        pytest.skip(f"native kernels not built here: {native.status()}")
    monkeypatch.setattr(native_build, "load", lambda: lib)
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == device and info["onednn_fused_convolutions"] is fusion
    assert info["native_kernels"]["built"] is built
    assert info["inference_path"] == path or info["inference_path"].startswith(path + " (")
    assert main(["info"]) == 0
    assert f"inference_path: {info['inference_path']}" in capsys.readouterr().out


def test_native_off_is_read_at_every_call_not_remembered(monkeypatch):
    """A process that sets NAPARI_DRDM_NATIVE=0 for a while (one test, one forced benchmark path)
    gets the kernels back once it is unset: the flag is not cached with the library."""
    from napari_drdm.core import native_build
    monkeypatch.setenv("NAPARI_DRDM_NATIVE", "0")
    assert native_build.load() is None
    assert native_build.status() == "disabled by NAPARI_DRDM_NATIVE=0"
    monkeypatch.delenv("NAPARI_DRDM_NATIVE")
    lib = native_build.load()
    if lib is None:
        pytest.skip(f"native kernels not built here: {native_build.status()}")
    assert "disabled" not in native_build.status()
    monkeypatch.setenv("NAPARI_DRDM_NATIVE", "0")
    assert native_build.load() is None
