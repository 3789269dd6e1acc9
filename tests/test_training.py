"""Training pipeline (training/): data, augmentation, loop, exact resume, DDP, export. CPU, 1 thread."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_drdm.checkpoint import read_checkpoint
from napari_drdm.core.forward import ForwardSampler
from napari_drdm.core.losses import true_negdet
from napari_drdm.core.network import DRDMNet
from training.classic_augment import augment
from training.data import SliceBank, file_sha256, load_prepared, prepare, preprocess_volume
from training.export import export_run
from training.settings import load_config, model_config
from training.train import latest_checkpoint, load_training_checkpoint, spawn_local, train

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ROOT / "training" / "configs"


def tiny(**sets):
    return load_config(CONFIGS / "tiny.yaml", [f"{k}={v}" for k, v in sets.items()])


def _log(run):
    return [json.loads(line) for line in (Path(run) / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The tiny config trained 4 steps without interruption."""
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(**{"validation.at_end": "false"}), run, argv=["test", "straight"], echo=lambda *a: None)
    return run


def test_tiny_trains_with_finite_losses(straight_run):
    steps = [r for r in _log(straight_run) if "total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        for k in ("total", "dist", "ang", "reg", "reg_l1", "true_negdet", "lr", "it_s"):
            assert np.isfinite(r[k]), (k, r)
    assert (_log(straight_run)[-1]["event"], _log(straight_run)[-1]["reason"]) == ("stop", "steps")


def test_input_padding_is_what_the_network_reads_in_training(straight_run, tmp_path, monkeypatch):
    """``model.input_padding``: the training step reads I_t through the reverse loop's mirrored
    frame (``padded_estimate``), so the first step's loss differs from the plain run's (same data,
    same draws); the run's export records the padding, which generation then uses."""
    import training.train as tt
    seen = []
    real = tt.padded_estimate

    def spy(net, x, t, k, padding):
        seen.append((tuple(x.shape), padding))
        return real(net, x, t, k, padding)
    monkeypatch.setattr(tt, "padded_estimate", spy)
    run = tmp_path / "run"
    train(tiny(**{"model.input_padding": 4, "train.steps": 2, "validation.at_end": "false"}), run,
          argv=["test"], echo=lambda *a: None)
    assert seen and all(p == 4 and s[2:] == (32, 32) for s, p in seen)
    first = [r for r in _log(run) if "total" in r][0]
    plain = [r for r in _log(straight_run) if "total" in r][0]
    assert np.isfinite(first["total"]) and first["total"] != plain["total"]
    out, _ = export_run(run, tmp_path / "padded.safetensors")
    assert read_checkpoint(out)[1].input_padding == 4


def test_overfit_batch_learns(tmp_path):
    """The gradients reach the network: on one fixed batch (``train.overfit_batch``, small head
    at initialisation) the cosine loss falls well below 0 within 60 steps."""
    cfg = tiny(**{"train.overfit_batch": "true", "train.steps": 60, "train.log_every": 20,
                  "train.checkpoint_every": 0, "optim.lr": 1e-3, "optim.head_init_scale": 1e-3,
                  "validation.at_end": "false"})
    train(cfg, tmp_path / "run", argv=["test"], echo=lambda *a: None)
    angs = [r["ang"] for r in _log(tmp_path / "run") if "ang" in r]
    assert len(angs) == 3
    assert angs[-1] < -0.15 and angs[-1] < angs[0] - 0.1, angs


def test_channels_last_layout_trains_the_same_numbers(straight_run, tmp_path):
    """``train.channels_last`` (on by default on the CPU) changes the memory layout only: the
    same 4 steps in the default NCHW layout give the same losses up to float rounding."""
    from training.distributed import Env
    assert Env(tiny()["train"]).channels_last is True          # "auto" on the CPU
    run = tmp_path / "nchw"
    train(tiny(**{"validation.at_end": "false", "train.channels_last": "false"}), run, argv=["test"],
          echo=lambda *a: None)
    a = [r for r in _log(straight_run) if "total" in r]
    b = [r for r in _log(run) if "total" in r]
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for k in ("total", "dist", "ang", "reg"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-6), (k, ra[k], rb[k])
    with pytest.raises(ValueError, match="train.channels_last"):
        Env(tiny(**{"train.channels_last": "sometimes"})["train"])


def test_resume_is_bit_identical(straight_run, tmp_path):
    run = tmp_path / "split"
    # first half, with a validation at its end: it must not disturb any random stream
    train(tiny(**{"train.steps": 2}), run, echo=lambda *a: None)
    with pytest.raises(FileExistsError):
        train(tiny(), run, echo=lambda *a: None)
    train(tiny(**{"validation.at_end": "false"}), run, resume=True, echo=lambda *a: None)
    a = load_training_checkpoint(latest_checkpoint(straight_run))
    b = load_training_checkpoint(latest_checkpoint(run))
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert a["bank"] == b["bank"]
    assert all(torch.equal(a["rng"][0][k], b["rng"][0][k]) for k in ("field", "aug", "torch"))
    assert [h["start_step"] for h in b["history"]] == [0, 2]
    assert any(r.get("event") == "validation" and r["step"] == 2 for r in _log(run))


def test_resume_applies_the_configured_learning_rate(tmp_path):
    run = tmp_path / "lr"
    train(tiny(**{"train.steps": 2, "validation.at_end": "false"}), run, echo=lambda *a: None)
    lr0 = float(tiny()["optim"]["lr"])
    said = []
    train(tiny(**{"validation.at_end": "false", "optim.lr": lr0 / 4}), run, resume=True,
          echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    lrs = [r["lr"] for r in _log(run) if "lr" in r]
    assert lrs[0] == pytest.approx(lr0) and lrs[-1] == pytest.approx(lr0 / 4), lrs
    assert any("learning rate" in m for m in said), said
    ck = load_training_checkpoint(latest_checkpoint(run))
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr0 / 4)


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path):
    """A CUDA generator's state (16 bytes) cannot seed a CPU generator: the streams are reseeded,
    said in one line, and the run goes on; a CPU checkpoint records its device type."""
    run = tmp_path / "moved"
    train(tiny(**{"train.steps": 2, "validation.at_end": "false"}), run, echo=lambda *a: None)
    path = latest_checkpoint(run)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["device_type"] == "cpu"
    # what a CUDA run saves (written before device_type was recorded): CUDA stream states
    del ck["device_type"]
    for st in ck["rng"]:
        st.update(field=torch.zeros(16, dtype=torch.uint8), aug=torch.zeros(16, dtype=torch.uint8),
                  t=torch.get_rng_state(), cuda=torch.zeros(16, dtype=torch.uint8))
    torch.save(ck, path)
    said = []
    train(tiny(**{"train.steps": 4, "validation.at_end": "false"}), run, resume=True,
          echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert [m for m in said if m.startswith("note: checkpoint written with another layout")] == [
        "note: checkpoint written with another layout (device cuda -> cpu): random streams reseeded"]
    assert load_training_checkpoint(latest_checkpoint(run))["step"] == 4


def test_resume_compares_the_images_not_the_prepared_files_metadata(tmp_path):
    """A prepared file rebuilt elsewhere from the same images (another kit manifest: other
    metadata) resumes with a note; other images resume with a warning."""
    from training.data import _write, images_sha256
    prep = tmp_path / "prep.npz"
    cfg = tiny(**{"data.prepared": str(prep), "data.n_synthetic": 8, "train.steps": 2, "validation.at_end": "false"})
    run = tmp_path / "run"
    train(cfg, run, echo=lambda *a: None)
    data = load_prepared(str(prep))
    assert data["images_sha256"] == images_sha256(data)
    assert load_training_checkpoint(latest_checkpoint(run))["data"]["images_sha256"] == data["images_sha256"]

    def rewrite(meta_note, train_images):
        with np.load(prep, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
        arrays["train_images"] = train_images
        _write(prep, dict(data["meta"], note=meta_note), arrays)

    def resume(steps):
        said = []
        train(dict(cfg, train=dict(cfg["train"], steps=steps)), run, resume=True,
              echo=lambda *a, **k: said.append(" ".join(map(str, a))))
        return [m for m in said if m.startswith(("note: the prepared", "WARNING"))]
    rewrite("rebuilt elsewhere", data["train"])
    assert load_prepared(str(prep))["sha256"] != data["sha256"]
    assert resume(3) == ["note: the prepared file differs from the checkpoint's in its metadata only (same images)"]
    rewrite("other images", 255 - data["train"])
    assert resume(4) == ["WARNING: the training images differ from the checkpoint's (images sha256 mismatch)"]


def test_sigterm_saves_and_resume_stays_bit_identical(straight_run, tmp_path):
    """SIGTERM mid-run: the step in flight is abandoned (or finished), the state saved; resuming
    reaches exactly the uninterrupted run's parameters."""
    import signal
    import subprocess
    import time
    run = tmp_path / "sig"
    cmd = [sys.executable, "-m", "training", "train", "--config", str(CONFIGS / "tiny.yaml"), "--run", str(run),
           "--set", "validation.at_end=false", "--set", "train.steps=400", "--set", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = run / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and '"step": 1' in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    stop = _log(run)[-1]
    assert stop["event"] == "stop" and stop["reason"] == "signal" and 1 <= stop["step"] < 400
    assert load_training_checkpoint(latest_checkpoint(run))["step"] == stop["step"]
    # resume for at least one more step; the reference is the uninterrupted run of as many steps
    # (the 4-step one when the stop came early, else one trained here; the learning rate does not
    # depend on the planned length)
    n = max(4, stop["step"] + 1)
    cfg = tiny(**{"validation.at_end": "false", "train.steps": n})
    train(cfg, run, resume=True, echo=lambda *a: None)
    ref = straight_run
    if n > 4:
        ref = tmp_path / "straight"
        train(cfg, ref, echo=lambda *a: None)
    a = load_training_checkpoint(latest_checkpoint(ref))
    b = load_training_checkpoint(latest_checkpoint(run))
    assert a["step"] == b["step"] == n
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)


def test_sigterm_during_a_validation_abandons_it_and_saves(tmp_path, monkeypatch):
    """A validation takes minutes on a CPU: a SIGTERM that arrives during one abandons it within a
    reverse-loop step (a "validation_cancelled" event, no figures logged), and the state is saved
    as usual."""
    import os
    import signal

    from training.evaluate_hook import Validator
    original, calls = Validator.run, []

    def run_then_signal(self, net, should_stop=None):
        calls.append(should_stop)
        os.kill(os.getpid(), signal.SIGTERM)      # the run's handler only records it
        return original(self, net, should_stop=should_stop)
    monkeypatch.setattr(Validator, "run", run_then_signal)
    cfg = tiny(**{"validation.at_start": "true", "train.steps": 3})
    out = train(cfg, tmp_path / "run", echo=lambda *a: None)
    assert out["step"] == 0 and out["reason"] == "signal" and len(calls) == 1 and calls[0] is not None
    events = [e.get("event") for e in _log(tmp_path / "run")]
    assert "validation_cancelled" in events and "validation" not in events and events[-1] == "stop"
    assert load_training_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 0


def test_two_process_teacher_pull_stays_in_sync(tmp_path):
    """The teacher pull under DDP: the two batches go through one forward pass, so the ranks train
    and stay identical."""
    run = tmp_path / "ddp_teacher"
    spawn_local(2, tiny(**{"init": "cmr2d", "train.steps": 2, "validation.at_end": "false",
                           "loss.w_teacher": 1.0}), run)
    stop = _log(run)[-1]
    assert stop["event"] == "stop" and stop["step"] == 2 and stop["ranks_in_sync"]
    assert all(r["teacher"] > 0 for r in _log(run) if "total" in r and r["step"] > 1)


def test_budget_stops_cleanly_and_saves(tmp_path):
    res = train(tiny(**{"budget.max_minutes": 0, "validation.at_end": "false"}), tmp_path / "b", echo=lambda *a: None)
    assert res["reason"] == "budget" and res["step"] == 1
    assert load_training_checkpoint(latest_checkpoint(tmp_path / "b"))["step"] == 1


class _Clock:
    """A wall clock for training.train in which only validations take time (40 s each)."""

    def __init__(self, real):
        self.now, self.real = 1.0e9, real
        self.perf_counter, self.strftime = real.perf_counter, real.strftime

    def time(self):
        return self.now


@pytest.mark.parametrize("at_end", [True, False])
def test_budget_keeps_time_for_the_validation_at_the_end(tmp_path, monkeypatch, at_end):
    """With ``at_end`` the budget holds back the last validation's duration, stops early enough
    and validates the weights it stops with; without it, the same budget trains to the end."""
    import training.train as tt
    clock = _Clock(tt.time)
    real_validate = tt._validate

    def slow_validate(*a, **k):
        clock.now += 40.0
        return real_validate(*a, **k)

    monkeypatch.setattr(tt, "time", clock)
    monkeypatch.setattr(tt, "_validate", slow_validate)
    run = tmp_path / f"b{at_end}"
    res = train(tiny(**{"budget.max_minutes": 1, "validation.at_start": "true", "validation.every": 0,
                        "validation.at_end": str(at_end).lower()}), run, echo=lambda *a: None)
    vals = sorted({r["step"] for r in _log(run) if r.get("event") == "validation"})
    if at_end:      # 40 s at the start + 40 s held back > 60 s after step 1: stop, then validate step 1
        assert (res["reason"], res["step"], vals) == ("budget", 1, [0, 1])
    else:           # 40 s < 60 s: never over the budget
        assert (res["reason"], res["step"], vals) == ("steps", 4, [0])


def test_validation_at_the_end_once_at_the_last_step(tmp_path):
    """``at_end`` validates the weights at the last step once; resuming a run that has reached its
    steps trains nothing and validates nothing again."""
    run = tmp_path / "end"
    cfg = {"train.steps": 2, "validation.at_start": "false", "validation.every": 0, "validation.at_end": "true"}
    assert train(tiny(**cfg), run, echo=lambda *a: None)["step"] == 2
    train(tiny(**cfg), run, resume=True, echo=lambda *a: None)
    assert [r["step"] for r in _log(run) if r.get("event") == "validation"] == [2]


def test_two_process_gloo_ranks_stay_in_sync(tmp_path):
    run = tmp_path / "ddp"
    spawn_local(2, tiny(**{"train.steps": 2, "validation.at_end": "false"}), run)
    stop = _log(run)[-1]
    assert stop["event"] == "stop" and stop["world_size"] == 2 and stop["step"] == 2
    assert stop["ranks_in_sync"] and len(set(stop["param_sha256"])) == 1
    ck = load_training_checkpoint(latest_checkpoint(run))
    assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["field"], ck["rng"][1]["field"])


def test_export_loads_strictly(straight_run, tmp_path):
    out, sha = export_run(straight_run, tmp_path / "tiny.safetensors")
    assert sha == file_sha256(out)
    state, cfg, prov = read_checkpoint(out)
    net = DRDMNet.from_config(cfg)
    net.load_state_dict(state, strict=True)
    assert (cfg.ndim, cfg.size, cfg.field_scale) == (2, 32, "reference")
    assert prov["steps"] == 4 and prov["commands"] == ["test straight"]
    assert len(prov["data"]["prepared_sha256"]) == 64 and prov["training_config"]["name"] == "tiny"


def test_augment_shapes_ranges_and_seeding():
    g = torch.Generator().manual_seed(0)
    x2 = torch.rand(6, 1, 32, 32)
    y2 = augment(x2, None, torch.Generator().manual_seed(3))
    assert y2.shape == x2.shape and torch.isfinite(y2).all()
    assert y2.min() >= -1.0 and y2.max() <= 2.0
    assert torch.equal(y2, augment(x2, None, torch.Generator().manual_seed(3)))
    assert not torch.equal(y2, augment(x2, None, torch.Generator().manual_seed(4)))
    geo_only = augment(x2, {"p_intensity": 0.0, "p_autocontrast": 0.0}, g)
    assert geo_only.min() >= 0.0 and geo_only.max() <= 1.0 + 1e-6
    ident = {"p_affine": 0.0, "p_flip": 0.0, "p_autocontrast": 0.0, "p_intensity": 0.0}
    assert torch.allclose(augment(x2, ident, g), x2, atol=1e-5)
    x3 = torch.rand(2, 1, 16, 16, 16)
    y3 = augment(x3, {"p_rotate3d": 1.0, "p_crop3d": 1.0}, g)
    assert y3.shape == x3.shape and torch.isfinite(y3).all() and y3.max() <= 2.0
    assert torch.allclose(augment(x3, dict(ident, p_rotate3d=0.0, p_crop3d=0.0), g), x3, atol=1e-5)


def _refused_in_one_line(settings):
    """Each (key, value) setting makes the configuration check raise one line naming the key."""
    for key, bad in settings:
        with pytest.raises(ValueError) as e:
            tiny(**{key: bad})
        assert key in str(e.value) and "\n" not in str(e.value)


def test_zoom_out_shrinks_the_content_into_a_dark_frame_and_is_off_by_default():
    """augment.p_zoom_out: the content shrinks by U(zoom_out_min, 1) into a zero frame, in 2D and
    3D; at 0 (the default) it draws nothing, so earlier configurations keep their streams; a bad
    value is one line naming the key."""
    ident = {"p_affine": 0.0, "p_flip": 0.0, "p_autocontrast": 0.0, "p_intensity": 0.0,
             "p_rotate3d": 0.0, "p_crop3d": 0.0}
    x2 = torch.rand(5, 1, 32, 32)
    for cfg in (None, {"p_zoom_out": 0.0}):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = augment(x2, cfg, g1)
        b = augment(x2, None, g2)
        assert torch.equal(a, b) and torch.equal(g1.get_state(), g2.get_state())
    ones2, ones3 = torch.ones(16, 1, 64, 64), torch.ones(4, 1, 24, 24, 24)
    for ones in (ones2, ones3):
        nd = ones.dim() - 2
        y = augment(ones, dict(ident, p_zoom_out=1.0, zoom_out_min=0.5), torch.Generator().manual_seed(1))
        kept = (y > 0.5).flatten(1).float().mean(1)          # share of the frame the content fills
        assert (kept < 0.999).all() and (kept > 0.5 ** nd - 0.05).all(), kept
        centre = (slice(None), 0) + (ones.shape[-1] // 2,) * nd
        assert torch.allclose(y[centre], torch.ones(ones.shape[0]), atol=1e-5)
        corner = (slice(None), 0) + (0,) * nd
        assert (y[corner] < 0.5).all()                       # the frame is dark
    none = augment(ones2, dict(ident, p_zoom_out=1.0, zoom_out_min=1.0), torch.Generator().manual_seed(1))
    assert torch.allclose(none, ones2, atol=1e-5)
    _refused_in_one_line((("augment.p_zoom_out", "1.5"), ("augment.zoom_out_min", "0"), ("augment.p_zoom_out", "yes")))


def test_zoom_in_makes_the_content_overflow_the_grid_and_is_off_by_default():
    """augment.p_zoom_in: the content grows by U(1, zoom_in_max) about the centre, so a disc that
    fills part of the grid fills more of it (2D and 3D); at 0 (the default) it draws nothing; a bad
    value is one line naming the key.  The factor is drawn per image: some grow little."""
    ident = {"p_affine": 0.0, "p_flip": 0.0, "p_autocontrast": 0.0, "p_intensity": 0.0,
             "p_rotate3d": 0.0, "p_crop3d": 0.0}
    x2 = torch.rand(5, 1, 32, 32)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(augment(x2, {"p_zoom_in": 0.0}, g1), augment(x2, None, g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    for nd, side in ((2, 64), (3, 24)):
        axes = torch.meshgrid(*[torch.linspace(-1, 1, side)] * nd, indexing="ij")
        ball = (sum(a ** 2 for a in axes) < 0.5 ** 2).float()[None, None].repeat(6, 1, *[1] * nd)
        y = augment(ball, dict(ident, p_zoom_in=1.0, zoom_in_max=2.0), torch.Generator().manual_seed(3))
        before = ball.flatten(1).mean(1)
        after = (y > 0.5).flatten(1).float().mean(1)
        assert (after > before - 0.005).all() and (after > before + 0.05).sum() >= 2, (before, after)
        assert (after < before * 2.0 ** nd + 0.05).all(), (before, after)
        same = augment(ball, dict(ident, p_zoom_in=1.0, zoom_in_max=1.0), torch.Generator().manual_seed(3))
        assert torch.allclose(same, ball, atol=1e-5)
    _refused_in_one_line((("augment.p_zoom_in", "2"), ("augment.zoom_in_max", "0.5"), ("augment.zoom_in_max", "yes")))


_AUG_IDENT = {"p_affine": 0.0, "p_flip": 0.0, "p_autocontrast": 0.0, "p_intensity": 0.0,
              "p_rotate3d": 0.0, "p_crop3d": 0.0}          # every default augmentation off


def _assert_off_draws_nothing(key):
    """At 0 (its default) augmentation ``key`` changes nothing and draws nothing from the generator."""
    x2 = torch.rand(5, 1, 32, 32)
    for cfg in (None, {key: 0.0}):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(augment(x2, cfg, g1), augment(x2, None, g2))
        assert torch.equal(g1.get_state(), g2.get_state())


def test_anatomy_fit_shows_the_view_generation_shows_and_draws_nothing():
    """augment.anatomy_fit: each image resampled into the view the engine fits to its anatomy for
    the inference option of that name (a small disc in a dark grid comes out enlarged, an image
    that fills the grid unchanged); it draws no random numbers, so the other augmentations and the
    stream are the run without it; a bad value is one line naming the key."""
    from napari_drdm.core.view import anatomy_views, to_view
    ident = {"p_affine": 0.0, "p_flip": 0.0, "p_autocontrast": 0.0, "p_intensity": 0.0}
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 12) ** 2 + (xx - 18) ** 2) <= 25).float()[None, None] * 0.8
    full = torch.rand(1, 1, 32, 32) * 0.5 + 0.4
    x = torch.cat([disc, full])
    y = augment(x, dict(ident, anatomy_fit=4), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, to_view(x, anatomy_views(x, 4)))
    assert torch.equal(y[1], full[0]) and (y[0] > 0.05).sum() > 2 * (disc > 0.05).sum()
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a, b = augment(x, {"anatomy_fit": 4}, g1), augment(x, None, g2)
    assert torch.equal(g1.get_state(), g2.get_state()) and not torch.equal(a, b)
    assert torch.equal(a[1], b[1])          # the grid-filling image: the same draws, the same result
    _refused_in_one_line((("augment.anatomy_fit", "-2"), ("augment.anatomy_fit", "1.5")))


def test_anatomy_fit_on_a_share_of_the_images():
    """augment.p_anatomy_fit: only the drawn images are refitted, the others keep the whole grid; at
    0 every image is the run without the fit; a probability outside [0, 1] is one line naming it."""
    from napari_drdm.core.view import anatomy_views, to_view
    ident = {"p_affine": 0.0, "p_flip": 0.0, "p_autocontrast": 0.0, "p_intensity": 0.0}
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 12) ** 2 + (xx - 18) ** 2) <= 25).float()[None, None] * 0.8
    x = disc.repeat(16, 1, 1, 1)
    fitted = to_view(disc, anatomy_views(disc, 4))
    y = augment(x, dict(ident, anatomy_fit=4, p_anatomy_fit=0.5), torch.Generator().manual_seed(3))
    is_fit = [bool(torch.allclose(y[i], fitted[0])) for i in range(16)]
    is_grid = [bool(torch.equal(y[i], disc[0])) for i in range(16)]
    assert all(a != b for a, b in zip(is_fit, is_grid)) and 2 <= sum(is_fit) <= 14
    z = augment(x, dict(ident, anatomy_fit=4, p_anatomy_fit=0.0), torch.Generator().manual_seed(3))
    assert torch.equal(z, x)
    _refused_in_one_line((("augment.p_anatomy_fit", "1.5"),))


def test_coarse_resolution_blurs_each_axis_by_its_own_factor_and_is_off_by_default():
    """augment.p_coarse: an image is averaged down per axis by U(1, coarse_max) and interpolated
    back, so fine detail goes and smooth content stays; at 0 (the default) nothing is drawn; a bad
    value is one line naming the key."""
    from training.classic_augment import coarsen
    ident = _AUG_IDENT
    _assert_off_draws_nothing("p_coarse")
    # stripes along axis 0 only: coarsening that axis wipes them out, the other axis keeps them
    stripes = (torch.arange(64) % 2).float().view(1, 1, 64, 1).expand(8, 1, 64, 64).contiguous()
    y = augment(stripes, dict(ident, p_coarse=1.0, coarse_max=4.0), torch.Generator().manual_seed(2))
    assert y.shape == stripes.shape and torch.isfinite(y).all()
    contrast = (y[:, 0, 1:, :] - y[:, 0, :-1, :]).abs().mean((1, 2))
    assert (contrast < 0.9).all() and (contrast > 0.0).any()      # 1.0 for the untouched stripes
    assert torch.allclose(y.mean((1, 2, 3)), stripes.mean((1, 2, 3)), atol=0.05)
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32, 1, 1).expand(2, 1, 32, 16, 16).contiguous()
    y3 = coarsen(ramp, {"p_coarse": 1.0, "coarse_max": 2.0}, g)    # smooth content stays
    assert y3.shape == ramp.shape and (y3 - ramp)[:, :, 2:-2].abs().max() < 0.02
    kept = coarsen(stripes, {"p_coarse": 1.0, "coarse_max": 1.0}, g)
    assert torch.equal(kept, stripes)                                 # factor 1: untouched
    from training.classic_augment import coarse_resample
    across = coarse_resample(stripes[:1], (1.0, 4.0))                 # the other axis: stripes stay
    assert torch.allclose(across, stripes[:1], atol=1e-5)
    assert (coarse_resample(stripes[:1], (2.0, 1.0)) - 0.5).abs().max() < 0.3
    for bad in ((2.0,), (0.5, 1.0)):
        with pytest.raises(ValueError, match="factors >= 1"):
            coarse_resample(stripes[:1], bad)
    for key, bad in (("augment.p_coarse", "2"), ("augment.coarse_max", "0.5"), ("augment.coarse_max", "x")):
        with pytest.raises(ValueError) as e:
            tiny(**{key: bad})
        assert key in str(e.value) and "\n" not in str(e.value)


def test_field_of_view_cut_zeroes_one_side_beyond_a_line_and_is_off_by_default():
    """augment.p_cut: everything beyond a line parallel to one side of the grid is zeroed (a field
    of view that ends there), on a random axis and side; at 0 (the default) nothing is drawn; a bad
    value is one line naming the key."""
    from training.classic_augment import field_of_view_cut
    ident = _AUG_IDENT
    _assert_off_draws_nothing("p_cut")
    ones = torch.ones(1, 1, 8, 8)
    right = field_of_view_cut(ones, 1, 1, 0.5)                 # columns beyond +0.5 of the half-side
    assert right[0, 0, :, :6].eq(1).all() and right[0, 0, :, 6:].eq(0).all()
    top = field_of_view_cut(ones, 0, -1, 0.0)                  # rows before the centre
    assert top[0, 0, :4].eq(0).all() and top[0, 0, 4:].eq(1).all()
    assert torch.equal(field_of_view_cut(ones, 0, 1, 1.0), ones)
    with pytest.raises(ValueError, match="axis must be"):
        field_of_view_cut(ones, 2, 1, 0.5)
    ones3 = torch.ones(64, 1, 8, 8, 8)
    y = augment(ones3, dict(ident, p_cut=1.0, cut_min=0.0), torch.Generator().manual_seed(3))
    kept = y.flatten(1).mean(1)
    assert (kept < 1.0).float().mean() > 0.7 and (kept >= 0.5).all()   # mostly cut, never past the centre
    cut_axes = set()
    for b in range(64):                                        # the axis whose profile has a zero slab
        profiles = [y[b, 0].amax(tuple(e for e in range(3) if e != d)) for d in range(3)]
        if kept[b] < 1.0:
            cut_axes.add(tuple(d for d in range(3) if profiles[d].eq(0).any()))
    assert cut_axes == {(0,), (1,), (2,)}, cut_axes            # one axis at a time, each of them
    for key, bad in (("augment.p_cut", "-0.1"), ("augment.cut_min", "1.5")):
        with pytest.raises(ValueError) as e:
            tiny(**{key: bad})
        assert key in str(e.value) and "\n" not in str(e.value)


def test_image_padding_border_leaves_no_dark_band_where_the_field_reaches_outside():
    """loss.image_padding: I_t = I_0 o psi read with zeros (SPEC) shows a dark band where the
    forward field pulls content in from outside the image; border does not.  Bad values are one
    line naming the key."""
    from training.objective import training_batch
    from training.streams import generators
    cfg = tiny(**{"augment.enabled": "false", "model.field_scale": "4.0"})
    mcfg = model_config(cfg)
    sampler = ForwardSampler(mcfg)
    ones = (torch.ones(8, 32, 32) * 255).to(torch.uint8)
    out = {}
    for padding in ("zeros", "border"):
        bank = SliceBank(ones, 8, seed=0)
        gens = generators(0, 0, "cpu")
        gens["t"] = torch.Generator().manual_seed(2)
        x0, t, fs, img_t = training_batch(bank, sampler, cfg["augment"], gens, mcfg, torch.device("cpu"),
                                          image_padding=padding)
        out[padding] = img_t
    assert torch.equal(x0, torch.ones_like(x0))
    assert out["zeros"].min() < 0.5                          # content pulled in from outside: dark
    assert torch.allclose(out["border"], torch.ones_like(out["border"]))
    with pytest.raises(ValueError) as e:
        tiny(**{"loss.image_padding": "reflection"})
    assert "loss.image_padding" in str(e.value) and "\n" not in str(e.value)


def test_true_negdet_zero_when_smooth_positive_when_folded():
    S = 32
    assert float(true_negdet(torch.zeros(1, 2, S, S))) == 0.0
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    smooth = torch.stack([torch.sin(xx / 5), torch.cos(yy / 7)])[None] * 0.5 / S   # 0.5 px, gentle
    assert float(true_negdet(smooth)) == 0.0
    folded = torch.stack([-2.0 * yy, torch.zeros_like(xx)])[None] / S               # d(u0)/dy = -2: det = -1
    assert float(true_negdet(folded)) == pytest.approx(1.0)
    assert float(true_negdet(torch.zeros(1, 3, 8, 8, 8))) == 0.0


def test_configs_and_numeric_field_scale():
    b2, b3 = load_config(CONFIGS / "brain2d.yaml"), load_config(CONFIGS / "brain3d.yaml")
    m2, m3 = model_config(b2), model_config(b3)
    assert (m2.ndim, m2.size, m2.field_factor()) == (2, 128, 4.0)
    assert (m3.ndim, m3.size, m3.field_factor(), m3.compose_padding) == (3, 64, 2.0, "border")
    with pytest.raises(ValueError):
        model_config(dict(b2, model={"ndim": 2, "size": 32, "field_scale": "bogus"}))
    with pytest.raises(ValueError):
        model_config(dict(b2, model={"ndim": 2, "size": 32, "no_such_key": 1}))
    # a number (or a numeric string) is used as the factor; at S=128, 2.0 == 'reference' (128/64)
    draws = ForwardSampler(m2).draw(1, torch.Generator().manual_seed(0))
    ref = ForwardSampler(m2.replace(field_scale="reference")).sample(20, batch=1, draws=draws)
    for fs in (2.0, "2.0"):
        out = ForwardSampler(m2.replace(field_scale=fs)).sample(20, batch=1, draws=draws)
        assert torch.equal(out.forward_ddf, ref.forward_ddf)
    four = ForwardSampler(m2).sample(20, batch=1, draws=draws)
    assert torch.allclose(four.forward_ddf, 2 * ref.forward_ddf, rtol=1e-5, atol=1e-6)


def test_prepare_synthetic_and_slice_bank(tmp_path):
    cfg = tiny(**{"data.prepared": str(tmp_path / "syn.npz"), "data.n_synthetic": 8})
    path = prepare(cfg, log=lambda *a: None)
    data = load_prepared(path)
    info = json.loads(Path(path + ".json").read_text())
    assert info["sha256"] == data["sha256"] and data["train"].shape == (8, 32, 32) and data["train"].dtype == np.uint8
    bank = SliceBank(data["train"], 3, seed=1)
    first = [bank.next_indices() for _ in range(3)]
    state = bank.state_dict()
    after = [bank.next_indices() for _ in range(3)]
    bank2 = SliceBank(data["train"], 3, seed=1)
    bank2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(after, [bank2.next_indices() for _ in range(3)]))
    assert sorted(torch.cat(first).tolist()[:8]) == list(range(8))          # one epoch = a permutation
    shards = [set(SliceBank(data["train"], 4, seed=1, rank=r, world=2).next_indices().tolist()) for r in (0, 1)]
    assert not shards[0] & shards[1]
    x = bank.next_batch()
    assert x.shape == (3, 1, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_preprocess_volume_isotropic_cube():
    vol = np.zeros((40, 30, 12), np.float32)
    vol[8:32, 5:25, 2:10] = 100.0 + np.random.RandomState(0).rand(24, 20, 8).astype(np.float32)
    cube, fg = preprocess_volume(vol, (1.0, 1.0, 3.0), 16)
    assert cube.shape == fg.shape == (16, 16, 16)
    assert 0.0 <= cube.min() and cube.max() <= 1.0 and cube[0, 0, 0] == 0.0
    # a 24 x 20 x 24 mm box (+ margins) centred in the cube: it spans most of its longest axes
    spans = [np.ptp(np.nonzero(fg.any(axis=tuple(j for j in range(3) if j != i)))[0]) + 1 for i in range(3)]
    assert max(spans) >= 12 and min(spans) >= 9 and 0.25 < fg.mean() < 0.9
    img, fg2 = preprocess_volume(vol[:, :, 5], (1.0, 1.0), 16)
    assert img.shape == (16, 16) and fg2.any()


def test_cli_help_and_prepare(tmp_path, capsys):
    from training.__main__ import main
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out
    out = tmp_path / "p.npz"
    assert main(["prepare", "--config", str(CONFIGS / "tiny.yaml"), "--out", str(out),
                 "--set", "data.n_synthetic=4"]) == 0
    assert load_prepared(str(out))["train"].shape[0] == 4


def test_init_from_bundled_name_starts_from_those_weights_and_records_them(tmp_path):
    """Fine-tuning: `init: cmr2d` loads the published weights (not a fresh network) and the
    export's provenance names them with their sha256."""
    from napari_drdm.checkpoint import file_sha256 as sha
    from napari_drdm.weights import resolve_weights
    cmr, _ = resolve_weights("cmr2d")
    ref, _, _ = read_checkpoint(cmr)
    run = tmp_path / "ft"
    cfg = tiny(**{"init": "cmr2d", "train.steps": 1, "validation.at_end": "false", "optim.lr": 0.0})
    train(cfg, run, argv=["test", "ft"], echo=lambda *a: None)
    ck = load_training_checkpoint(latest_checkpoint(run))
    for k, v in ref.items():          # lr 0: one step leaves the weights as loaded
        assert torch.equal(ck["model"][k], v), k
    assert ck["init"]["sha256"] == sha(cmr) and ck["init"]["config"]["size"] == 256
    out, _ = export_run(run, tmp_path / "ft.safetensors")
    _, _, prov = read_checkpoint(out)
    assert prov["init"]["source"] == "cmr2d" and prov["init"]["sha256"] == sha(cmr)


def test_anchor_holds_a_fine_tune_near_its_start(tmp_path):
    """``loss.w_anchor``: the squared distance to the starting weights is a logged loss term, and a
    strong one keeps the weights nearer their start than the same steps without it; no weights to
    stay near is refused."""
    from napari_drdm.weights import resolve_weights
    from training.init_weights import InitError
    ref, _, _ = read_checkpoint(resolve_weights("cmr2d")[0])
    drift = {}
    for w in (0.0, 1e4):
        run = tmp_path / f"anchor{w:g}"
        cfg = tiny(**{"init": "cmr2d", "train.steps": 4, "validation.at_end": "false", "optim.lr": 1e-3,
                      "loss.w_anchor": w, "train.log_every": 1})
        train(cfg, run, argv=["test", "anchor"], echo=lambda *a: None)
        state = load_training_checkpoint(latest_checkpoint(run))["model"]
        drift[w] = sum(float(((state[k].float() - ref[k].float()) ** 2).sum()) for k in ref)
        logged = [r for r in _log(run) if "total" in r]
        assert logged and all(("anchor" in r) == (w > 0) for r in logged)
    assert 0 < drift[1e4] < 0.5 * drift[0.0]
    with pytest.raises(InitError, match="w_anchor > 0 needs loss.anchor or init"):
        train(tiny(**{"loss.w_anchor": 1.0, "train.steps": 1}), tmp_path / "none", argv=["t"], echo=lambda *a: None)


def _teacher_gap(state, ref_state, cfg, window=None) -> float:
    """|psi - target|^2 / |target|^2 of two weight sets on one fixed batch of deformed images, the
    target being psi_ref (times ``window`` when one is given)."""
    from training.objective import training_batch
    mcfg = model_config(cfg)
    nets = []
    for st in (state, ref_state):
        n = DRDMNet.from_config(mcfg)
        n.load_state_dict({k: v.float() for k, v in st.items()})
        nets.append(n.eval())
    from training.data import synthetic_images
    bank = SliceBank(synthetic_images(4, mcfg.size, 2, seed=5), 4, device=torch.device("cpu"), seed=0)
    gens = {"aug": torch.Generator().manual_seed(1), "field": torch.Generator().manual_seed(2)}
    _, t, _, img = training_batch(bank, ForwardSampler(mcfg), cfg["augment"], gens, mcfg, torch.device("cpu"))
    with torch.no_grad():
        a, b = (n(img, t, k=mcfg.k_recursions) for n in nets)
    if window is not None:
        b = b * window
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def test_teacher_pull_keeps_the_estimates_near_the_reference(tmp_path):
    """``loss.w_teacher``: a logged term that is 0 where the two networks agree; a strong pull
    keeps the run's estimates on new deformed images nearer the reference's than the same steps
    without it, and leaves the reference network untouched."""
    from napari_drdm.weights import resolve_weights
    from training.pulls import teacher_term
    ref, _, _ = read_checkpoint(resolve_weights("cmr2d")[0])
    gap = {}
    for w in (0.0, 1e4):
        run = tmp_path / f"teacher{w:g}"
        cfg = tiny(**{"init": "cmr2d", "train.steps": 8, "validation.at_end": "false", "optim.lr": 1e-4,
                      "loss.w_teacher": w, "loss.teacher_batch": 2, "train.log_every": 1})
        train(cfg, run, argv=["test", "teacher"], echo=lambda *a: None)
        state = load_training_checkpoint(latest_checkpoint(run))["model"]
        gap[w] = _teacher_gap(state, ref, cfg)
        logged = [r for r in _log(run) if "total" in r]
        assert logged and all(("teacher" in r) == (w > 0) for r in logged)
    assert 0 < gap[1e4] < 0.25 * gap[0.0]
    net, other = (DRDMNet.from_config(model_config(cfg)) for _ in range(2))
    img, t = torch.rand(2, 1, 32, 32), torch.tensor([3, 40])
    psi = net(img, t, k=2)
    assert float(teacher_term(psi, psi.detach(), 1.0).detach()) == 0.0
    with torch.no_grad():
        ref = other(img, t, k=2)
    term = teacher_term(psi, ref, 2.0)
    term.backward()
    assert float(term.detach()) > 0 and all(p.grad is None for p in other.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_edge_window_falls_to_its_floor_on_the_border():
    """``edge_window``: 1 from ``px`` pixels inwards, linear down to ``floor`` on every border, in 2D and 3D."""
    from training.pulls import edge_window
    w = edge_window((8, 10), 2, 0.5)
    assert w.shape == (8, 10)
    assert float(w[0, 5]) == 0.5 and float(w[7, 5]) == 0.5 and float(w[4, 0]) == 0.5 and float(w[4, 9]) == 0.5
    assert float(w[1, 5]) == 0.75 and float(w[4, 1]) == 0.75 and float(w[1, 1]) == 0.75
    assert torch.all(w[2:6, 2:8] == 1.0) and float(w.min()) == 0.5
    assert torch.equal(edge_window((4, 4), 0, 0.2), torch.ones(4, 4))
    w3 = edge_window((7, 7, 7), 3, 0.0)
    assert float(w3[0, 3, 3]) == 0.0 and float(w3[3, 3, 3]) == 1.0 and float(w3[3, 1, 3]) == pytest.approx(1 / 3)


def test_teacher_edge_taper_pulls_the_border_estimates_down(tmp_path):
    """``loss.teacher_edge_px``: the run's estimates come nearer the tapered reference than those of
    the same strong pull without the taper; the term is 0 where the estimates equal the tapered target."""
    from napari_drdm.weights import resolve_weights
    from training.pulls import edge_window, teacher_term
    ref, _, _ = read_checkpoint(resolve_weights("cmr2d")[0])
    gap = {}
    for px in (0, 8):
        cfg = tiny(**{"init": "cmr2d", "train.steps": 8, "validation.at_end": "false", "optim.lr": 1e-4,
                      "loss.w_teacher": 1e4, "loss.teacher_batch": 2, "loss.teacher_edge_px": px,
                      "loss.teacher_edge_floor": 0.0})
        run = tmp_path / f"edge{px}"
        train(cfg, run, argv=["test", "edge"], echo=lambda *a: None)
        size = model_config(cfg).size
        window = edge_window((size, size), 8, 0.0)
        gap[px] = _teacher_gap(load_training_checkpoint(latest_checkpoint(run))["model"], ref, cfg, window)
    assert gap[8] < gap[0]
    psi = torch.randn(2, 2, 16, 16)
    window = edge_window((16, 16), 4, 0.5)
    assert float(teacher_term(psi * window, psi, 1.0, window)) == 0.0
    assert float(teacher_term(psi, psi, 1.0, torch.ones(16, 16))) == 0.0
    assert float(teacher_term(psi, psi, 1.0, window)) > 0.0


@pytest.mark.parametrize("key,value,match", [
    ("loss.w_teacher", -1, "loss.w_teacher must be a number >= 0"),
    ("loss.w_teacher", "much", "loss.w_teacher must be a number >= 0"),
    ("loss.teacher_batch", 0, "loss.teacher_batch must be an integer >= 1"),
    ("loss.teacher_augment", "[1]", "loss.teacher_augment must be a mapping"),
    ("loss.teacher_augment", "{p_zoom: 0.5}", "loss.teacher_augment: unknown keys \\['p_zoom'\\]"),
    ("loss.teacher_augment", "{p_zoom_in: 2}", "augment.p_zoom_in must be a probability"),
    ("init_weights", "best", "init_weights must be 'raw' or 'ema'"),
    ("loss.teacher_edge_px", -2, "loss.teacher_edge_px must be a whole number of pixels >= 0"),
    ("loss.teacher_edge_px", 2.5, "loss.teacher_edge_px must be a whole number of pixels >= 0"),
    ("loss.teacher_edge_floor", 1.5, "loss.teacher_edge_floor must be a number from 0 to 1"),
    ("loss.teacher_edge_floor", "low", "loss.teacher_edge_floor must be a number from 0 to 1"),
])
def test_teacher_and_init_settings_are_checked(key, value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{key: value})


def test_init_weights_ema_starts_from_the_checkpoint_average(tmp_path):
    """``init_weights: ema`` seeds a run from a training checkpoint's weight average (not its raw
    weights); a checkpoint without one is refused in one line."""
    from training.init_weights import InitError, load_init
    src = tmp_path / "src"
    train(tiny(**{"validation.at_end": "false", "train.ema_decay": 0.5}), src, argv=["t"], echo=lambda *a: None)
    path = latest_checkpoint(src)
    ck = load_training_checkpoint(path)
    net = DRDMNet.from_config(model_config(tiny()))
    info = load_init(net, path, weights="ema")
    assert info["provenance"]["weights"] == "ema"
    for k, v in net.state_dict().items():
        assert torch.equal(v, ck["ema"]["state"][k].to(v.dtype)), k
    assert any(not torch.equal(ck["ema"]["state"][k].float(), ck["model"][k].float()) for k in ck["model"])
    plain = tmp_path / "plain"
    train(tiny(**{"validation.at_end": "false", "train.steps": 2}), plain, argv=["t"], echo=lambda *a: None)
    with pytest.raises(InitError, match="holds no weight average"):
        load_init(net, latest_checkpoint(plain), weights="ema")


def test_init_refuses_a_network_of_another_shape(tmp_path):
    from training.train import InitError
    cfg = tiny(**{"init": "cmr2d", "model.channels": "[8, 16, 32]"})
    with pytest.raises(InitError, match="does not fit the configured network.*shape"):
        train(cfg, tmp_path / "bad", argv=["t"], echo=lambda *a: None)
    with pytest.raises(InitError, match="neither a weights file nor a bundled model name"):
        train(tiny(init="no_such_model"), tmp_path / "bad2", argv=["t"], echo=lambda *a: None)


def test_cli_init_mismatch_is_one_line(tmp_path, capsys):
    from training.__main__ import main
    rc = main(["train", "--config", str(CONFIGS / "tiny.yaml"), "--run", str(tmp_path / "r"),
               "--init", "cmr2d", "--set", "model.channels=[8, 16, 32]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: init:")


def test_convert_upstream_is_bit_identical(tmp_path):
    from conftest import ref_path

    from training.convert_upstream import convert_upstream
    pth = ref_path("upstream_cmr2d.pth")
    out = tmp_path / "c.safetensors"
    convert_upstream(pth, out)
    state, cfg, prov = read_checkpoint(out)
    ref = torch.load(pth, map_location="cpu", weights_only=True)
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    assert (cfg.ndim, cfg.size, cfg.field_scale) == (2, 256, "reference")
    assert prov["licence"] == "Apache-2.0" and prov["converted_from_sha256"] == file_sha256(pth)
    with pytest.raises(FileExistsError):
        convert_upstream(pth, out)


def test_convert_upstream_compose_padding(tmp_path, capsys):
    """The converter writes border composition padding by default, recorded in the provenance as a
    change from the authors' configuration; ``--compose-padding zeros`` writes theirs; the tensors
    are the same either way, and the bundled cmr2d is the default conversion."""
    from conftest import ref_path

    from napari_drdm.weights import resolve_weights
    from training.__main__ import main as training_main
    from training.convert_upstream import convert_upstream
    pth = ref_path("upstream_cmr2d.pth")
    convert_upstream(pth, tmp_path / "default.safetensors")
    assert training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "zeros.safetensors"),
                          "--compose-padding", "zeros"]) == 0
    assert "composition padding zeros" in capsys.readouterr().out
    s_b, c_b, p_b = read_checkpoint(tmp_path / "default.safetensors")
    s_z, c_z, p_z = read_checkpoint(tmp_path / "zeros.safetensors")
    assert (c_b.compose_padding, c_z.compose_padding) == ("border", "zeros")
    assert set(s_b) == set(s_z) and all(torch.equal(s_b[k], s_z[k]) for k in s_b)
    assert c_b.replace(compose_padding="zeros").to_dict() == c_z.to_dict()
    assert p_b["compose_padding"] == "border" and p_b["authors_compose_padding"] == "zeros"
    assert "weights_table_t45_cmr2d_border.json" in p_b["compose_padding_change"]
    assert "4 inference settings changed" in p_b["change"]      # and the input padding, background margin, anatomy fit
    assert "compose_padding_change" not in p_z and "3 inference settings changed" in p_z["change"]
    assert "composition padding" not in p_z["change"]
    bundled, _ = resolve_weights("cmr2d")
    s_c, c_c, p_c = read_checkpoint(bundled)
    assert c_c.to_dict() == c_b.to_dict() and p_c == p_b
    assert all(torch.equal(s_c[k], s_b[k]) for k in s_b)
    with pytest.raises(SystemExit) as e:
        training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "x.safetensors"),
                       "--compose-padding", "reflection"])
    assert e.value.code == 2 and not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="--compose-padding: expected border or zeros"):
        convert_upstream(pth, tmp_path / "y.safetensors", compose_padding="reflect")


def test_convert_upstream_input_padding(tmp_path, capsys):
    """The converter stores 8 px of mirrored input by default, recorded in the provenance as a
    change from the authors' setting; ``--input-padding 0`` writes theirs; a bad value is one line."""
    from conftest import ref_path

    from training.__main__ import main as training_main
    from training.convert_upstream import convert_upstream
    pth = ref_path("upstream_cmr2d.pth")
    convert_upstream(pth, tmp_path / "default.safetensors")
    assert training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "none.safetensors"),
                          "--input-padding", "0", "--compose-padding", "zeros", "--background-margin", "off",
                          "--anatomy-fit", "off"]) == 0
    assert "input padding 0 px" in capsys.readouterr().out
    _, c_d, p_d = read_checkpoint(tmp_path / "default.safetensors")
    _, c_0, p_0 = read_checkpoint(tmp_path / "none.safetensors")
    assert (c_d.input_padding, c_0.input_padding) == (8, 0)
    assert "weights_table_t45_cmr2d_pad8.json" in p_d["input_padding_change"]
    assert "4 inference settings changed" in p_d["change"] and p_d["authors_input_padding"] == 0
    assert "input_padding_change" not in p_0 and "inference setting" not in p_0["change"]
    assert training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "x.safetensors"),
                          "--input-padding", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --input-padding: input_padding must be a multiple of 4") and err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_upstream_background_margin(tmp_path, capsys):
    """The converter stores a background margin of 8 px by default, recorded in the provenance as a
    change from the authors' behaviour; ``--background-margin off`` writes theirs; a bad value is
    one line and writes nothing."""
    from conftest import ref_path

    from training.__main__ import main as training_main
    from training.convert_upstream import convert_upstream
    pth = ref_path("upstream_cmr2d.pth")
    convert_upstream(pth, tmp_path / "default.safetensors")
    assert training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "off.safetensors"),
                          "--background-margin", "off"]) == 0
    assert "background margin off" in capsys.readouterr().out
    s_d, c_d, p_d = read_checkpoint(tmp_path / "default.safetensors")
    s_o, c_o, p_o = read_checkpoint(tmp_path / "off.safetensors")
    assert (c_d.background_margin, c_o.background_margin) == (8, None)
    assert (p_d["background_margin"], p_d["authors_background_margin"]) == (8, None)
    assert "background_extension.json" in p_d["background_margin_change"]
    assert "background_margin_change" not in p_o and "3 inference settings changed" in p_o["change"]
    assert all(torch.equal(s_d[k], s_o[k]) for k in s_d)
    # the anatomy fit: 16 px by default, off writes the authors' whole-image view
    assert training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "whole.safetensors"),
                          "--anatomy-fit", "off"]) == 0
    assert "anatomy fit off" in capsys.readouterr().out
    _, c_w, p_w = read_checkpoint(tmp_path / "whole.safetensors")
    assert (c_d.anatomy_fit, c_w.anatomy_fit) == (16, None) and p_d["authors_anatomy_fit"] is None
    assert "weights_table_t45_cmr2d_bg8_fit16.json" in p_d["anatomy_fit_change"]
    assert "anatomy_fit_change" not in p_w and "3 inference settings changed" in p_w["change"]
    assert training_main(["convert-upstream", "--pth", str(pth), "--out", str(tmp_path / "x.safetensors"),
                          "--background-margin", "128"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --background-margin: expected 'off' or a whole number of pixels") and \
        err.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_soup_averages_one_networks_weights_and_refuses_another(tmp_path, tiny_checkpoint, capsys):
    """``python -m training soup``: the weighted average tensor by tensor, the first file's
    configuration, every ingredient in the provenance; two networks that differ, a single file or an
    existing output are one line each (exit 2)."""
    from training.__main__ import main as training_main
    a = tiny_checkpoint(2, 32, seed=1, name="a", background_margin=4)
    b = tiny_checkpoint(2, 32, seed=2, name="b")
    out = tmp_path / "soup.safetensors"
    assert training_main(["soup", "--weights", a, b, "--coef", "3", "1", "--out", str(out), "--note", "test"]) == 0
    assert "the average of" in capsys.readouterr().out
    (sa, ca, _), (sb, _, _), (ss, cs, prov) = (read_checkpoint(p) for p in (a, b, out))
    for k in sa:
        torch.testing.assert_close(ss[k], 0.75 * sa[k] + 0.25 * sb[k])
    assert cs.background_margin == 4 and cs.to_dict() == ca.to_dict()
    assert [i["coef"] for i in prov["soup_of"]] == [0.75, 0.25] and prov["note"] == "test"
    assert len({i["sha256"] for i in prov["soup_of"]}) == 2
    other = tiny_checkpoint(2, 64, seed=1, name="c")
    new = str(tmp_path / "new.safetensors")
    for args, msg in ((["--weights", a, other, "--out", new], "another network than"),
                      (["--weights", a, "--out", new], "at least two"),
                      (["--weights", a, b, "--coef", "1", "-1", "--out", new], "one positive finite number per weights"),
                      (["--weights", a, b, "--coef", "1", "inf", "--out", new], "one positive finite number per weights"),
                      (["--weights", a, b, "--out", str(out)], "exists; pass --overwrite"),
                      (["--weights", a, str(tmp_path / "none.safetensors"), "--out", new], "no such file or bundled")):
        assert training_main(["soup", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1
    assert not Path(new).exists()


def test_set_inference_changes_settings_not_the_network(tmp_path, tiny_checkpoint, capsys):
    """set-inference: a file is written to --out with the new settings and an ``inference_changes``
    record; a bundled name is changed in place with its registry entry; bad requests are one line."""
    import json
    import shutil

    from training.__main__ import main as training_main
    src = tiny_checkpoint(2, 32, name="m")
    out = tmp_path / "m2.safetensors"
    assert training_main(["set-inference", "--weights", src, "--out", str(out), "--background-margin", "4",
                          "--input-padding", "8", "--measured", "a test"]) == 0
    assert "background_margin off -> 4" in capsys.readouterr().out
    s0, c0, _ = read_checkpoint(src)
    s1, c1, p1 = read_checkpoint(out)
    assert (c1.background_margin, c1.input_padding) == (4, 8) and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert c1.replace(background_margin=None, input_padding=0).to_dict() == c0.to_dict()
    assert [(r["setting"], r["from"], r["to"], r["measured"]) for r in p1["inference_changes"]] == \
        [("input_padding", 0, 8, "a test"), ("background_margin", None, 4, "a test")] or \
        [(r["setting"], r["from"], r["to"], r["measured"]) for r in p1["inference_changes"]] == \
        [("background_margin", None, 4, "a test"), ("input_padding", 0, 8, "a test")]
    # refusals: an existing --out, nothing to change, a bad value, no measurement
    for argv, msg in (([src, "--out", str(out), "--background-margin", "2"], "exists; pass --overwrite"),
                      ([str(out), "--out", str(tmp_path / "n.safetensors"), "--background-margin", "4"], "already has"),
                      ([src, "--out", str(tmp_path / "b.safetensors"), "--background-margin", "16"], "below S/2 = 16"),
                      ([src, "--out", str(tmp_path / "c.safetensors"), "--background-margin", "2", "--measured", " "],
                       "--measured")):
        extra = [] if "--measured" in argv else ["--measured", "x"]
        assert training_main(["set-inference", "--weights", *argv, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "c.safetensors").exists()
    # a bundled name: in place, the registry follows
    wdir = tmp_path / "weights"
    wdir.mkdir()
    shutil.copyfile(src, wdir / "m.safetensors")
    (wdir / "registry.json").write_text(json.dumps({"m": {"file": "m.safetensors", "sha256": "old", "ndim": 2,
                                                          "size": 32, "aliases": ["mm"], "provenance": {}}}))
    assert training_main(["set-inference", "--weights", "mm", "--background-margin", "2", "--measured", "why",
                          "--weights-dir", str(wdir)]) == 0
    entry = json.loads((wdir / "registry.json").read_text())["m"]
    from napari_drdm.checkpoint import file_sha256
    assert entry["sha256"] == file_sha256(wdir / "m.safetensors") and entry["provenance"]["background_margin"] == "2 (why)"
    assert read_checkpoint(wdir / "m.safetensors")[1].background_margin == 2
    assert training_main(["set-inference", "--weights", "m", "--out", str(tmp_path / "z.safetensors"),
                          "--background-margin", "off", "--measured", "x", "--weights-dir", str(wdir)]) == 2
    assert "changed in place" in capsys.readouterr().err


def test_inflated_2d_weights_reproduce_the_2d_network_on_depth_constant_volumes():
    """init_inflate=centre: a 3D network seeded from 2D weights gives, on a volume that repeats one
    plane along depth, the 2D network's in-plane prediction on that plane (depth component aside)."""
    from training.inflate import inflate_state_dict
    torch.manual_seed(3)
    n2, n3 = DRDMNet(2), DRDMNet(3)
    with torch.no_grad():
        for p in n2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n3.load_state_dict(inflate_state_dict(n2.state_dict(), n3, "centre"), strict=True)
    x = torch.rand(1, 1, 16, 16)
    t = torch.tensor([40])
    with torch.no_grad():
        y2 = n2.single_pass(x, t)
        y3 = n3.single_pass(x[:, :, None].expand(1, 1, 8, 16, 16).contiguous(), t)
    assert torch.allclose(y3[:, 1:, 4], y2, atol=1e-5 * float(y2.abs().max()) + 1e-7)
    spread = inflate_state_dict(n2.state_dict(), n3, "spread")
    assert not torch.equal(spread["b1.0.conv0.weight"], n3.state_dict()["b1.0.conv0.weight"])
    with pytest.raises(ValueError, match="init_inflate"):
        inflate_state_dict(n2.state_dict(), n3, "diagonal")


def test_init_inflates_2d_weights_for_a_3d_run(tmp_path):
    cfg = tiny(**{"init": "cmr2d", "init_inflate": "spread", "model.ndim": 3, "model.size": 16,
                  "train.steps": 1, "train.batch_size": 1, "validation.at_end": "false", "optim.lr": 0.0,
                  "data.n_synthetic": 4})
    train(cfg, tmp_path / "r3", argv=["t"], echo=lambda *a: None)
    ck = load_training_checkpoint(latest_checkpoint(tmp_path / "r3"))
    assert ck["model"]["conv_out.weight"].shape == (3, 10, 3, 3, 3)
    assert ck["init"]["provenance"]["inflated_2d_to_3d"] == "spread"


def test_plot_writes_learning_curves_and_skips_a_torn_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from training.__main__ import main
    log = tmp_path / "run" / "train_log.jsonl"
    log.parent.mkdir()
    rows = [{"step": s, "ang": -0.5 - s / 1000} for s in range(10, 210, 10)]
    rows += [{"event": "validation", "step": 100, "val/T45/reference/folding_pct": 3.0,
              "val/T45/forward/folding_pct": 9.0, "val/T45/reference/max_disp_pct": 12.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 2')
    assert main(["plot", "--run", str(log.parent)]) == 0
    png = log.parent / "learning_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000
    assert main(["plot", "--run", str(tmp_path / "missing")]) == 2
    assert "training log not found" in capsys.readouterr().err


def test_plot_draws_targets_on_a_log_folding_axis(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from training.__main__ import main
    log = tmp_path / "run" / "train_log.jsonl"
    log.parent.mkdir()
    rows = [{"step": s, "ang": -0.5} for s in range(10, 60, 10)]
    rows += [{"event": "validation", "step": 50, "val/T45/reference/folding_pct": 3.0,
              "val/T45/forward/folding_pct": 0.0, "val/T45/reference/max_disp_pct": 12.0},
             {"event": "validation", "step": 60, "val_ema/T45/reference/folding_pct": 2.0,   # average only
              "val_ema/T45/forward/folding_pct": 0.0}]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    seen = {}

    def savefig(fig, *a, **k):          # look at the axes instead of the pixels
        seen["axes"] = [(ax.get_yscale(), sorted(round(ln.get_ydata()[0], 3) for ln in ax.get_lines()
                                                  if ln.get_linestyle() == ":")) for ax in fig.axes]
        seen["lines"] = {ln.get_label(): list(ln.get_xdata()) for ln in fig.axes[1].get_lines()}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    args = ["plot", "--run", str(log.parent), "--folding-target", "0.5", "--displacement-target", "8,16"]
    assert main(args) == 0
    # a zero (the 3D forward field) cannot sit on a log axis: symlog, linear below 0.1 %
    assert seen["axes"][1:] == [("symlog", [0.5]), ("linear", [8.0, 16.0])]
    # the forward field is one series, also at steps where only the average was validated
    assert seen["lines"]["T45 forward"] == [50, 60] and seen["lines"]["T45 reference (weight average)"] == [60]
    assert main(args[:3] + ["--linear-folding"]) == 0
    assert seen["axes"][1][0] == "linear"
    capsys.readouterr()
    assert main(args[:3] + ["--displacement-target", "8,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --displacement-target '8,x'") and "\n" not in err


def test_a_config_file_starts_from_its_base(tmp_path):
    """``base:``: the named file (relative to this one, itself resolved) and then this file's keys,
    mapping by mapping; the resolved configuration carries no ``base``."""
    from training.settings import read_config_file
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("name: root\nmodel: {ndim: 2, size: 32}\ntrain: {steps: 7, batch_size: 3}\n"
                                        "validation: {t_primes: [30, 45]}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nname: mid\ntrain: {steps: 9}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nvalidation: {t_primes: [70]}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", ["train.seed=5"])
    assert cfg["name"] == "mid" and cfg["model"]["size"] == 32 and "base" not in cfg
    assert cfg["train"]["steps"] == 9 and cfg["train"]["batch_size"] == 3 and cfg["train"]["seed"] == 5
    assert cfg["validation"]["t_primes"] == [70]                      # a list is replaced whole
    bad = {"loop.yaml": "base: loop2.yaml\n", "loop2.yaml": "base: loop.yaml\n", "gone.yaml": "base: nowhere.yaml\n",
           "num.yaml": "base: 3\n", "list.yaml": "- 1\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
    for name, msg in (("loop.yaml", "the chain of 'base' files loops back to loop.yaml"),
                      ("gone.yaml", "base 'nowhere.yaml' not found"),
                      ("num.yaml", "base must be the file name of another config, got 3"),
                      ("list.yaml", "expected a mapping of config sections, got list")):
        with pytest.raises(ValueError) as e:
            read_config_file(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)) and msg in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="read from a config file only"):
        load_config(base={"base": "root.yaml"})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg["name"] == path.stem and "base" not in cfg

def test_plot_marks_a_learning_rate_change_but_not_the_warmup(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from training.plot import lr_changes, plot_run
    warm = [{"step": s, "ang": -0.1, "lr": 1e-4 * s / 20} for s in (5, 10, 15)]       # warm-up: rises
    flat = [{"step": s, "ang": -0.3, "lr": 1e-4} for s in range(20, 70, 5)]
    lower = [{"step": s, "ang": -0.4, "lr": 5e-5} for s in range(70, 100, 5)]
    rows = warm + flat + [{"event": "stop", "step": 67}] + lower
    assert lr_changes(rows) == [(70, 1e-4, 5e-5)]
    assert lr_changes(warm + flat) == [] and lr_changes(flat[:1] + lower) == []      # one row is no plateau
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    seen = {}

    def savefig(fig, *a, **k):
        seen["v"] = [[ln.get_xdata()[0] for ln in ax.get_lines() if list(ln.get_xdata()) == [70, 70]]
                     for ax in fig.axes]
        seen["text"] = [t.get_text() for t in fig.axes[0].texts]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_run(log, tmp_path / "c.png")
    assert seen["v"] == [[70], [70], [70]] and seen["text"] == ["lr 0.0001 -> 5e-05"]


def test_plot_marks_a_batch_change_with_the_learning_rate_change_at_the_same_step(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from training.plot import batch_changes, plot_run
    cpu = [{"step": s, "ang": -0.3, "lr": 1e-4, "it_s": 0.08, "samples_s": 0.16} for s in range(5, 50, 5)]
    gpu = [{"step": s, "ang": -0.4, "lr": 5e-5, "it_s": 3.4, "samples_s": 27.2} for s in range(50, 80, 5)]
    bigger = [{"step": s, "ang": -0.4, "lr": 5e-5, "it_s": 1.7, "samples_s": 27.2} for s in range(80, 95, 5)]
    assert batch_changes(cpu + gpu + bigger) == [(50, 2, 8), (80, 8, 16)]
    assert batch_changes(cpu) == [] and batch_changes([{"step": 5, "ang": 0.0, "it_s": 0.0, "samples_s": 0.0}]) == []
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in cpu + gpu + bigger))
    seen = {}

    def savefig(fig, *a, **k):
        seen["text"] = [t.get_text() for t in fig.axes[0].texts]
        seen["xlim"] = [ax.get_xlim() for ax in fig.axes]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_run(log, tmp_path / "c.png")
    assert seen["text"] == ["lr 0.0001 -> 5e-05\nbatch 2 -> 8", "batch 8 -> 16"]
    assert seen["xlim"][0] == seen["xlim"][1] == seen["xlim"][2]          # the panels share the step axis



def test_plot_keeps_validations_with_other_settings_apart_and_legends_off_the_data(tmp_path, monkeypatch):
    """A validation appended with ``--set`` overrides is its own series, labelled with them, and the
    validation legends sit below their panels (outside the plotted area)."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from training.plot import plot_run
    rows = [{"step": s, "ang": -0.3, "lr": 1e-4} for s in range(10, 60, 10)]
    rows += [{"event": "validation", "step": s, "val/T45/reference/max_disp_pct": 20.0 + s / 10,
              "val/T45/reference/folding_pct": 0.5} for s in (0, 50)]
    rows += [{"event": "validation", "step": 50, "val_ema/T45/reference/max_disp_pct": 17.0,
              "val_ema/T45/reference/folding_pct": 0.4, "added_by": "validate",
              "overrides": ["validation.n_images=8", "validation.anatomy_fit=16"]}]
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    seen = {}

    def savefig(fig, *a, **k):
        ax = fig.axes[2]
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["anchor_y"] = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y0
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_run(log, tmp_path / "c.png", displacement_target=[8, 16])
    assert seen["labels"] == ["T45 reference", "T45 reference (weight average) [n_images=8 anatomy_fit=16]",
                              "target range"]
    assert seen["anchor_y"] < 0

# ------------------------------------------------------------------------ weight average (EMA)
def test_weight_average_update_rule_and_state_round_trip():
    from training.ema import WeightAverage, half_life
    net = torch.nn.Linear(3, 2)
    net.register_buffer("count", torch.tensor(0))
    avg = WeightAverage(net, 0.75)
    w0 = net.weight.detach().clone()
    assert not any(p.requires_grad for p in avg.module.parameters()) and not avg.module.training
    with torch.no_grad():
        net.weight.add_(1.0)
        net.count.fill_(5)
    avg.update(net)
    assert torch.allclose(avg.module.weight, w0 + 0.25) and int(avg.module.count) == 5 and avg.updates == 1
    assert torch.allclose(net.weight, w0 + 1.0)                   # the trained weights are untouched
    other = torch.nn.Linear(3, 2)
    other.register_buffer("count", torch.tensor(0))
    again = WeightAverage(other, 0.75)
    again.load_state_dict(avg.state_dict())
    assert torch.equal(again.module.weight, avg.module.weight) and again.updates == 1
    assert half_life(0.99) == pytest.approx(68.97, abs=0.01)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="ema_decay"):
            WeightAverage(net, bad)
    with pytest.raises(ValueError, match="ema_decay"):
        tiny(**{"train.ema_decay": 1.0})


def test_weight_average_trains_resumes_validates_and_exports(tmp_path):
    """With ``train.ema_decay`` the average is updated once per step, saved, resumed exactly,
    validated beside the trained weights and exported by default."""
    ema = {"train.ema_decay": 0.5}
    ref = tmp_path / "straight"
    train(tiny(**ema, **{"validation.at_end": "false"}), ref, echo=lambda *a: None)
    run = tmp_path / "split"
    train(tiny(**ema, **{"train.steps": 2}), run, echo=lambda *a: None)
    train(tiny(**ema, **{"validation.at_end": "false"}), run, resume=True, echo=lambda *a: None)
    a = load_training_checkpoint(latest_checkpoint(ref))
    b = load_training_checkpoint(latest_checkpoint(run))
    assert a["ema"]["updates"] == b["ema"]["updates"] == 4 and b["ema"]["decay"] == 0.5
    for k, v in a["ema"]["state"].items():
        assert torch.equal(v, b["ema"]["state"][k]), k
    assert any(not torch.equal(v, a["model"][k]) for k, v in a["ema"]["state"].items())
    vals = [r for r in _log(run) if r.get("event") == "validation"]
    assert [r["weights"] for r in vals] == ["raw", "ema"] and vals[1]["ema_updates"] == 2
    start = tmp_path / "start"
    train(tiny(**ema, **{"train.steps": 1, "validation.at_start": "true", "validation.weights": "raw",
                         "validation.at_end": "false"}), start, echo=lambda *a: None)
    assert [(r["step"], r["weights"]) for r in _log(start) if r.get("event") == "validation"] == [(0, "raw")]
    assert any(k.startswith("val/T5/") for k in vals[0]) and any(k.startswith("val_ema/T5/") for k in vals[1])
    assert np.isfinite(vals[1]["val_ema/T5/reference/folding_pct"])
    out, _ = export_run(ref, tmp_path / "avg.safetensors")
    state, _, prov = read_checkpoint(out)
    assert prov["weights"] == "ema" and prov["ema"] == {"decay": 0.5, "updates": 4}
    assert all(torch.equal(state[k], a["ema"]["state"][k]) for k in state)
    out, _ = export_run(ref, tmp_path / "raw.safetensors", weights="raw")
    state, _, prov = read_checkpoint(out)
    assert prov["weights"] == "raw" and prov["ema"] is None
    assert all(torch.equal(state[k], a["model"][k]) for k in state)


def test_validation_at_start_runs_once_while_the_average_is_the_weights(tmp_path, monkeypatch):
    """At step 0 the weight average is a copy of the weights: the "ema" record repeats the "raw"
    figures without a second run (minutes on a CPU); after updates both are run."""
    from training.evaluate_hook import Validator
    original, calls = Validator.run, []

    def counted(self, net, should_stop=None):
        calls.append(net)
        return original(self, net, should_stop=should_stop)
    monkeypatch.setattr(Validator, "run", counted)
    cfg = tiny(**{"train.ema_decay": 0.5, "validation.at_start": "true", "validation.weights": "auto",
                  "train.steps": 1})
    train(cfg, tmp_path / "run", echo=lambda *a: None)
    vals = [r for r in _log(tmp_path / "run") if r.get("event") == "validation"]
    assert [(r["step"], r["weights"]) for r in vals] == [(0, "raw"), (0, "ema"), (1, "raw"), (1, "ema")]
    assert len(calls) == 3                      # step 0 once, step 1 twice
    strip = lambda r, p: {k[len(p):]: v for k, v in r.items() if k.startswith(p)}   # noqa: E731
    assert strip(vals[0], "val/") == strip(vals[1], "val_ema/") and vals[1]["ema_updates"] == 0
    assert strip(vals[2], "val/") != strip(vals[3], "val_ema/")


def test_weight_average_switched_on_at_resume_and_export_errors(tmp_path, capsys):
    from training.__main__ import main
    run = tmp_path / "late"
    train(tiny(**{"train.steps": 2, "validation.at_end": "false"}), run, echo=lambda *a: None)
    said = []
    train(tiny(**{"train.ema_decay": 0.9, "validation.at_end": "false"}), run, resume=True,
          echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("weight average starts at step 2" in m for m in said), said
    assert load_training_checkpoint(latest_checkpoint(run))["ema"]["updates"] == 2
    plain_run = tmp_path / "plain"
    train(tiny(**{"train.steps": 1, "validation.at_end": "false"}), plain_run, echo=lambda *a: None)
    capsys.readouterr()
    assert main(["export", "--run", str(plain_run), "--out", str(tmp_path / "x.safetensors"),
                 "--weights", "ema"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no weight average" in err
    assert not (tmp_path / "x.safetensors").exists()
    missing = plain_run / "checkpoints" / "step_00000900.pt"
    for cmd in (["export", "--out", str(tmp_path / "x.safetensors")], ["validate"]):
        assert main(cmd + ["--run", str(plain_run), "--checkpoint", str(missing)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--checkpoint {missing}: no such file" in err, err


def test_validate_command_appends_rows_the_plot_reads(straight_run, tmp_path, capsys):
    """``python -m training validate``: a run's checkpoint or other weights on the run's validation,
    appended to its log when asked; bad input is one line."""
    import shutil

    from training.__main__ import main
    from training.plot import read_log
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    before = len(read_log(run / "train_log.jsonl"))
    export_run(run, tmp_path / "w.safetensors")
    assert main(["validate", "--run", str(run), "--weights-file", str(tmp_path / "w.safetensors"),
                 "--append", "--threads", "1", "--device", "cpu"]) == 0
    assert main(["validate", "--run", str(run), "--device", "cpu"]) == 0          # printed, not appended
    rows = read_log(run / "train_log.jsonl")
    assert len(rows) == before + 1
    row = rows[-1]
    assert (row["event"], row["weights"], row["step"], row["added_by"]) == ("validation", "external", 0, "validate")
    assert len(row["sha256"]) == 64 and np.isfinite(row["val/T5/reference/folding_pct"])
    capsys.readouterr()
    assert main(["validate", "--run", str(tmp_path / "nothing")]) == 2
    assert main(["validate", "--run", str(run), "--weights-file", "no_such_model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not a training run" in err[0] and "no_such_model" in err[1]
    # --set changes how the weights are judged (here: which loops), for this validation only
    config_before = (run / "config.yaml").read_bytes()
    assert main(["validate", "--run", str(run), "--append", "--device", "cpu", "--threads", "1",
                 "--set", "validation.schedules=[paper]", "--set", "validation.t_primes=[3]"]) == 0
    row = read_log(run / "train_log.jsonl")[-1]
    assert row["overrides"] == ["validation.schedules=[paper]", "validation.t_primes=[3]"]
    assert row["weights"] == "raw" and np.isfinite(row["val/T3/paper/folding_pct"])
    assert not any(k.startswith("val/T5/") or "/reference/" in k for k in row)
    assert (run / "config.yaml").read_bytes() == config_before
    capsys.readouterr()
    assert main(["validate", "--run", str(run), "--set", "optim.lr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.lr=1" in err and "validation." in err


def test_validate_can_judge_the_weights_with_more_recursions(straight_run, monkeypatch):
    """``--set model.k_recursions=3``: the same weights, each estimate (reverse steps and loss)
    made of three single passes instead of two; recorded as an override."""
    from training.export import validate_run
    calls = []
    original = DRDMNet.forward

    def counting(self, x, t, k=2):
        calls.append(int(k))
        return original(self, x, t, k)
    monkeypatch.setattr(DRDMNet, "forward", counting)
    sets = ["validation.t_primes=[3]", "validation.schedules=[paper]"]
    rows = {}
    for k in (2, 3):
        calls.clear()
        rows[k] = validate_run(straight_run, None, None, "raw", sets=[*sets, f"model.k_recursions={k}"],
                               device="cpu", log=lambda m: None)
        rows[k]["passes"] = sum(calls)
    assert rows[2]["passes"] > 0 and rows[3]["passes"] * 2 == rows[2]["passes"] * 3
    assert rows[3]["overrides"][-1] == "model.k_recursions=3"
    assert rows[2]["val/T3/paper/folding_pct"] >= 0 and rows[3]["val/T3/paper/max_disp_pct"] != \
        rows[2]["val/T3/paper/max_disp_pct"]


def test_select_ranks_checkpoints_on_the_validation(straight_run, tmp_path, capsys):
    """``python -m training select``: each checkpoint validated (its weights, with the --set
    overrides), ranked by one figure, lowest first; bad input is one line, nothing overwritten."""
    import shutil

    from training.__main__ import main
    from training.export import validate_run
    from training.plot import read_log
    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    steps = sorted(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))
    assert len(steps) >= 2
    before = len(read_log(run / "train_log.jsonl"))
    out = tmp_path / "rank.json"
    sets = ["--set", "validation.t_primes=[3]", "--set", "validation.schedules=[paper]"]
    assert main(["select", "--run", str(run), "--steps", *map(str, steps), "--by", "T3/paper/max_disp_pct",
                 "--weights", "raw", "--device", "cpu", "--threads", "1", "--append", "--json", str(out), *sets]) == 0
    res = json.loads(out.read_text())
    values = [r["value"] for r in res["ranking"]]
    assert values == sorted(values) and sorted(r["step"] for r in res["ranking"]) == steps
    assert res["best"] == res["ranking"][0]["checkpoint"] and res["overrides"] == sets[1::2]
    one = validate_run(run, None, res["best"], "raw", sets=sets[1::2], device="cpu", log=lambda m: None)
    assert one["val/T3/paper/max_disp_pct"] == pytest.approx(values[0], abs=1e-9)
    assert len(read_log(run / "train_log.jsonl")) == before + len(steps)
    assert "ranked by T3/paper/max_disp_pct" in capsys.readouterr().out
    for argv, msg in ((["--steps", "999"], "step_00000999.pt: no such checkpoint"),
                      ([], "select needs --steps or --checkpoints"),
                      (["--steps", str(steps[0]), "--by", "nope"], "--by 'nope' is not a validation figure here"),
                      (["--steps", str(steps[0]), "--json", str(out)], "exists")):
        assert main(["select", "--run", str(run), "--device", "cpu", "--weights", "raw", *argv, *sets]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err

def test_cued_validation_copy_is_fixed_and_logged_beside_the_clean_images():
    """``validation.cues``: a cued copy of the validation images (here a dark frame), the same on
    every construction, recovered from the clean copy's forward fields; the clean figures do not
    change when it is switched on, and the forward field is logged once."""
    from training.evaluate_hook import Validator
    cfg = tiny(**{"validation.schedules": "[reference]"})
    mcfg = model_config(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(60, 255, (3, 32, 32)).astype(np.uint8)      # anatomy up to the edges
    torch.manual_seed(0)
    net = DRDMNet.from_config(mcfg).eval()

    def validator(cues):
        v = dict(cfg["validation"], cues=cues)
        return Validator(mcfg, images, v, cfg["loss"], torch.device("cpu"))
    plain, cued, again = validator({}), validator({"p_zoom_out": 1.0, "zoom_out_min": 0.6}), validator(
        {"p_zoom_out": 1.0, "zoom_out_min": 0.6})
    assert plain.cued is None and torch.equal(cued.cued, again.cued)
    assert torch.equal(cued.images, plain.images)
    # the shrunk content leaves a dark frame (this seed draws a factor near 0.87: 23 % of the pixels)
    assert (plain.images == 0).sum() == 0 and (cued.cued == 0).float().mean() > 0.15
    a, b = plain.run(net), cued.run(net)
    assert {k: v for k, v in b.items() if "/cues/" not in k} == a
    extra = sorted(k for k in b if "/cues/" in k)
    assert extra == [f"val/T5/cues/reference/{m}" for m in ("folding_pct", "max_disp_pct", "mean_disp_pct")]
    assert all(np.isfinite(b[k]) for k in extra)


def test_validation_recovers_with_the_engines_anatomy_fit_and_background_margin():
    """``validation.anatomy_fit`` / ``background_margin``: the recovered field is the one the engine
    returns with the inference options of the same names (``DRDM.generate_model_grid``) from the
    same forward draw, and both options change it on an anatomy that sits small in a dark view."""
    from napari_drdm.model import DRDM
    from training.evaluate_hook import Validator
    cfg = tiny(**{"validation.schedules": "[reference]"})
    mcfg = model_config(cfg)
    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 14) ** 2 + (xx - 17) ** 2 <= 36) * (170 + 60 * ((yy + xx) % 3 == 0))   # dark around it
    images = np.stack([disc, np.roll(disc, 5, axis=1)]).astype(np.uint8)
    torch.manual_seed(0)
    net = DRDMNet.from_config(mcfg).eval()
    engine = DRDM(net, mcfg, device="cpu", fast=False)
    seeds = [3, 4]
    fwd = engine.sampler.sample(5, batch=2, draws=engine._seeded_draws(seeds), return_step=False).forward_ddf
    fields = {}
    for fit, margin in [(None, None), (4, None), (4, 2)]:
        v = Validator(mcfg, images, dict(cfg["validation"], n_images=2, anatomy_fit=fit, background_margin=margin),
                      cfg["loss"], torch.device("cpu"))
        with torch.no_grad():
            fields[fit, margin] = v._recover(v._net(net), v.images, fwd, 5, "reference")
        phi, _ = engine.generate_model_grid(v.images, 5, seeds, schedule="reference",
                                            anatomy_fit=fit if fit is not None else "off",
                                            background_margin=margin if margin is not None else "off")
        torch.testing.assert_close(fields[fit, margin], phi, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fields[None, None], fields[4, None], atol=1e-3)
    assert not torch.allclose(fields[4, None], fields[4, 2], atol=1e-3)


@pytest.mark.parametrize("key,value", [("anatomy_fit", "-1"), ("background_margin", "2.5"),
                                       ("anatomy_fit", "true")])
def test_validation_view_options_are_checked(key, value):
    with pytest.raises(ValueError, match=f"validation.{key} must be a whole number of pixels"):
        tiny(**{f"validation.{key}": value})
    with pytest.raises(ValueError, match="^validation.keep_size must be 'on', 'off' or 'inflation', got 'maybe'$"):
        tiny(**{"validation.keep_size": "maybe"})


def test_validation_takes_the_zoom_out_as_the_engine_does():
    """``validation.keep_size``: the recovered field is the engine's with the option of that name."""
    from napari_drdm.model import DRDM
    from training.evaluate_hook import Validator
    cfg = tiny(**{"validation.schedules": "[reference]"})
    mcfg = model_config(cfg)
    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 14) ** 2 + (xx - 17) ** 2 <= 49) * (170 + 60 * ((yy + xx) % 3 == 0))
    images = disc[None].astype(np.uint8)
    torch.manual_seed(0)
    net = DRDMNet.from_config(mcfg).eval()
    engine = DRDM(net, mcfg, device="cpu", fast=False)
    fwd = engine.sampler.sample(5, batch=1, draws=engine._seeded_draws([3]), return_step=False).forward_ddf
    for keep in (True, "inflation"):
        v = Validator(mcfg, images, dict(cfg["validation"], n_images=1, anatomy_fit=4, keep_size=keep),
                      cfg["loss"], torch.device("cpu"))
        with torch.no_grad():
            got = v._recover(v._net(net), v.images, fwd, 5, "reference")
        phi, _ = engine.generate_model_grid(v.images, 5, [3], schedule="reference", anatomy_fit=4,
                                            background_margin="off", keep_size=keep)
        torch.testing.assert_close(got, phi, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("value,match", [
    ("[1]", "validation.cues must be a mapping"),
    ("{p_dark: 1}", "validation.cues: unknown keys \\['p_dark'\\]"),
    ("{p_cut: 2}", "validation.cues: augment.p_cut must be a probability"),
])
def test_validation_cues_are_checked(value, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{"validation.cues": value})


def test_train_step_benchmark_times_every_arm(capsys):
    """benchmarks/train_step.py on the tiny configuration: one table row per part, one column per
    arm (float32 default, channels-last, channels-last under CPU bf16 autocast)."""
    from benchmarks.train_step import main as bench
    assert bench(["--config", str(CONFIGS / "tiny.yaml"), "--steps", "1", "--bf16"]) == 0
    out = capsys.readouterr().out
    head = next(ln for ln in out.splitlines() if ln.startswith("| part |"))
    assert "channels_last_bf16 s" in head and "default / channels_last_bf16" in head
    step = next(ln for ln in out.splitlines() if ln.startswith("| step |"))
    cells = [c.strip() for c in step.strip("|").split("|")]
    assert len(cells) == 6 and all(float(c) > 0 for c in cells[1:])
    with pytest.raises(SystemExit):
        bench(["--config", str(CONFIGS / "tiny.yaml"), "--steps", "0"])


def test_train_step_benchmark_profiles_by_operator_and_names_a_bad_device(capsys):
    """``--profile N`` prints the operators of N whole steps, the convolutions among the costliest;
    an unusable ``--device`` is one line naming it."""
    from benchmarks.train_step import main as bench
    tiny_cfg = str(CONFIGS / "tiny.yaml")
    assert bench(["--config", tiny_cfg, "--steps", "1", "--profile", "1", "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert "CPU thread(s)" in out.splitlines()[0]
    prof = out[out.index("profile: 1 step(s)"):]
    top = [ln.split()[0] for ln in prof.splitlines() if ln.startswith(" ") and "aten::" in ln][:5]
    assert any("convolution" in name for name in top), prof
    for device, expected in (("tpu", "expected cpu, cuda"), ("cuda:x", "expected cpu, cuda")):
        with pytest.raises(SystemExit) as e:
            bench(["--config", tiny_cfg, "--device", device])
        assert expected in str(e.value) and device in str(e.value) and "\n" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            bench(["--config", tiny_cfg, "--device", "cuda"])
        assert "no CUDA device" in str(e.value)
    with pytest.raises(SystemExit):
        bench(["--config", tiny_cfg, "--profile", "-1"])


def test_compact_checkpoint_keeps_the_run_resumable_with_its_average(tmp_path, capsys):
    """``python -m training compact``: the average in float16, everything else exact; a run resumed
    from the compact copy trains the same weights and continues its average (rounded once)."""
    import shutil

    from training.__main__ import main
    ema = {"train.ema_decay": 0.5, "validation.at_end": "false"}
    ref = tmp_path / "straight"
    train(tiny(**ema), ref, echo=lambda *a: None)
    run = tmp_path / "run"
    train(tiny(**ema, **{"train.steps": 2}), run, echo=lambda *a: None)
    src = latest_checkpoint(run)
    packed = tmp_path / "repo" / src.name
    assert main(["compact", "--checkpoint", str(src), "--out", str(packed)]) == 0
    assert "stored in float16" in capsys.readouterr().out
    assert packed.stat().st_size < src.stat().st_size
    small, full = load_training_checkpoint(packed), load_training_checkpoint(src)
    assert small["ema"]["stored_dtype"] == "float16" and small["ema"]["updates"] == 2
    assert all(v.dtype == torch.float16 for v in small["ema"]["state"].values() if v.is_floating_point())
    assert all(torch.equal(v, full["model"][k]) for k, v in small["model"].items())
    # a fresh machine: only the committed copy
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", fresh / "config.yaml")
    shutil.copy(packed, fresh / "checkpoints" / packed.name)
    said = []
    train(tiny(**ema), fresh, resume=True, echo=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("from its float16 copy" in m for m in said), said
    a, b = load_training_checkpoint(latest_checkpoint(ref)), load_training_checkpoint(latest_checkpoint(fresh))
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())      # training: bit for bit
    assert b["ema"]["updates"] == 4 and "stored_dtype" not in b["ema"]
    for k, v in a["ema"]["state"].items():
        if v.is_floating_point():
            assert b["ema"]["state"][k].dtype == torch.float32
            assert torch.allclose(v, b["ema"]["state"][k], rtol=2e-3, atol=1e-6), k
    capsys.readouterr()
    assert main(["compact", "--checkpoint", str(src), "--out", str(packed)]) == 2      # never overwritten silently
    assert main(["compact", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "exists" in err[0] and "none.pt" in err[1]


def test_bundle_registers_an_export_moves_the_default_and_refuses_clashes(straight_run, tmp_path, tiny_checkpoint,
                                                                           capsys):
    """`python -m training bundle`: copies an export into a weights folder, writes its registry
    entry from the file's own provenance, moves the default of its dimensionality only when asked,
    and refuses (one line, nothing changed) a taken name or alias, a bad name, a missing file."""
    from napari_drdm.checkpoint import file_sha256 as sha
    from training.__main__ import main
    from training.bundle import bundle_weights
    wdir = tmp_path / "weights"
    wdir.mkdir()
    old = tiny_checkpoint(2, 32, path=wdir / "old2d.safetensors")
    reg0 = {"old2d": {"file": "old2d.safetensors", "sha256": sha(old), "ndim": 2, "size": 32,
                      "description": "x", "aliases": ["legacy"], "provenance": {}, "default_for_ndim": 2}}
    (wdir / "registry.json").write_text(json.dumps(reg0))
    out, _ = export_run(straight_run, tmp_path / "exp.safetensors")
    e = bundle_weights(out, "new2d", "a tiny model", aliases=["fresh"], weights_dir=wdir, log=lambda *a: None)
    reg = json.loads((wdir / "registry.json").read_text())
    assert list(reg) == ["old2d", "new2d"] and reg["new2d"] == e and reg["old2d"]["default_for_ndim"] == 2
    assert e["sha256"] == sha(out) == sha(wdir / "new2d.safetensors") and (e["ndim"], e["size"]) == (2, 32)
    p = e["provenance"]
    assert p["steps"] == 4 and p["command"] == "test straight" and len(p["data_sha256"]) == 64
    assert "default_for_ndim" not in e
    before = (wdir / "registry.json").read_text()
    for kw, msg in ((dict(name="new2d"), "already bundled.*--replace"),
                    (dict(name="other", aliases=["legacy"]), "'legacy' is already a name or alias of .*'old2d'"),
                    (dict(name="Bad-Name"), "lower case letters"),
                    (dict(name="x", description=" "), "--description")):
        args = dict(dict(weights=out, name="z", description="d", weights_dir=wdir, log=lambda *a: None), **kw)
        with pytest.raises(ValueError, match=msg):
            bundle_weights(**args)
    assert (wdir / "registry.json").read_text() == before and not (wdir / "other.safetensors").exists()
    bundle_weights(out, "new2d", "again", default=True, replace=True, weights_dir=wdir, log=lambda *a: None)
    reg = json.loads((wdir / "registry.json").read_text())
    assert reg["new2d"]["default_for_ndim"] == 2 and "default_for_ndim" not in reg["old2d"]
    assert reg["new2d"]["description"] == "again" and reg["new2d"]["aliases"] == []
    assert main(["bundle", "--weights", str(tmp_path / "none.safetensors"), "--name", "q", "--description", "d",
                 "--weights-dir", str(wdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err


def test_prepare_subsamples_training_images_to_max_mb(tmp_path, capsys):
    cfg = tiny(**{"data.prepared": str(tmp_path / "full.npz"), "data.n_synthetic": 64})
    full = Path(prepare(cfg, log=lambda *a: None)).stat().st_size
    cfg = tiny(**{"data.prepared": str(tmp_path / "sub.npz"), "data.n_synthetic": 64, "data.max_mb": full * 0.5e-6})
    lines = []
    path = prepare(cfg, log=lines.append)
    info = json.loads(Path(path + ".json").read_text())
    assert Path(path).stat().st_size <= full * 0.5 and info["subsample"]["before"] == 64
    assert 2 <= info["subsample"]["stride"] <= 8 and load_prepared(path)["val"].shape[0] == 8   # val kept whole
    assert any("subsampled train 64 ->" in line for line in lines)
    # a limit below what the validation images alone take fails at once, in one line, leaving nothing
    cfg = tiny(**{"data.prepared": str(tmp_path / "none.npz"), "data.n_synthetic": 64, "data.max_mb": 1e-4})
    with pytest.raises(ValueError, match=r"data.max_mb=0.0001: the validation images alone take"):
        prepare(cfg, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.npz", "full.npz.json", "sub.npz", "sub.npz.json"]
    from training.__main__ import main
    assert main(["prepare", "--config", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "cli.npz"),
                 "--set", "data.n_synthetic=64", "--set", "data.max_mb=0.0001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.max_mb=0.0001") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli.npz").exists()
