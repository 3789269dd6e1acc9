"""The network's input surrounded by mirrored image (``DRDMConfig.input_padding``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_drdm.core.config import DRDMConfig, check_input_padding
from napari_drdm.core.network import DRDMNet
from napari_drdm.core.recovery import padded_estimate, recover
from napari_drdm.core.spatial import frac_to_px, warp
from napari_drdm.errors import InputError
from napari_drdm.model import load_model


def test_check_input_padding_accepts_multiples_of_4_below_half_the_side():
    assert [check_input_padding(v, 64) for v in (0, 4, 16, 28, 8.0)] == [0, 4, 16, 28, 8]
    for bad in (-4, 6, 32, 40, 2.5, "8", True, None):
        with pytest.raises(ValueError) as e:
            check_input_padding(bad, 64)
        msg = str(e.value)
        assert msg.startswith("input_padding") and "\n" not in msg


def test_config_default_is_the_reference_and_old_files_load_unpadded():
    assert DRDMConfig().input_padding == 0 and DRDMConfig.default(3, 64).input_padding == 0
    old = DRDMConfig(size=64).to_dict()
    del old["input_padding"]                                  # a file written before the setting
    assert DRDMConfig.from_dict(old).input_padding == 0
    assert DRDMConfig.from_dict(dict(old, input_padding=16)).input_padding == 16
    with pytest.raises(ValueError, match="input_padding"):
        DRDMConfig(size=64, input_padding=10)
    cfg = DRDMConfig(size=64, input_padding=8)
    assert cfg.recover_options()["input_padding"] == 8 and cfg.recover_options(input_padding=0)["input_padding"] == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_zero_padding_is_exactly_the_networks_own_recursion(ndim):
    torch.manual_seed(0)
    net = DRDMNet(ndim).eval()
    x = torch.rand((2, 1) + (16,) * ndim)
    t = torch.tensor([5, 60])
    with torch.no_grad():
        for k in (1, 2, 3):
            assert torch.equal(padded_estimate(net.forward_plain, x, t, k, 0), net.forward_plain(x, t, k))


def test_the_network_sees_a_mirrored_frame_and_fractions_convert_with_the_image_side():
    """A spy network: the first pass gets the reflection-padded input; the second the padded input
    warped by the first estimate in pixels of S (not of the padded side); the result is cropped."""
    S, P, c = 16, 4, 0.05
    seen = []

    def spy(x, t, k):
        assert k == 1
        seen.append(x.clone())
        return torch.full((x.shape[0], 2) + tuple(x.shape[2:]), c)

    x = torch.rand(1, 1, S, S)
    out = padded_estimate(spy, x, torch.tensor([3]), 2, P)
    xp = F.pad(x, [P] * 4, mode="reflect")
    assert torch.equal(seen[0], xp)
    shift = frac_to_px(torch.full((1, 2, S + 2 * P, S + 2 * P), c), S)       # c * S pixels
    assert torch.allclose(seen[1], warp(xp, shift, "linear", "zeros"))
    assert out.shape == (1, 2, S, S) and torch.allclose(out, torch.full_like(out, 2 * c))


def test_recover_feeds_the_padded_estimate_each_step():
    torch.manual_seed(1)
    net = DRDMNet(2).eval()
    x = torch.rand(1, 1, 32, 32)
    psi = torch.zeros(1, 2, 32, 32)
    with torch.no_grad():
        plain = [f.step_ddf for f in recover(net.forward_plain, x, psi, 3, n_steps=4, k=2, input_padding=0)]
        padded = [f.step_ddf for f in recover(net.forward_plain, x, psi, 3, n_steps=4, k=2, input_padding=8)]
        first = frac_to_px(padded_estimate(net.forward_plain, x, torch.tensor([3]), 2, 8), 32)
    assert len(plain) == len(padded) == 4
    assert torch.allclose(padded[0], first)
    assert not torch.allclose(plain[0], padded[0])            # the mirrored frame changes what it sees


def test_generation_takes_the_models_padding_or_an_override(tiny_checkpoint):
    path = tiny_checkpoint(2, 32, input_padding=8)
    model = load_model(path)
    assert model.config.input_padding == 8
    x = model.prepare(np.random.default_rng(0).random((32, 32)).astype(np.float32))[1]
    own, _ = model.generate_model_grid(x, 3, [0])
    same, _ = model.generate_model_grid(x, 3, [0], input_padding=8)
    none, _ = model.generate_model_grid(x, 3, [0], input_padding=0)
    assert torch.allclose(own, same) and not torch.allclose(own, none)
    with pytest.raises(InputError) as e:
        model.generate_model_grid(x, 3, [0], input_padding=6)
    assert str(e.value).startswith("input_padding")
