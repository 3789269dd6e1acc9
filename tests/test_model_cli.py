"""The model object, checkpoint safety and the `drdm generate/evaluate/weights` commands."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ref_path

from napari_drdm.checkpoint import CheckpointError, read_checkpoint
from napari_drdm.cli import main
from napari_drdm.errors import InputError, WeightsNotFoundError
from napari_drdm.model import DRDM, ModelGrid, load_model


def blob_image(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.uniform(-0.3, 0.3, len(shape))
    r2 = sum((g - ci) ** 2 for g, ci in zip(grids, c))
    img = np.exp(-r2 / 0.2) * 1000
    lab = (r2 < 0.15).astype(np.uint8) + (r2 < 0.05).astype(np.uint8)
    return img.astype(np.int16), lab


def test_generate_any_size_keeps_shape_dtype_labels(tiny_ckpt2d):
    model = load_model(tiny_ckpt2d, device="cpu")
    img, lab = blob_image((40, 52))
    res = model.generate(img, lab * 5, t_prime=4, seed=1, schedule="paper", spacing=(1.5, 1.0))
    assert res.image.shape == img.shape and res.image.dtype == img.dtype
    assert res.labels.shape == lab.shape and set(np.unique(res.labels)) <= {0, 5, 10}
    assert res.ddf.shape == (2, 40, 52) and res.forward_ddf.shape == (2, 40, 52)
    assert img.min() <= res.image.min() and res.image.max() <= img.max()
    res2 = model.generate(img, lab * 5, t_prime=4, seed=1, schedule="paper", spacing=(1.5, 1.0))
    np.testing.assert_array_equal(res.ddf, res2.ddf)


def test_frames_count_and_order(tiny_ckpt2d):
    model = load_model(tiny_ckpt2d, device="cpu")
    img, lab = blob_image((32, 32))
    res = model.generate(img, lab, t_prime=3, seed=0, schedule="paper", return_frames=True)
    phases = [(f.phase, f.index, f.t) for f in res.frames]
    assert phases == [("forward", 1, 1), ("forward", 2, 2), ("forward", 3, 3),
                      ("recovery", 1, 2), ("recovery", 2, 1), ("recovery", 3, 0)]
    np.testing.assert_allclose(res.frames[-1].ddf, res.ddf, atol=1e-6)
    res_ref = model.generate(img, lab, t_prime=3, seed=0, schedule="reference", return_frames=True)
    assert sum(f.phase == "recovery" for f in res_ref.frames) == 80


def test_model_grid_roundtrip_mapping():
    g = ModelGrid.fit((40, 80), (2.0, 1.0), 32)
    assert g.scale[0] == pytest.approx(80 / 32 / 2) and g.scale[1] == pytest.approx(80 / 32)
    u = torch.zeros(1, 2, 32, 32)
    u[:, 1] = 1.0  # one model pixel along columns = 2.5 original pixels
    back = g.field_to_original(u)
    assert back.shape == (1, 2, 40, 80)
    torch.testing.assert_close(back[0, 1], torch.full((40, 80), 2.5))
    assert ModelGrid.fit((32, 32), None, 32).identity


@pytest.mark.parametrize("bad,msg", [
    (np.zeros((8, 8, 8, 2)), "must be 2D"),
    (np.zeros((16, 16, 3)), "RGB"),
    (np.full((16, 16), np.nan), "NaN"),
])
def test_bad_images(tiny_ckpt2d, bad, msg):
    model = load_model(tiny_ckpt2d, device="cpu")
    with pytest.raises(ValueError, match=msg):
        model.generate(bad, t_prime=2)


def test_bad_labels(tiny_ckpt2d):
    model = load_model(tiny_ckpt2d, device="cpu")
    img, lab = blob_image((32, 32))
    with pytest.raises(ValueError, match="does not match"):
        model.generate(img, lab[:-1], t_prime=2)
    with pytest.raises(InputError, match="integer"):
        model.generate(img, lab * 0.5, t_prime=2)
    with pytest.raises(ValueError, match="T'"):
        model.generate(img, lab, t_prime=81)


def test_checkpoint_safety_and_errors(tmp_path, tiny_ckpt3d):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(corrupt)

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))
    evil = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, evil)
    with pytest.raises(CheckpointError):
        read_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
    # a 3D checkpoint is refused for a 2D image, with a clear message
    model = load_model(tiny_ckpt3d, device="cpu")
    assert model.ndim == 3
    with pytest.raises(ValueError, match="must be 3D"):
        model.generate(np.zeros((32, 32)), t_prime=2)
    with pytest.raises(WeightsNotFoundError, match="unknown weights"):
        load_model("no-such-model")


def test_reference_checkpoint_loads_strict():
    model = DRDM.from_checkpoint(ref_path("upstream_cmr2d.pth"), device="cpu")
    n = sum(p.numel() for name, p in model.net.named_parameters() if name != "time_embed.weight")
    assert model.ndim == 2 and model.size == 256 and n == 435435


def _nifti(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def test_cli_generate_3d_nifti_with_labels(tmp_path, tiny_ckpt3d, capsys):
    img, lab = blob_image((20, 24, 18))
    aff = np.diag([1.2, 1.0, 2.0, 1.0])
    aff[:3, 3] = [10, -20, 5]
    ip = _nifti(tmp_path / "vol.nii.gz", img, aff)
    lp = _nifti(tmp_path / "vol_label.nii.gz", lab, aff)
    out = tmp_path / "out"
    rc = main(["generate", ip, "--labels", lp, "--weights", str(tiny_ckpt3d), "--t-prime", "3", "--seed", "4",
               "--schedule", "paper", "--out", str(out)])
    assert rc == 0
    im = nib.load(out / "vol_image.nii.gz")
    lb = nib.load(out / "vol_labels.nii.gz")
    dd = nib.load(out / "vol_ddf.nii.gz")
    np.testing.assert_allclose(im.affine, aff)
    np.testing.assert_allclose(lb.affine, aff)
    assert im.get_data_dtype() == np.int16
    assert set(np.unique(np.asanyarray(lb.dataobj))) <= {0, 1, 2}
    assert dd.shape == (20, 24, 18, 1, 3)
    side = json.loads((out / "vol.json").read_text())
    assert side["seed"] == 4 and side["t_prime"] == 3 and side["schedule"] == "paper"
    assert len(side["weights_sha256"]) == 64 and "folding_pct" in side["metrics"]
    # the written field's global affine part, in the sidecar and on the screen
    from napari_drdm.core.metrics import affine_fit
    u_px = np.moveaxis(np.asanyarray(dd.dataobj)[..., 0, :], -1, 0) / np.array([1.2, 1.0, 2.0])[:, None, None, None]
    assert set(side["affine"]) == {"affine_zoom", "affine_rotation_deg", "affine_share_pct"}
    assert abs(side["affine"]["affine_zoom"] - affine_fit(u_px)["affine_zoom"]) < 1e-3
    assert f"Global affine part: zoom {side['affine']['affine_zoom']:.3f}" in capsys.readouterr().out
    # refuses to overwrite
    rc = main(["generate", ip, "--labels", lp, "--weights", str(tiny_ckpt3d), "--t-prime", "3", "--out", str(out)])
    assert rc == 1


def test_cli_generate_linear_argmax_labels(tmp_path, tiny_checkpoint):
    """`--label-interp linear_argmax` end to end: each label's indicator warped bilinearly by the
    written field and the most likely label kept (checked with scipy, away from exact ties), the
    label set and dtype kept, and boundaries that differ from nearest-neighbour labels."""
    ndimage = pytest.importorskip("scipy.ndimage")
    ck = tiny_checkpoint(2, 32, silent_head=True, field_scale="geometric", sigma=8e-5)   # a visible, smooth field
    img, lab = blob_image((36, 40), seed=2)
    lab[4:12, 6:30] = 7                                             # a third label with long straight borders
    ip, lp = _nifti(tmp_path / "im.nii.gz", img, np.eye(4)), _nifti(tmp_path / "im_label.nii.gz", lab, np.eye(4))
    base = ["generate", ip, "--labels", lp, "--weights", ck, "--t-prime", "30", "--seed", "3", "--schedule", "paper"]
    assert main(base + ["--label-interp", "linear_argmax", "--out", str(tmp_path / "la")]) == 0
    assert main(base + ["--out", str(tmp_path / "nn")]) == 0
    got = nib.load(tmp_path / "la" / "im_labels.nii.gz")
    assert got.get_data_dtype() == np.uint8
    got = np.asanyarray(got.dataobj).reshape(lab.shape)
    nearest = np.asanyarray(nib.load(tmp_path / "nn" / "im_labels.nii.gz").dataobj).reshape(lab.shape)
    ddf = np.asanyarray(nib.load(tmp_path / "la" / "im_ddf.nii.gz").dataobj)
    ddf = ddf.reshape(lab.shape + (2,)).transpose(2, 0, 1).astype(np.float64)     # 1 mm pixels: pixels
    assert np.abs(ddf).max() > 1.0, "the field is too small to test label interpolation"
    values = np.unique(lab)                                         # 0, 1, 2, 7: background first
    coords = np.indices(lab.shape).astype(np.float64) + ddf
    w = np.stack([ndimage.map_coordinates((lab == v).astype(np.float64), coords, order=1, mode="grid-constant")
                  for v in values])
    expect = values[np.argmax(w, axis=0)]
    top2 = np.sort(w, axis=0)[-2:]
    clear = (top2[1] - top2[0] > 1e-4) | (top2[1] == 0)             # all zero: outside the image, background
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got[clear], expect[clear])
    assert set(np.unique(got)) <= set(values.tolist())
    assert (got != nearest).any()


def test_cli_generate_png_and_errors(tmp_path, tiny_ckpt2d, capsys):
    from PIL import Image
    img, _ = blob_image((30, 36))
    png = tmp_path / "slice.png"
    Image.fromarray((img / 4).astype(np.uint8)).save(png)
    assert main(["generate", str(png), "--weights", str(tiny_ckpt2d), "--t-prime", "2",
                 "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "slice_image.nii.gz").exists()
    rgb = tmp_path / "rgb.png"
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[..., 0] = 200
    Image.fromarray(arr).save(rgb)
    assert main(["generate", str(rgb), "--weights", str(tiny_ckpt2d), "--out", str(tmp_path / "o2")]) == 1
    assert "colour image" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope.nii.gz"), "--weights", str(tiny_ckpt2d),
                 "--out", str(tmp_path / "o3")]) == 1
    assert "not found" in capsys.readouterr().err
    vol = _nifti(tmp_path / "v.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    assert main(["generate", vol, "--weights", str(tiny_ckpt2d), "--out", str(tmp_path / "o4")]) == 1
    assert "3D" in capsys.readouterr().err


def test_cli_evaluate_json(tmp_path, tiny_ckpt2d, capsys):
    imgs = np.stack([blob_image((32, 32), s)[0] for s in range(3)]).astype(np.float32)
    npz = tmp_path / "slices.npz"
    np.savez(npz, images=imgs)
    rc = main(["evaluate", "--weights", str(tiny_ckpt2d), "--images", str(npz), "--t-prime", "2", "5",
               "--samples", "3", "--schedule", "paper", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["schedule"] == "paper" and [r["t_prime"] for r in out["results"]] == [2, 5]
    r = out["results"][1]
    assert r["n"] == 3 and set(r["max_disp_pct"]) >= {"mean", "sd"} and "folding_pct" in r["forward"]
    assert r["seconds_per_image"] > 0


def test_compose_padding_override_reaches_recover(tiny_ckpt2d, monkeypatch):
    """``compose_padding`` (None: the model's) is what the reverse loop composes with: generate
    passes it to ``recover``, the result records it, and the batched path gives the field a direct
    ``recover`` call gives with that padding."""
    import napari_drdm.model as model_mod
    from napari_drdm.core.recovery import recover

    model = load_model(tiny_ckpt2d, device="cpu")
    assert model.config.compose_padding == "zeros"                  # a 2D model's default (the authors')
    seen = []

    def spy(*a, **kw):
        seen.append(kw["compose_padding"])
        return recover(*a, **kw)
    monkeypatch.setattr(model_mod, "recover", spy)
    img, _ = blob_image((32, 32))
    for asked, used in ((None, "zeros"), ("border", "border"), ("zeros", "zeros")):
        res = model.generate(img, t_prime=3, seed=2, schedule="paper", compose_padding=asked)
        assert seen[-1] == used and res.compose_padding == used
    monkeypatch.undo()

    x = model.prepare(img)[1]
    phi_b, psi = model.generate_model_grid(x, 6, [4], schedule="paper", compose_padding="border")
    phi_z, psi_z = model.generate_model_grid(x, 6, [4], schedule="paper")
    torch.testing.assert_close(psi, psi_z, rtol=0, atol=0)
    direct = None
    for fr in recover(model.net, x, psi, 6, schedule="paper", k=model.config.k_recursions,
                      n_steps=model.config.n_steps, compose_padding="border",
                      image_interp=model.config.image_interp, fast=model.fast):
        direct = fr.ddf
    torch.testing.assert_close(phi_b, direct, rtol=1e-5, atol=1e-5)
    assert (phi_b - phi_z).abs().max() > 1e-4                       # the padding changes the field
    with pytest.raises(InputError, match=r"^compose_padding: expected border or zeros, got 'reflection'$"):
        model.generate(img, t_prime=2, compose_padding="reflection")


def test_cli_reports_and_records_the_models_input_padding(tmp_path, tiny_checkpoint, capsys):
    img, _ = blob_image((32, 32))
    np.save(tmp_path / "im.npy", img.astype(np.float32))
    for pad, shown in ((8, "input_padding=8px"), (0, None)):
        ckpt = tiny_checkpoint(2, 32, input_padding=pad)
        out = tmp_path / f"p{pad}"
        assert main(["generate", str(tmp_path / "im.npy"), "--weights", ckpt, "--t-prime", "2", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert (shown in printed) if shown else ("input_padding" not in printed)
        assert json.loads((out / "im.json").read_text())["input_padding"] == pad


def test_cli_compose_padding_option(tmp_path, tiny_ckpt2d, capsys):
    img, _ = blob_image((32, 32))
    np.save(tmp_path / "im.npy", img.astype(np.float32))
    base = ["generate", str(tmp_path / "im.npy"), "--weights", str(tiny_ckpt2d), "--t-prime", "2",
            "--schedule", "paper"]
    assert main(base + ["--compose-padding", "border", "--out", str(tmp_path / "b")]) == 0
    assert "padding=border" in capsys.readouterr().out
    assert json.loads((tmp_path / "b" / "im.json").read_text())["compose_padding"] == "border"
    assert main(base + ["--out", str(tmp_path / "m")]) == 0            # the model's own
    assert json.loads((tmp_path / "m" / "im.json").read_text())["compose_padding"] == "zeros"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(base + ["--compose-padding", "reflection", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--compose-padding" in err[0] and "border" in err[0]
    assert not (tmp_path / "x").exists()
    npz = tmp_path / "s.npz"
    np.savez(npz, images=img[None].astype(np.float32))
    assert main(["evaluate", "--weights", str(tiny_ckpt2d), "--images", str(npz), "--t-prime", "2", "--samples", "1",
                 "--schedule", "paper", "--compose-padding", "border", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compose_padding"] == "border"


def test_console_script_installed():
    exe = Path(sys.executable).parent / "drdm"
    assert exe.exists(), "the `drdm` console script is not installed in this environment"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout and "evaluate" in out.stdout
