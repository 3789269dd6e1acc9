"""``input_padding`` as an inference option (None: the model's own), like ``compose_padding``: the
Python API, ``--input-padding`` on the command line, the export (manifest, resume, reproduction)
and the transform.  Tiny random 2D checkpoints (S = 32) whose own input padding is 8."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import labelled_cases, one_line

from napari_drdm.cli import main
from napari_drdm.errors import InputError
from napari_drdm.export import ExportOptions, load_manifest, reproduce_row
from napari_drdm.model import load_model
from napari_drdm.outputs import nifti_array_to_ddf
from napari_drdm.validate import check_input_padding_option


@pytest.fixture(scope="module")
def pad8(tiny_checkpoint):
    """A tiny 2D model (S = 32) that stores input padding 8."""
    return tiny_checkpoint(2, 32, name="pad8", input_padding=8)


def _blob(shape=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 3) ** 2
    return (disc * 100.0 + rng.normal(0, 5, shape)).astype(np.float32), disc.astype(np.uint8)


def test_validator_names_the_option_and_what_was_expected():
    assert [check_input_padding_option(v) for v in (None, 0, "8", 12.0, 64)] == [None, 0, 8, 12, 64]
    assert check_input_padding_option(12, 32) == 12
    for bad, size in ((6, None), (-4, None), ("x", None), (2.5, None), (True, None), (16, 32), (20, 32)):
        with pytest.raises(InputError) as e:
            check_input_padding_option(bad, size)
        msg = one_line(str(e.value))
        assert msg.startswith("--input-padding: expected a multiple of 4 pixels from 0 to below"), msg
    with pytest.raises(InputError, match=r"below S/2 = 16 \(the model's side S = 32\), got 16$"):
        check_input_padding_option(16, 32)


def test_python_api_override_reaches_recover_and_is_recorded(pad8, monkeypatch):
    import napari_drdm.model as model_mod
    from napari_drdm.core.recovery import recover

    model = load_model(pad8, device="cpu")
    assert model.config.input_padding == 8
    seen = []

    def spy(*a, **kw):
        seen.append(kw["input_padding"])
        return recover(*a, **kw)
    monkeypatch.setattr(model_mod, "recover", spy)
    img, _ = _blob()
    fields = {}
    for asked, used in ((None, 8), (0, 0), (4, 4), (8, 8)):
        res = model.generate(img, t_prime=2, seed=3, schedule="paper", input_padding=asked)
        assert seen[-1] == used and res.input_padding == used
        fields[asked] = res.ddf
    gen = model.iter_generate(img, t_prime=1, schedule="paper", input_padding=0)
    list(gen)
    assert seen[-1] == 0
    x = model.prepare(img)[1]
    model.generate_model_grid(x, 2, [3], schedule="paper", input_padding=4)
    assert seen[-1] == 4
    monkeypatch.undo()
    np.testing.assert_array_equal(fields[None], fields[8])                 # None: the model's own
    assert np.abs(fields[None] - fields[0]).max() > 1e-3                   # the mirrored frame changes the field
    for bad in (6, 16, -4):
        with pytest.raises(InputError) as e:
            model.generate(img, t_prime=1, input_padding=bad)
        assert one_line(str(e.value)).startswith("input_padding: expected a multiple of 4")
        with pytest.raises(InputError, match="^input_padding: "):
            model.generate_model_grid(x, 1, [0], input_padding=bad)


def test_cli_generate_input_padding(tmp_path, pad8, capsys):
    img, _ = _blob()
    np.save(tmp_path / "im.npy", img)
    base = ["generate", str(tmp_path / "im.npy"), "--weights", pad8, "--t-prime", "2", "--schedule", "paper",
            "--seed", "3", "--no-fold-guard"]
    assert main(base + ["--out", str(tmp_path / "own")]) == 0
    assert "input_padding=8px" in capsys.readouterr().out
    assert main(base + ["--input-padding", "0", "--out", str(tmp_path / "p0")]) == 0
    assert "input_padding=0px" in capsys.readouterr().out
    side = {d: json.loads((tmp_path / d / "im.json").read_text()) for d in ("own", "p0")}
    assert side["own"]["input_padding"] == 8 and side["p0"]["input_padding"] == 0
    ddf = {d: nifti_array_to_ddf(np.asarray(nib.load(str(tmp_path / d / "im_ddf.nii.gz")).dataobj), (1.0, 1.0))
           for d in ("own", "p0")}
    assert np.abs(ddf["own"] - ddf["p0"]).max() > 1e-3                    # the option reached the generation
    res = load_model(pad8, device="cpu").generate(img, t_prime=2, seed=3, schedule="paper", input_padding=0)
    np.testing.assert_allclose(ddf["p0"], res.ddf, rtol=1e-5, atol=1e-5)  # = the Python API's (spacing 1: mm = px)
    # a bad value: one line naming the option, refused while parsing (nothing written) ...
    with pytest.raises(SystemExit) as e:
        main(base + ["--input-padding", "6", "--out", str(tmp_path / "x")])
    err = one_line(capsys.readouterr().err)
    assert e.value.code == 2 and "--input-padding: expected a multiple of 4" in err and "got 6" in err
    assert not (tmp_path / "x").exists()
    # ... or, out of the loaded model's range, before any generation
    assert main(base + ["--input-padding", "16", "--out", str(tmp_path / "y")]) == 1
    err = one_line(capsys.readouterr().err)
    assert "--input-padding: expected a multiple of 4 pixels from 0 to below S/2 = 16" in err
    assert not (tmp_path / "y" / "im.json").exists()


def test_cli_evaluate_records_the_input_padding_used(tmp_path, pad8, capsys):
    img, _ = _blob()
    npz = tmp_path / "s.npz"
    np.savez(npz, images=img[None])
    base = ["evaluate", "--weights", pad8, "--images", str(npz), "--t-prime", "2", "--samples", "1",
            "--schedule", "paper", "--json"]
    assert main(base) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(base + ["--input-padding", "0"]) == 0
    p0 = json.loads(capsys.readouterr().out)
    assert own["input_padding"] == 8 and p0["input_padding"] == 0
    assert own["results"][0]["max_disp_pct"] != p0["results"][0]["max_disp_pct"]
    assert main(base + ["--input-padding", "32"]) == 1
    assert "--input-padding: expected" in one_line(capsys.readouterr().err)


def test_export_records_resumes_and_reproduces_the_input_padding(tmp_path, pad8, capsys):
    src = labelled_cases(tmp_path, _blob)
    own, p0 = tmp_path / "own", tmp_path / "p0"
    opts = ["-n", "1", "--t-prime", "2", "--schedule", "paper", "--weights", pad8, "--batch", "1", "--no-progress"]
    assert main(["augment", str(src), str(own)] + opts) == 0
    assert main(["augment", str(src), str(p0)] + opts + ["--input-padding", "0"]) == 0
    a, b = load_manifest(own), load_manifest(p0)
    assert {r["input_padding"] for r in a["rows"]} == {8}                 # the model's own, resolved
    assert {r["input_padding"] for r in b["rows"]} == {0}
    assert a["run"]["input_padding"] is None and b["run"]["input_padding"] == 0
    header = (p0 / "manifest.csv").read_text().splitlines()[0].split(",")
    assert header.index("input_padding") == header.index("compose_padding") + 1
    rows_a, rows_b = ({r["row_id"]: r for r in m["rows"]} for m in (a, b))
    assert all(rows_a[k]["ddf_sha256"] != rows_b[k]["ddf_sha256"] for k in rows_a)
    res = reproduce_row(p0 / "manifest.json", "case0_aug000", tmp_path / "again")
    assert all(res["identical"].values()), res
    capsys.readouterr()
    # another input padding: --resume refuses, naming the setting
    assert main(["augment", str(src), str(p0)] + opts + ["--resume"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "different settings (input_padding)" in err and "--resume needs the same settings" in err
    assert main(["augment", str(src), str(p0)] + opts + ["--input-padding", "4", "--resume"]) == 1
    assert "different settings (input_padding)" in capsys.readouterr().err
    assert main(["augment", str(src), str(p0)] + opts + ["--input-padding", "0", "--resume"]) == 0
    # a run.json written before the setting was recorded: the model's own, so a default run resumes
    run_file = own / "run.json"
    old = json.loads(run_file.read_text())
    del old["input_padding"]
    run_file.write_text(json.dumps(old))
    assert main(["augment", str(src), str(own), "-n", "2"] + opts[2:] + ["--resume"]) == 1   # still checks the rest
    assert "different settings (per_image)" in capsys.readouterr().err
    assert main(["augment", str(src), str(own)] + opts + ["--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out
    run_file.write_text(json.dumps(old))                       # (the resumed run wrote its own run.json)
    assert main(["augment", str(src), str(own)] + opts + ["--input-padding", "0", "--resume"]) == 1
    assert "different settings (input_padding)" in capsys.readouterr().err
    # the model's own value, given explicitly, is the same setting as leaving it to the model (both ways)
    assert main(["augment", str(src), str(own)] + opts + ["--input-padding", "8", "--compose-padding", "zeros",
                                                          "--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out
    assert json.loads(run_file.read_text())["model_defaults"] == {"compose_padding": "zeros", "input_padding": 8,
                                                            "background_margin": "off", "anatomy_fit": "off",
                                                                "keep_size": False}
    assert main(["augment", str(src), str(own)] + opts + ["--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out


def test_export_refuses_an_input_padding_the_model_cannot_take(tmp_path, pad8, capsys):
    src = labelled_cases(tmp_path, _blob)
    out = tmp_path / "o"
    assert main(["augment", str(src), str(out), "-n", "1", "--t-prime", "1", "--weights", pad8, "--no-progress",
                 "--input-padding", "16"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "--input-padding: expected a multiple of 4 pixels from 0 to below S/2 = 16" in err
    assert not [f.name for f in out.iterdir() if not f.name.startswith(".drdm")]   # refused before any work
    with pytest.raises(InputError, match="^--input-padding: expected a multiple of 4"):
        ExportOptions(input_padding=6).validate()
    assert ExportOptions(input_padding="8").validate().input_padding == 8


def test_transform_input_padding(pad8):
    from napari_drdm.transforms import DRDMTransform
    img, _ = _blob()
    data = {"image": img[None]}
    t0, town = (DRDMTransform(pad8, label_keys=(), t_prime="2", schedule="paper", ddf_key="ddf", seed=1,
                              input_padding=p) for p in (0, None))
    assert t0.input_padding == 0 and town.input_padding is None
    first = t0(data)["ddf"]                                               # seeded: the first draw of seed 1
    assert not np.array_equal(first, town(data)["ddf"])
    with pytest.raises(InputError, match="^input_padding: expected a multiple of 4"):
        DRDMTransform(pad8, input_padding=6)
    model = load_model(pad8, device="cpu")
    with pytest.raises(InputError, match=r"S/2 = 16"):                    # a model given: its side bounds it
        DRDMTransform(model, input_padding=16)
    torch.testing.assert_close(torch.as_tensor(DRDMTransform(model, label_keys=(), t_prime="2", schedule="paper",
                                                             ddf_key="ddf", seed=1, input_padding=0)(data)["ddf"]),
                               torch.as_tensor(first))
