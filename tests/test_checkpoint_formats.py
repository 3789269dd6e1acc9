"""Weights files other than the project's own .safetensors: PyTorch ``.pth`` files holding a bare
state_dict or ``{"state_dict": ..., "config": ..., "provenance": ...}``, loaded with
``weights_only=True`` (a weights file cannot run code)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_drdm.checkpoint import CheckpointError, read_checkpoint
from napari_drdm.cli import main
from napari_drdm.model import load_model


@pytest.fixture
def source(tiny_checkpoint):
    # a config unlike the defaults a bare state_dict gets (S=256, 'reference' field scale)
    return tiny_checkpoint(2, 32, seed=3, field_scale="geometric", sigma=8e-5)


def test_pth_with_state_dict_and_config_is_the_same_model(tmp_path, source, capsys):
    state, cfg, _ = read_checkpoint(source)
    pth = tmp_path / "mine.pth"
    torch.save({"state_dict": state, "config": cfg.to_dict(), "provenance": {"trained_on": "blobs"}}, pth)
    s2, c2, p2 = read_checkpoint(pth)
    assert c2.to_dict() == cfg.to_dict() and (c2.size, c2.field_scale) == (32, "geometric")
    assert p2 == {"trained_on": "blobs"}
    assert s2.keys() == state.keys() and all(torch.equal(s2[k], state[k]) for k in state)
    img = np.random.default_rng(0).random((24, 20)).astype(np.float32)
    a = load_model(source, device="cpu").generate(img, t_prime=2, seed=5, schedule="paper")
    m = load_model(str(pth), device="cpu")
    assert m.name == "mine" and m.size == 32
    b = m.generate(img, t_prime=2, seed=5, schedule="paper")
    np.testing.assert_array_equal(a.ddf, b.ddf)
    np.save(tmp_path / "img.npy", img)
    assert main(["generate", str(tmp_path / "img.npy"), "--weights", str(pth), "--t-prime", "1",
                 "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "img_ddf.nii.gz").exists()


def test_pth_bare_state_dict_gets_the_reference_config(tmp_path, source):
    state, _, _ = read_checkpoint(source)
    torch.save(state, tmp_path / "bare.pth")
    torch.save({"state_dict": state}, tmp_path / "wrapped.pth")
    for name in ("bare.pth", "wrapped.pth"):
        _, cfg, _ = read_checkpoint(tmp_path / name)
        assert (cfg.ndim, cfg.size, cfg.field_scale) == (2, 256, "reference"), name
        assert read_checkpoint(tmp_path / name, size=32)[1].size == 32, name


def test_pth_with_a_bad_config_is_one_error_naming_the_file(tmp_path, source, capsys):
    state, _, _ = read_checkpoint(source)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": state, "config": {"ndim": 5}}, bad)
    with pytest.raises(CheckpointError, match=r"bad\.pth.*ndim"):
        read_checkpoint(bad)
    np.save(tmp_path / "img.npy", np.zeros((8, 8), np.float32))
    assert main(["generate", str(tmp_path / "img.npy"), "--weights", str(bad), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pth" in err[0] and "Traceback" not in err[0]


def test_pth_that_needs_code_or_holds_no_tensors_is_refused(tmp_path):
    torch.save({"state_dict": torch.nn.Linear(2, 2)}, tmp_path / "code.pth")         # a pickled module
    with pytest.raises(CheckpointError, match=r"code\.pth.*weights_only=True"):
        read_checkpoint(tmp_path / "code.pth")
    torch.save({"state_dict": {"conv_in.weight": 1.0}, "config": {"ndim": 2}}, tmp_path / "numbers.pth")
    with pytest.raises(CheckpointError, match=r"numbers\.pth does not hold a DRDM state_dict"):
        read_checkpoint(tmp_path / "numbers.pth")
