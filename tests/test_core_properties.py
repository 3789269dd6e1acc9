"""Properties of the core that hold for any input (no reference data needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_drdm.core.config import DEFAULT_SCHEDULE, DRDMConfig, Schedule, T
from napari_drdm.core.forward import ForwardSampler, schedule_counts
from napari_drdm.core.generators import Returning
from napari_drdm.core.losses import true_negdet
from napari_drdm.core.metrics import field_metrics, folding_pct, jacobian_determinant, strict_folding_pct
from napari_drdm.core.network import DRDMNet
from napari_drdm.core.recovery import recover, reverse_timesteps
from napari_drdm.core.spatial import compose, resize_field, warp, warp_labels
from napari_drdm.core.unet import LEVELS, UNetOps, run_unet
from napari_drdm.errors import InputError


def smooth_field(nd, size, amp, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, nd) + (4,) * nd, generator=g)
    mode = "bilinear" if nd == 2 else "trilinear"
    return F.interpolate(z, size=(size,) * nd, mode=mode, align_corners=True) * amp


def smooth_image(nd, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand((1, 1) + (6,) * nd, generator=g)
    mode = "bilinear" if nd == 2 else "trilinear"
    return F.interpolate(z, size=(size,) * nd, mode=mode, align_corners=True)


@pytest.mark.parametrize("nd", [2, 3])
def test_compose_with_zero_is_identity(nd):
    a = smooth_field(nd, 16, 2.0)
    z = torch.zeros_like(a)
    torch.testing.assert_close(compose(a, z), a)
    torch.testing.assert_close(compose(z, a), a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nd", [2, 3])
def test_warp_by_composition_equals_two_warps(nd):
    size = 32 if nd == 2 else 20
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * nd, indexing="ij")
    img = (0.5 + 0.25 * sum(torch.sin(g / (6.0 + i)) for i, g in enumerate(grids)))[None, None]
    a, b = smooth_field(nd, size, 1.0, 2), smooth_field(nd, size, 1.0, 3)
    once = warp(img, compose(a, b, "border"), "linear", "border")
    twice = warp(warp(img, b, "linear", "border"), a, "linear", "border")
    inner = (slice(None), slice(None)) + (slice(3, -3),) * nd
    assert (once - twice)[inner].abs().max() < 5e-3


def test_warp_identity_and_translation():
    img = smooth_image(2, 20)
    torch.testing.assert_close(warp(img, torch.zeros(1, 2, 20, 20)), img, atol=1e-6, rtol=0)
    shift = torch.zeros(1, 2, 20, 20)
    shift[:, 1] = 1.0  # pull from one column to the right
    out = warp(img, shift, "linear", "border")
    torch.testing.assert_close(out[..., :-1], img[..., 1:], atol=1e-5, rtol=0)


def test_jacobian_of_known_affine():
    n = 21
    A = np.array([[0.2, -0.1], [0.3, 0.05]])  # displacement gradient
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    u = np.stack([A[0, 0] * ii + A[0, 1] * jj, A[1, 0] * ii + A[1, 1] * jj])
    det = jacobian_determinant(u)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(2) + A), rtol=1e-12)
    A3 = np.array([[0.1, 0.2, 0.0], [-0.3, 0.0, 0.1], [0.05, 0.1, -0.2]])
    g = np.meshgrid(*[np.arange(9)] * 3, indexing="ij")
    u3 = np.stack([sum(A3[c, k] * g[k] for k in range(3)) for c in range(3)])
    np.testing.assert_allclose(jacobian_determinant(u3), np.linalg.det(np.eye(3) + A3), rtol=1e-12)
    flip = np.stack([-2 * ii, np.zeros_like(jj)]).astype(float)  # x -> -x: det = -1 everywhere
    assert folding_pct(flip) == 100.0 and strict_folding_pct(flip) == 100.0


def test_displacement_metrics_units():
    u = np.zeros((2, 50, 100))
    u[1] = 10.0  # 10 pixels along columns; side = 100
    m = field_metrics(u)
    assert m["max_disp_pct"] == pytest.approx(10.0) and m["mean_disp_pct"] == pytest.approx(10.0)
    assert field_metrics(u, spacing=(2.0, 1.0))["max_disp_pct"] == pytest.approx(10.0)


def test_schedule_integers():
    nt, nt1 = schedule_counts(torch.arange(80))
    assert nt[0] == 0 and nt1[0] == 1 and nt[32] == 8 and nt[79] == 13 and nt1[79] == 195
    assert torch.all(torch.diff(nt) >= 0) and torch.all(torch.diff(nt1) >= 0)
    ref = [int(np.floor(np.float32(t) ** np.float32(0.6))) for t in range(80)]
    assert nt.tolist() == ref


def test_label_warp_keeps_values():
    lab = torch.zeros(1, 1, 32, 32, dtype=torch.int64)
    lab[..., 5:20, 4:15] = 7
    lab[..., 18:30, 12:28] = 300
    f = smooth_field(2, 32, 3.0)
    for method in ("nearest", "linear_argmax"):
        out = warp_labels(lab, f, method)
        assert out.dtype == lab.dtype
        assert set(torch.unique(out).tolist()) <= {0, 7, 300}
    with pytest.raises(TypeError):
        warp_labels(lab.float(), f)


def test_resize_field_scales_displacements():
    u = torch.ones(1, 2, 10, 20) * torch.tensor([2.0, 3.0]).view(1, 2, 1, 1)
    r = resize_field(u, (20, 10))
    torch.testing.assert_close(r[0, 0], torch.full((20, 10), 4.0))
    torch.testing.assert_close(r[0, 1], torch.full((20, 10), 1.5))


def test_sampler_seeded_and_frames():
    cfg = DRDMConfig.default(2, 32)
    fs = ForwardSampler(cfg)
    a = fs.sample(20, batch=1, generator=torch.Generator().manual_seed(3), return_frames=True)
    b = fs.sample(20, batch=1, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.forward_ddf, b.forward_ddf, rtol=0, atol=0)
    assert len(a.frames) == 20
    torch.testing.assert_close(a.frames[-1], a.forward_ddf, rtol=0, atol=0)
    mags = [float(f.norm(dim=1).max()) for f in a.frames]
    assert mags[-1] > mags[0]


@pytest.mark.parametrize("ndim,size", [(2, 32), (3, 16)])
@pytest.mark.parametrize("fast", [True, False])
def test_sampler_iter_frames_equals_sample(ndim, size, fast):
    """Progressive forward frames (the explorer's first frame comes after one composition) are the
    very numbers of a whole-pass sample, including t' sharing a composition count and T' = 0."""
    fs = ForwardSampler(DRDMConfig.default(ndim, size), fast=fast)
    for tp in (0, 2, 17):
        draws = fs.draw(1, torch.Generator().manual_seed(tp))
        ref = fs.sample(tp, batch=1, draws=draws, return_step=False, return_frames=True)
        it = Returning(fs.iter_frames(tp, draws))
        got = list(it)
        final = it.value
        assert len(got) == len(ref.frames) == tp
        for a, b in zip(got, ref.frames):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(final, ref.forward_ddf, rtol=0, atol=0)


def test_sampler_3d_shapes_and_scale_option():
    cfg = DRDMConfig.default(3, 16)
    out = ForwardSampler(cfg).sample([5, 30], generator=torch.Generator().manual_seed(0))
    assert out.forward_ddf.shape == (2, 3, 16, 16, 16) and out.step_ddf.shape == (2, 3, 16, 16, 16)
    geo = ForwardSampler(cfg.replace(field_scale="geometric")).sample(30, batch=1,
                                                                        generator=torch.Generator().manual_seed(1))
    ref = ForwardSampler(cfg).sample(30, batch=1, generator=torch.Generator().manual_seed(1))
    ratio = geo.forward_ddf.abs().max() / ref.forward_ddf.abs().max()
    assert float(ratio) == pytest.approx(2.0 / (16 / 64), rel=1e-4)


@pytest.mark.parametrize("path", ["plain", "engine"])
def test_network_estimate_is_clamped_to_the_image(path):
    """Each pass clamps its estimate to +-(S-1) pixels, in the plain modules (training) and the
    inference engine (generation); the K=2 recursion composes two clamped passes (eq. 12)."""
    net = DRDMNet(2).eval()
    with torch.no_grad():
        net.conv_out.weight.zero_()
        net.conv_out.bias.copy_(torch.tensor([50.0, -50.0]))      # 50 S pixels: far off the image
    x = torch.rand(2, 1, 16, 16)
    t = torch.tensor([0, 79])
    one_pass, recursion = ((net.engine().single_pass, net.engine()) if path == "engine"
                           else (net.single_pass, net.forward_plain))
    with torch.inference_mode():
        one = one_pass(x, t)
        two = recursion(x, t, 2)
    assert one.shape == two.shape == (2, 2, 16, 16)
    assert torch.all(one[:, 0] == 15 / 16) and torch.all(one[:, 1] == -15 / 16)
    torch.testing.assert_close(two, 2 * one, atol=1e-6, rtol=0)   # a constant field composed with itself


def test_unet_wiring_follows_the_declared_levels():
    """The one wiring every back-end runs: three levels down, a multiplicative bottleneck, three
    levels up with the skip of the same depth concatenated first, then the output convolution."""
    calls = []

    class Recorder(UNetOps):
        def embed(self, x, t):
            return [lv.embed for lv in LEVELS]

        def enter(self, level, x, e):
            calls.append(("enter", level.name, e))
            return "x"

        def down(self, level, h, e):
            calls.append(("down", level.resample, h, e, level.combine))
            return level.resample

        def up_cat(self, level, skip, h, e):
            calls.append(("up_cat", level.resample, skip, h, e))
            return level.resample

        def stage(self, level, h):
            calls.append(("stage", level.name, h, level.norm))
            return level.name

        def head(self, h):
            calls.append(("head", h))
            return "u"

    assert run_unet(Recorder(), torch.zeros(1, 1, 8, 8), 0) == "u"
    assert calls == [
        ("enter", "b1", "te1"), ("stage", "b1", "x", True),
        ("down", "down1", "b1", "te2", "add"), ("stage", "b2", "down1", True),
        ("down", "down2", "b2", "te3", "add"), ("stage", "b3", "down2", True),
        ("down", "down3", "b3", "te_mid", "mul"), ("stage", "b_mid", "down3", True),
        ("up_cat", "up1", "b3", "b_mid", "te4"), ("stage", "b4", "up1", False),
        ("up_cat", "up2", "b2", "b4", "te5"), ("stage", "b5", "up2", False),
        ("up_cat", "up3", "b1", "b5", "te_out"), ("stage", "b_out", "up3", False),
        ("head", "b_out")]


def test_network_from_config():
    cfg = DRDMConfig.default(3, 16, in_channels=2, channels=(4, 8, 8), n_steps=20)
    net = DRDMNet.from_config(cfg).eval()
    assert (net.ndim, net.n_steps, net.in_channels) == (3, 20, 2)
    assert net.b1[0].conv0.in_channels == 2 and net.b4[0].conv0.in_channels == 16 and net.conv_out.out_channels == 3
    assert net.time_embed.weight.shape == (20, cfg.time_dim)
    with torch.no_grad():
        out = net(torch.rand(1, 2, 16, 16, 16), torch.tensor([19]), 1)
    assert out.shape == (1, 3, 16, 16, 16)


def test_schedules_and_their_default():
    assert Schedule.parse("paper") is Schedule.PAPER and Schedule.PAPER == "paper"
    assert f"{Schedule.REFERENCE}" == "reference" == str(Schedule.REFERENCE)
    with pytest.raises(InputError, match="^schedule must be one of paper, reference, got 'papers'$"):
        Schedule.parse("papers")
    assert issubclass(InputError, ValueError)            # callers catching ValueError keep working
    with pytest.raises(ValueError, match="schedule must be one of"):
        DRDMConfig(schedule="fast")
    cfg = DRDMConfig(schedule=Schedule.PAPER)
    assert type(cfg.schedule) is str and '"schedule": "paper"' in cfg.to_json()
    # one default: the configuration's, the loop's and a bare reverse_timesteps agree
    assert DRDMConfig().schedule == DEFAULT_SCHEDULE == "reference"
    assert reverse_timesteps(10) == list(range(T - 1, -1, -1))
    assert reverse_timesteps(10, schedule="paper") == list(range(9, -1, -1))
    assert DRDMConfig().recover_options(k=3) == {"schedule": DEFAULT_SCHEDULE, "k": 3, "n_steps": T,
                                                 "compose_padding": "zeros", "image_interp": "cubic",
                                                 "input_padding": 0, "loop_extra": 0}
    # the composition padding: the model's unless asked (border / zeros)
    assert DRDMConfig.default(3).recover_options()["compose_padding"] == "border"
    assert DRDMConfig().recover_options(compose_padding="border")["compose_padding"] == "border"


def test_recover_options_are_keywords():
    net = DRDMNet(2).eval()
    x = torch.rand(1, 1, 16, 16)
    with pytest.raises(TypeError):
        next(recover(net, x, torch.zeros(1, 2, 16, 16), 1, None, "paper"))
    with torch.inference_mode():
        frames = list(recover(net, x, torch.zeros(1, 2, 16, 16), 2, schedule="paper", k=1))
    assert [f.t for f in frames] == [1, 0]


def test_true_negdet_penalty():
    ok = smooth_field(2, 32, 0.5 / 32)
    assert float(true_negdet(ok)) == 0.0
    ii = torch.arange(32.0).view(1, 32, 1).expand(1, 32, 32)
    fold = torch.zeros(1, 2, 32, 32)
    fold[:, 0] = -2 * ii / 32  # x -> -x along rows: det = -1
    assert float(true_negdet(fold)) == pytest.approx(1.0, rel=1e-5)
