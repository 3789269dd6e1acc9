"""Golden parity: warp, compose, schedule, time embedding, sampler, network, losses, metrics
against the reference implementation's outputs (../shared/reference, GOLDEN.md section 5/6)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_drdm.core import losses as L
from napari_drdm.core.config import DRDMConfig
from napari_drdm.core.forward import ForwardSampler, schedule_counts
from napari_drdm.core.metrics import field_metrics, jacobian_determinant
from napari_drdm.core.network import sinusoid_table
from napari_drdm.core.spatial import compose, frac_to_px, px_to_frac, warp

pytestmark = pytest.mark.golden
T = torch.from_numpy


def test_schedule_matches_reference_tables(golden2d):
    nt, nt1 = schedule_counts(torch.arange(80))
    np.testing.assert_array_equal(nt.numpy(), golden2d["schedule/n_t"])
    np.testing.assert_array_equal(nt1.numpy(), golden2d["schedule/n_t1"])
    assert int(nt[32]) == 8  # float64 would give 7


def test_time_embedding_bit_exact(golden2d):
    np.testing.assert_array_equal(sinusoid_table(80, 100).numpy(), golden2d["time_embedding"])


@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_warp_2d(golden2d, mode, padding):
    img, ddf = T(golden2d["warp/img"]), T(golden2d["warp/ddf"])
    out = warp(img, frac_to_px(ddf, 64), {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode), padding)
    ref = golden2d[f"warp/out_{mode}_{padding}"]
    if mode == "nearest":
        assert np.mean(out.numpy() != ref) < 1e-3  # exact except isolated rounding ties
    else:
        np.testing.assert_allclose(out.numpy(), ref, atol=5e-5)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_warp_3d(golden3d, mode, padding):
    img, ddf = T(golden3d["warp/img"]), T(golden3d["warp/ddf"])
    out = warp(img, frac_to_px(ddf, 32), "linear" if mode == "bilinear" else mode, padding)
    ref = golden3d[f"warp/out_{mode}_{padding}"]
    if mode == "nearest":
        assert np.mean(out.numpy() != ref) < 1e-3
    else:
        np.testing.assert_allclose(out.numpy(), ref, atol=5e-5)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("which", ["2d", "3d"])
def test_compose(golden2d, golden3d, padding, which):
    g, S = (golden2d, 64) if which == "2d" else (golden3d, 32)
    a, b = frac_to_px(T(g["compose/a"]), S), frac_to_px(T(g["compose/b"]), S)
    out = px_to_frac(compose(a, b, padding), S)
    np.testing.assert_allclose(out.numpy(), g[f"compose/a_then_b_{padding}"], atol=2e-6)


def _draws(g, prefix):
    return [T(g[f"{prefix}draw_{k}_s{s}"]) for k in ("clean", "noise") for s in (64, 32, 16, 8)]


@pytest.mark.parametrize("case", ["S256_t1", "S256_t10", "S256_t45", "S256_t79", "S128_t45", "S128_t79", "S128_batch"])
def test_sampler_2d(golden2d, case):
    p = f"sampler/{case}/"
    S = 256 if case.startswith("S256") else 128
    fs = ForwardSampler(DRDMConfig.default(2, S))
    out = fs.sample(golden2d[p + "t"].tolist(), draws=_draws(golden2d, p), return_grid=True)
    for key in ("v", "noise_field", "v0"):
        ref = golden2d[p + key]
        np.testing.assert_allclose(out.grid[key].numpy(), ref, atol=1e-6 * np.abs(ref).max())
    for key, val in (("D64", out.grid["D64"]), ("d64", out.grid["d64"]),
                     ("psi_t1", out.forward_ddf / S), ("psi_t", out.step_ddf / S)):
        if p + key not in golden2d.files:
            continue
        ref = golden2d[p + key]
        np.testing.assert_allclose(val.numpy(), ref, atol=5e-4 * np.abs(ref).max() + 1e-12)
    x0 = T(golden2d[p + "x0"]) if p + "x0" in golden2d.files else T(golden2d[f"sampler/x0_S{S}"])
    img_t = warp(x0, out.forward_ddf, "linear", "zeros")
    np.testing.assert_allclose(img_t.numpy(), golden2d[p + "img_t_bilinear"], atol=5e-3)


def test_sampler_3d(golden3d):
    from conftest import ref_path
    g64 = np.load(ref_path("golden_3d_grid64.npz"))
    p = "sampler/S32_t45/"
    fs = ForwardSampler(DRDMConfig.default(3, 32))
    out = fs.sample(45, batch=1, draws=_draws(golden3d, p), return_grid=True)
    for key in ("v", "v0"):
        ref = g64[p + key]
        np.testing.assert_allclose(out.grid[key].numpy(), ref, atol=1e-6 * np.abs(ref).max())
    for key, val in (("D64", out.grid["D64"]), ("d64", out.grid["d64"])):
        ref = g64[p + key]
        np.testing.assert_allclose(val.numpy(), ref, atol=5e-4 * np.abs(ref).max())
    for key, val in (("psi_t1", out.forward_ddf / 32), ("psi_t", out.step_ddf / 32)):
        ref = golden3d[p + key]
        np.testing.assert_allclose(val.numpy(), ref, atol=5e-4 * np.abs(ref).max())
    img_t = warp(T(golden3d["x0"]), out.forward_ddf, "linear", "zeros")
    np.testing.assert_allclose(img_t.numpy(), golden3d[p + "img_t_bilinear"], atol=5e-3)


@pytest.mark.parametrize("size", [256, 128])
@pytest.mark.parametrize("t", [0, 40, 79])
@pytest.mark.parametrize("k", [1, 2])
def test_network_2d(golden2d_net, ref_net2d, size, t, k):
    pre = "network/" if size == 256 else "network/S128_"
    x = T(golden2d_net[f"network/x_{size}"])
    with torch.inference_mode():
        out = ref_net2d(x, torch.full((2,), t, dtype=torch.int64), k)
    np.testing.assert_allclose(out.numpy(), golden2d_net[f"{pre}t{t}_K{k}"], atol=2e-5)


def test_network_2d_pass2_and_mixed_t(golden2d_net, ref_net2d):
    g = golden2d_net
    x = T(g["network/x_256"])
    psi1 = T(g["network/t40_K1"])
    x2 = warp(x, frac_to_px(psi1, 256), "linear", "zeros")
    np.testing.assert_allclose(x2.numpy(), g["network/t40_pass2_input"], atol=1e-4)
    t = torch.full((2,), 40, dtype=torch.int64)
    with torch.inference_mode():
        raw = ref_net2d.single_pass(T(g["network/t40_pass2_input"]), t)
        np.testing.assert_allclose(raw.numpy(), g["network/t40_pass2_raw"], atol=2e-5)
        mixed = ref_net2d(T(g["network/x_128"]), T(g["network/S128_mixed_t"]).long(), 2)
    np.testing.assert_allclose(mixed.numpy(), g["network/S128_mixed_K2"], atol=2e-5)


@pytest.mark.parametrize("t", [0, 40, 79])
@pytest.mark.parametrize("k", [1, 2])
def test_network_3d(golden3d, ref_net3d, t, k):
    with torch.inference_mode():
        out = ref_net3d(T(golden3d["x0"]), torch.full((1,), t, dtype=torch.int64), k)
    np.testing.assert_allclose(out.numpy(), golden3d[f"network/t{t}_K{k}"], atol=5e-6 * 4)


def test_reference_checkpoint_parameter_count(ref_net2d, ref_net3d):
    assert ref_net2d.n_trainable() == 435435
    assert ref_net3d.n_trainable() == 1305646


@pytest.mark.parametrize("which", ["2d", "3d"])
@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_losses(golden2d, golden3d, which, padding):
    g = golden2d if which == "2d" else golden3d
    psi_t = T(g["loss/psi_t"]) if "loss/psi_t" in g.files else T(g["sampler/S32_t45/psi_t"])
    psi_hat = T(g["loss/psi_hat"])
    S = psi_t.shape[2]
    a = warp(psi_hat, frac_to_px(psi_t, S), "linear", padding)
    np.testing.assert_allclose(a.numpy(), g[f"loss/a_sampled_{padding}"], atol=2e-6)
    out = L.drdm_losses(psi_hat, psi_t, padding)
    for key in ("dist", "ang", "reg_l1", "reg_negdetj_weighted", "reg", "total"):
        np.testing.assert_allclose(float(out[key]), float(g[f"loss/{padding}/{key}"]), rtol=1e-5, atol=1e-12)


def test_loss_regularisers_rough_field(golden2d, golden3d):
    for g in (golden2d, golden3d):
        r = T(g["loss/rough_field"])
        np.testing.assert_allclose(float(L.reg_l1(r)), float(g["loss/rough/reg_l1"]), rtol=1e-5)
        np.testing.assert_allclose(float(L.reg_negdetj(r)), float(g["loss/rough/reg_negdetj_weighted"]), rtol=1e-5)
        np.testing.assert_allclose(L.pseudo_det(r).numpy(), g["loss/rough/pseudo_det_map"], rtol=1e-5, atol=1e-9)
    r = T(golden2d["loss/rough_field"])
    np.testing.assert_allclose(float(L.dist_loss(r[:1], r[1:])), float(golden2d["loss/rough/dist_pred0_lab1"]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(L.ang_loss(r[:1], r[1:])), float(golden2d["loss/rough/ang_pred0_lab1"]), rtol=1e-5)


def test_loss_t0_edge_case(golden2d, golden2d_net):
    psi_hat = T(golden2d_net["network/t0_K2"][0:1])
    out = L.drdm_losses(psi_hat, torch.zeros_like(psi_hat), "zeros")
    for key in ("dist", "ang", "total"):
        np.testing.assert_allclose(float(out[key]), float(golden2d[f"loss/t0case_zeros/{key}"]), rtol=1e-5, atol=1e-12)
    assert float(out["ang"]) == 0.0


def _check_metrics(g, prefix, phi):
    S = phi.shape[-1]
    m = field_metrics(phi * S, side=S)
    np.testing.assert_allclose(m["max_disp_pct"], float(g[prefix + "max_pct"]), rtol=1e-9)
    np.testing.assert_allclose(m["mean_disp_pct"], float(g[prefix + "mean_pct"]), rtol=1e-9)
    np.testing.assert_allclose(m["folding_pct"] / 100, float(g[prefix + "fold_ratio_le0"]), rtol=1e-9)
    det = jacobian_determinant(phi * S)
    assert int((det < 0).sum()) == int(g[prefix + "count_lt0"])
    np.testing.assert_allclose(det, g[prefix + "detJ"][0], rtol=1e-6, atol=1e-6)


def test_metrics_2d():
    from conftest import ref_path
    g = np.load(ref_path("golden_2d_recovery.npz"))
    _check_metrics(g, "metrics/forward_T45/", g["recovery/T45/psi_Tp1"][0].astype(np.float64))
    for mode in ("code80", "paperTp"):
        _check_metrics(g, f"metrics/{mode}/", g[f"recovery/{mode}/phi_final"][0].astype(np.float64))


def test_metrics_3d(golden3d):
    _check_metrics(golden3d, "metrics/forward_psi_Tp1/", golden3d["recovery/psi_Tp1"][0].astype(np.float64))
