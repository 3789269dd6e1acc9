"""``loop_extra``: a model's paper loop started some steps above T' (between the paper's T' steps
and the reference's all T; docs/weights.md, session 24).  The times visited, the configuration's
check, generation and its record, ``set-inference`` and ``drdm weights``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_drdm.core.config import DRDMConfig, T, check_loop_extra
from napari_drdm.core.recovery import reverse_timesteps
from napari_drdm.errors import InputError


def test_the_paper_loop_starts_loop_extra_steps_higher():
    assert reverse_timesteps(45, schedule="paper", loop_extra=12) == list(range(56, -1, -1))
    assert reverse_timesteps(45, schedule="paper", loop_extra=0) == reverse_timesteps(45, schedule="paper")
    assert reverse_timesteps(70, schedule="paper", loop_extra=30) == list(range(T - 1, -1, -1))   # at most T
    assert reverse_timesteps(0, schedule="paper", loop_extra=12) == []                            # nothing to undo
    assert reverse_timesteps(45, schedule="reference", loop_extra=12) == list(range(T - 1, -1, -1))


@pytest.mark.parametrize("bad", [-1, T + 1, 2.5, True, "12"])
def test_loop_extra_is_checked_in_one_line(bad):
    with pytest.raises(InputError, match=r"^loop_extra must be a whole number of steps from 0 to T = 80, got "):
        DRDMConfig(loop_extra=bad)
    with pytest.raises(InputError):
        check_loop_extra(bad)


def test_config_carries_it_to_the_loop_and_round_trips():
    cfg = DRDMConfig(schedule="paper", loop_extra=12.0)
    assert cfg.loop_extra == 12 and type(cfg.loop_extra) is int
    assert cfg.recover_options()["loop_extra"] == 12
    assert (cfg.loop_extra_for(), cfg.loop_extra_for("paper"), cfg.loop_extra_for("reference")) == (12, 12, 0)
    assert DRDMConfig(loop_extra=5).loop_extra_for() == 0         # the model's own loop is the reference one
    assert DRDMConfig.from_dict(json.loads(cfg.to_json())).loop_extra == 12
    assert DRDMConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "loop_extra"}).loop_extra == 0


def test_generation_runs_and_records_the_longer_loop(tmp_path, tiny_checkpoint, capsys):
    """A file whose paper loop starts 3 steps above T' (written by set-inference): T' + 3 recovery
    frames, a different field from the plain paper loop, the setting in the result, the sidecar and
    ``drdm weights``; the reference loop is untouched by it."""
    from napari_drdm.cli import main
    from napari_drdm.model import load_model
    from training.__main__ import main as training_main
    plain = tiny_checkpoint(2, 32, name="plain_loop")
    longer = tmp_path / "longer.safetensors"
    assert training_main(["set-inference", "--weights", plain, "--out", str(longer), "--schedule", "paper",
                          "--loop-extra", "3", "--measured", "a test"]) == 0
    assert "schedule reference -> paper, loop_extra 0 -> 3" in capsys.readouterr().out
    img = np.zeros((32, 32), np.float32)
    img[8:24, 6:26] = 1.0
    a, b = load_model(plain), load_model(str(longer))
    assert b.config.loop_extra == 3 and b.config.schedule == "paper"
    ra = a.generate(img, t_prime=2, seed=1, schedule="paper")
    rb = b.generate(img, t_prime=2, seed=1)
    recovery = [f for f in b.iter_generate(img, t_prime=2, seed=1) if f.phase == "recovery"]
    assert len(recovery) == 5 and [f.t for f in recovery] == [4, 3, 2, 1, 0]
    assert rb.loop_extra == 3 and ra.loop_extra == 0
    assert not np.allclose(ra.ddf, rb.ddf)
    rr = b.generate(img, t_prime=2, seed=1, schedule="reference")
    assert rr.loop_extra == 0
    np.testing.assert_allclose(rr.ddf, a.generate(img, t_prime=2, seed=1, schedule="reference").ddf)
    np.save(tmp_path / "im.npy", img)
    assert main(["generate", str(tmp_path / "im.npy"), "--weights", str(longer), "--t-prime", "2", "--seed", "1",
                 "--no-fold-guard", "--out", str(tmp_path / "out")]) == 0
    side = json.loads((tmp_path / "out" / "im.json").read_text())
    assert side["schedule"] == "paper" and side["loop_extra"] == 3
    assert "schedule=paper (from T'+3)" in capsys.readouterr().out
    np.savez(tmp_path / "s.npz", images=img[None])
    for extra, want in (([], 3), (["--schedule", "reference"], 0)):
        assert main(["evaluate", "--weights", str(longer), "--images", str(tmp_path / "s.npz"), "--t-prime", "2",
                     "--samples", "1", "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["loop_extra"] == want
    assert main(["weights"]) == 0
    capsys.readouterr()
    from conftest import labelled_cases

    from napari_drdm.export import load_manifest

    def blob(shape, k):
        im = np.zeros(shape, np.float32)
        im[8:22, 7:25] = 50.0 + k
        return im, (im > 0).astype(np.uint8)
    src = labelled_cases(tmp_path, blob)
    assert main(["augment", str(src), str(tmp_path / "aug"), "-n", "1", "--t-prime", "2", "--weights", str(longer),
                 "--no-progress"]) == 0
    assert {(r["schedule"], r["loop_extra"]) for r in load_manifest(tmp_path / "aug")["rows"]} == {("paper", 3)}
    assert training_main(["set-inference", "--weights", plain, "--out", str(tmp_path / "x.safetensors"),
                          "--loop-extra", "-2", "--measured", "a test"]) == 2
    assert "--loop-extra: loop_extra must be a whole number of steps from 0 to T = 80, got -2" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
