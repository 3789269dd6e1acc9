"""``background_margin`` as a model setting and an inference option (None: the model's own, "off":
none): the field in empty background replaced by its harmonic extension (core/background.py) at
the end of the reverse loop.  The configuration, the Python API (frames included), ``drdm
generate`` / ``evaluate``, the export (manifest, resume, reproduction) and the transform.  Tiny
random 2D checkpoints (S = 32) whose own margin is 4."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import labelled_cases, one_line

from napari_drdm.cli import main
from napari_drdm.core.background import extend_into_background
from napari_drdm.core.config import DRDMConfig, check_background_margin
from napari_drdm.errors import InputError
from napari_drdm.export import ExportOptions, load_manifest, reproduce_row
from napari_drdm.model import load_model, resolve_background_margin
from napari_drdm.validate import check_background_margin_option


@pytest.fixture(scope="module")
def bg4(tiny_checkpoint):
    """A tiny 2D model (S = 32) that stores background margin 4."""
    return tiny_checkpoint(2, 32, name="bg4", background_margin=4)


def _blob(shape=(32, 32), seed=0):
    """A bright disc (radius a third of the side) in a dark frame: the corners are empty background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 3) ** 2
    return (disc * 100.0 + np.abs(rng.normal(0, 1, shape))).astype(np.float32), disc.astype(np.uint8)


def test_config_rule_and_option_validator():
    assert check_background_margin(None, 32) is None and check_background_margin(15, 32) == 15
    for bad in (16, -1, 2.5, "4", True):
        with pytest.raises(InputError, match="^background_margin must be None"):
            check_background_margin(bad, 32)
    with pytest.raises(ValueError, match="background_margin"):
        DRDMConfig(size=32, background_margin=16)
    cfg = DRDMConfig(size=32, background_margin=4)
    assert DRDMConfig.from_dict(json.loads(cfg.to_json())).background_margin == 4
    assert DRDMConfig.from_dict({"size": 32}).background_margin is None        # older files: off
    assert [check_background_margin_option(v) for v in (None, "off", " OFF ", 0, "8", 12.0)] == \
        [None, "off", "off", 0, 8, 12]
    for bad, size in ((-1, None), ("x", None), (2.5, None), (True, None), (16, 32)):
        with pytest.raises(InputError) as e:
            check_background_margin_option(bad, size)
        assert one_line(str(e.value)).startswith("--background-margin: expected 'off' or a whole number of pixels")
    with pytest.raises(InputError, match=r"below S/2 = 16 \(the model's side S = 32\), got 16$"):
        check_background_margin_option(16, 32)
    own = DRDMConfig(size=32, background_margin=4)
    assert [resolve_background_margin(v, own) for v in (None, "off", 0, 8)] == [4, None, 0, 8]
    assert resolve_background_margin(None, DRDMConfig(size=32)) is None


def test_python_api_extends_the_final_field_and_its_last_frame(bg4):
    model = load_model(bg4, device="cpu")
    assert model.config.background_margin == 4
    img, _ = _blob()
    kw = dict(t_prime=3, seed=5, schedule="paper", fold_guard=False)
    own = model.generate(img, return_frames=True, **kw)
    off = model.generate(img, return_frames=True, background_margin="off", **kw)
    assert own.background_margin == 4 and off.background_margin is None
    assert off.background_replaced_pct == 0.0 and 0 < own.background_replaced_pct < 100
    # the model grid: the same forward draw and loop, then the extension of the loop's field
    x = model.prepare(img)[1]
    report = {}
    phi_own, _ = model.generate_model_grid(x, 3, [5], schedule="paper", background_report=report)
    phi_off, _ = model.generate_model_grid(x, 3, [5], schedule="paper", background_margin="off")
    expected, free = extend_into_background(phi_off, x, 4, image_interp=model.config.image_interp)
    torch.testing.assert_close(phi_own, expected)
    assert report["margin"] == 4 and report["replaced_pct"] == [pytest.approx(100.0 * float(free.float().mean()))]
    assert bool(free.any()) and float((phi_own - phi_off).abs()[free.expand_as(phi_off)].max()) > 1e-4
    assert float((phi_own - phi_off).abs()[~free.expand_as(phi_off)].max()) == 0.0   # the anatomy's field kept
    # the frames: the same count; only the last recovery frame differs, and it is the result
    assert [(f.phase, f.index) for f in own.frames] == [(f.phase, f.index) for f in off.frames]
    for a, b in zip(own.frames[:-1], off.frames[:-1]):
        np.testing.assert_array_equal(a.ddf, b.ddf)
    assert own.frames[-1].phase == "recovery"
    np.testing.assert_array_equal(own.frames[-1].ddf, own.ddf)
    assert not np.array_equal(own.frames[-1].ddf, off.frames[-1].ddf)
    assert own.frames[-1].background == {"margin": 4, "replaced_pct": own.background_replaced_pct}
    assert all(f.background is None for f in own.frames[:-1] + off.frames)
    # an explicit margin equal to the model's is the model's; a bad one is one line naming it
    np.testing.assert_array_equal(model.generate(img, background_margin=4, **kw).ddf, own.ddf)
    for bad in (16, -1, "none"):
        with pytest.raises(InputError) as e:
            model.generate(img, t_prime=1, background_margin=bad)
        assert one_line(str(e.value)).startswith("background_margin: expected 'off' or a whole number")
        with pytest.raises(InputError, match="^background_margin: "):
            model.generate_model_grid(x, 1, [0], background_margin=bad)


def test_cli_generate_and_evaluate_record_the_margin_used(tmp_path, bg4, capsys):
    img, _ = _blob()
    np.save(tmp_path / "im.npy", img)
    base = ["generate", str(tmp_path / "im.npy"), "--weights", bg4, "--t-prime", "2", "--schedule", "paper",
            "--seed", "3", "--no-fold-guard"]
    assert main(base + ["--out", str(tmp_path / "own")]) == 0
    assert "background_margin=4px (" in capsys.readouterr().out
    assert main(base + ["--background-margin", "off", "--out", str(tmp_path / "off")]) == 0
    assert "background_margin=off" in capsys.readouterr().out
    side = {d: json.loads((tmp_path / d / "im.json").read_text()) for d in ("own", "off")}
    assert side["own"]["background_margin"] == 4 and side["own"]["background_replaced_pct"] > 0
    assert side["off"]["background_margin"] is None and side["off"]["background_replaced_pct"] == 0
    with pytest.raises(SystemExit) as e:                      # refused while parsing: nothing written
        main(base + ["--background-margin", "-2", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--background-margin: expected 'off'" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()
    assert main(base + ["--background-margin", "16", "--out", str(tmp_path / "y")]) == 1   # the model's S/2
    assert "below S/2 = 16" in one_line(capsys.readouterr().err)
    npz = tmp_path / "s.npz"
    np.savez(npz, images=img[None])
    ev = ["evaluate", "--weights", bg4, "--images", str(npz), "--t-prime", "2", "--samples", "1",
          "--schedule", "paper", "--json"]
    assert main(ev) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(ev + ["--background-margin", "off"]) == 0
    off = json.loads(capsys.readouterr().out)
    assert own["background_margin"] == 4 and off["background_margin"] is None
    assert own["results"][0]["generations"][0]["background_replaced_pct"] > 0
    assert off["results"][0]["generations"][0]["background_replaced_pct"] == 0


def test_export_records_resumes_and_reproduces_the_margin(tmp_path, bg4, capsys):
    src = labelled_cases(tmp_path, _blob)
    own, off = tmp_path / "own", tmp_path / "off"
    opts = ["-n", "1", "--t-prime", "2", "--schedule", "paper", "--weights", bg4, "--batch", "1", "--no-progress"]
    assert main(["augment", str(src), str(own)] + opts) == 0
    assert main(["augment", str(src), str(off)] + opts + ["--background-margin", "off"]) == 0
    a, b = load_manifest(own), load_manifest(off)
    assert {r["background_margin"] for r in a["rows"]} == {4}              # the model's own, resolved
    assert {r["background_margin"] for r in b["rows"]} == {"off"}
    assert a["run"]["background_margin"] is None and b["run"]["background_margin"] == "off"
    header = (off / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header.index("background_margin") == header.index("input_padding") + 1
    rows_a, rows_b = ({r["row_id"]: r for r in m["rows"]} for m in (a, b))
    assert all(rows_a[k]["ddf_sha256"] != rows_b[k]["ddf_sha256"] for k in rows_a)
    for folder in (own, off):
        res = reproduce_row(folder / "manifest.json", "case0_aug000", tmp_path / f"again_{folder.name}")
        assert all(res["identical"].values()), res
    capsys.readouterr()
    assert main(["augment", str(src), str(off)] + opts + ["--resume"]) == 1
    assert "different settings (background_margin)" in one_line(capsys.readouterr().err)
    assert main(["augment", str(src), str(own)] + opts + ["--background-margin", "4", "--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out
    assert json.loads((own / "run.json").read_text())["model_defaults"]["background_margin"] == 4
    assert main(["augment", str(src), str(own)] + opts + ["--background-margin", "2", "--resume"]) == 1
    assert "different settings (background_margin)" in capsys.readouterr().err
    with pytest.raises(InputError, match="^--background-margin: expected 'off'"):
        ExportOptions(background_margin="none").validate()
    assert ExportOptions(background_margin="8").validate().background_margin == 8
    out = tmp_path / "refused"
    assert main(["augment", str(src), str(out)] + opts + ["--background-margin", "16"]) == 1
    assert "below S/2 = 16" in one_line(capsys.readouterr().err)
    assert not [f.name for f in out.iterdir() if not f.name.startswith(".drdm")]   # refused before any work


def test_export_of_a_model_without_a_margin_treats_off_as_its_own(tmp_path, tiny_checkpoint, capsys):
    plain = tiny_checkpoint(2, 32, name="plain")
    src = labelled_cases(tmp_path, _blob)
    out = tmp_path / "o"
    opts = ["-n", "1", "--t-prime", "1", "--schedule", "paper", "--weights", plain, "--batch", "2", "--no-progress"]
    assert main(["augment", str(src), str(out)] + opts) == 0
    assert {r["background_margin"] for r in load_manifest(out)["rows"]} == {"off"}
    assert main(["augment", str(src), str(out)] + opts + ["--background-margin", "off", "--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out


def test_transform_background_margin(bg4):
    from napari_drdm.transforms import DRDMTransform
    img, _ = _blob()
    data = {"image": img[None]}
    t_off, t_own = (DRDMTransform(bg4, label_keys=(), t_prime="2", schedule="paper", ddf_key="ddf", seed=1,
                                  background_margin=m) for m in ("off", None))
    assert t_off.background_margin == "off" and t_own.background_margin is None
    assert not np.array_equal(t_off(data)["ddf"], t_own(data)["ddf"])
    with pytest.raises(InputError, match="^background_margin: expected 'off'"):
        DRDMTransform(bg4, background_margin=-3)
    with pytest.raises(InputError, match=r"S/2 = 16"):                    # a model given: its side bounds it
        DRDMTransform(load_model(bg4, device="cpu"), background_margin=16)


def test_3d_model_extends_its_background(tiny_checkpoint):
    """A 3D model with a margin: the field changes only in the empty background, as in 2D."""
    ckpt = tiny_checkpoint(3, 16, name="bg3d", background_margin=2)
    model = load_model(ckpt, device="cpu")
    zz, yy, xx = np.mgrid[:16, :16, :16]
    vol = (((zz - 8) ** 2 + (yy - 8) ** 2 + (xx - 8) ** 2) < 16).astype(np.float32) * 50.0
    x = model.prepare(vol)[1]
    report = {}
    own, _ = model.generate_model_grid(x, 2, [1], schedule="paper", background_report=report)
    off, _ = model.generate_model_grid(x, 2, [1], schedule="paper", background_margin="off")
    expected, free = extend_into_background(off, x, 2, image_interp=model.config.image_interp)
    torch.testing.assert_close(own, expected)
    assert 0 < report["replaced_pct"][0] < 100 and bool(free.any())
    assert float((own - off).abs()[~free.expand_as(off)].max()) == 0.0
