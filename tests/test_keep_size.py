"""``keep_size``: the generated deformation's global zoom over the anatomy taken out
(core/keep_size.py).  The core operation (a pure zoom comes back as no field, folds stay where they
were, nothing to fit leaves the field alone), the configuration and option, generation, the
command lines, export and set-inference.  Tiny random 2D checkpoints (S = 32)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import one_line

from napari_drdm.cli import main
from napari_drdm.core.config import DRDMConfig, keep_size_name
from napari_drdm.core.keep_size import apply_keep_size, remove_global_scale
from napari_drdm.core.metrics import jacobian_determinant
from napari_drdm.errors import InputError
from napari_drdm.model import load_model, resolve_keep_size
from napari_drdm.validate import check_keep_size_option


def _disc(shape=(48, 48), centre=(20.0, 26.0), radius=10.0):
    axes = [torch.arange(float(n)) for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
    return (r2 <= radius ** 2).float()[None, None], torch.stack(grids)


def _fit(phi, mask):
    """Least-squares linear part M of y = x + phi over ``mask`` (d x d)."""
    nd = phi.shape[0]
    coords = torch.stack(torch.meshgrid(*[torch.arange(float(n)) for n in phi.shape[1:]], indexing="ij"))
    x = coords[:, mask].T.double()
    y = x + phi[:, mask].T.double()
    X = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    return torch.linalg.lstsq(X, y).solution[:nd].T


@pytest.mark.parametrize("shape,centre", [((48, 48), (20.0, 26.0)), ((24, 24, 24), (11.0, 12.0, 13.0))])
def test_a_zoom_about_the_anatomy_comes_back_as_no_field(shape, centre):
    img, coords = _disc(shape, centre, radius=min(shape) / 5)
    c = torch.tensor(centre).view(-1, *([1] * len(shape)))
    for z in (1.12, 0.9):                            # the anatomy shown 12 % larger / 10 % smaller
        phi = (c + (coords - c) / z - coords)[None]
        new, zooms = remove_global_scale(phi, img)
        assert zooms == [pytest.approx(z, abs=1e-6)]
        assert float(new.abs().max()) < 1e-3
        one, (zoom,) = remove_global_scale(phi, img, inflation_only=True)    # one-sided: only an enlargement
        if z > 1:
            torch.testing.assert_close(one, new)
            assert zoom == pytest.approx(z, abs=1e-6)
        else:
            assert zoom == 1.0 and torch.equal(one, phi)


def test_one_sided_takes_out_enlargement_sample_by_sample():
    """A batch with one enlarged and one shrunk anatomy: ``inflation_only`` changes the first as the
    two-sided option does and returns the second as it came."""
    img, coords = _disc()
    c = torch.tensor((20.0, 26.0)).view(2, 1, 1)
    phi = torch.stack([c + (coords - c) / z - coords for z in (1.1, 0.93)])
    both, zb = remove_global_scale(phi, img.expand(2, -1, -1, -1))
    one, zo = remove_global_scale(phi, img.expand(2, -1, -1, -1), inflation_only=True)
    assert zo == [pytest.approx(zb[0], abs=1e-9), 1.0] and zb[1] == pytest.approx(0.93, abs=1e-6)
    torch.testing.assert_close(one[0], both[0])
    assert torch.equal(one[1], phi[1])
    batch = img.expand(2, -1, -1, -1)          # the model's setting, as generation applies it
    for keep, (want, zooms) in ((True, (both, zb)), ("inflation", (one, zo)), (False, (phi, [1.0, 1.0])),
                                (None, (phi, [1.0, 1.0]))):
        got, z = apply_keep_size(phi, batch, keep)
        torch.testing.assert_close(got, want)
        assert z == pytest.approx(zooms)


def test_only_the_scale_goes_folds_rotation_and_local_part_stay():
    img, coords = _disc()
    yy, xx = coords
    c, s, z = math.cos(0.2), math.sin(0.2), 1.08
    rot = torch.stack([(c * (yy - 24) - s * (xx - 24)) / z + 24, (s * (yy - 24) + c * (xx - 24)) / z + 24])
    local = torch.stack([3.0 * torch.sin(xx / 3.0), 2.5 * torch.cos(yy / 2.5)])    # folds in places
    phi = (rot + local - coords)[None]
    new, (removed,) = remove_global_scale(phi, img)
    assert removed > 1.0
    det_old, det_new = jacobian_determinant(phi[0]), jacobian_determinant(new[0])
    assert (det_old <= 0).any()
    np.testing.assert_array_equal(np.asarray(det_old) <= 0, np.asarray(det_new) <= 0)   # the same folds
    # the deformed image's anatomy, over which the scale was fitted, now has |det M| = 1, same rotation
    from napari_drdm.core.spatial import warp
    mask = warp(img, phi, "linear", "zeros")[0, 0] > 0.05
    m_old, m_new = _fit(phi[0], mask), _fit(new[0], mask)
    assert float(torch.linalg.det(m_new)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(m_new, m_old / float(torch.linalg.det(m_old)) ** 0.5)


def test_nothing_to_fit_leaves_the_field_alone():
    phi = torch.randn(2, 2, 32, 32)
    empty = torch.zeros(2, 1, 32, 32)
    new, zooms = remove_global_scale(phi, empty)
    assert zooms == [1.0, 1.0] and torch.equal(new, phi)
    with pytest.raises(ValueError, match="does not match"):
        remove_global_scale(phi, torch.zeros(1, 1, 32, 32))


def test_a_thin_band_is_not_fitted():
    """A 2 px band: its fitted determinant is noise (0.3 px of random field read as a 7 % zoom
    before the spread check), so the field stays as it is; a band 12 px thick is fitted."""
    torch.manual_seed(0)
    phi = 0.3 * torch.randn(1, 2, 64, 64)
    for rows, fitted in ((slice(31, 33), False), (slice(26, 38), True)):
        band = torch.zeros(1, 1, 64, 64)
        band[0, 0, rows, 4:59] = 1.0
        new, (zoom,) = remove_global_scale(phi, band)
        assert (zoom != 1.0) == fitted and torch.equal(new, phi) != fitted
        assert float((new - phi).abs().max()) < 1.0


def test_config_option_and_resolution():
    assert [check_keep_size_option(v) for v in (None, True, False, "on", " OFF", "Inflation ")] == \
        [None, True, False, True, False, "inflation"]
    for bad in ("yes", 1, 0.5, "inflate"):
        with pytest.raises(InputError) as e:
            check_keep_size_option(bad)
        assert one_line(str(e.value)) == f"--keep-size must be 'on', 'off' or 'inflation', got {bad!r}"
    with pytest.raises(InputError, match="^keep_size must be true, false or 'inflation'"):
        DRDMConfig(size=32, keep_size="on")
    cfg = DRDMConfig(size=32, keep_size=True)
    assert DRDMConfig.from_dict(json.loads(cfg.to_json())).keep_size is True
    one = DRDMConfig(size=32, keep_size="inflation")
    assert DRDMConfig.from_dict(json.loads(one.to_json())).keep_size == "inflation"
    assert DRDMConfig.from_dict({"size": 32}).keep_size is False          # older files: the zoom kept
    assert [resolve_keep_size(v, cfg) for v in (None, "off", False, True, "inflation")] == \
        [True, False, False, True, "inflation"]
    assert resolve_keep_size(None, DRDMConfig(size=32)) is False
    assert resolve_keep_size(None, one) == "inflation" and resolve_keep_size("on", one) is True
    assert [keep_size_name(v) for v in (True, False, None, "inflation")] == ["on", "off", "off", "inflation"]


def _blob(shape=(40, 36)):
    img = np.zeros(shape, np.float32)
    img[10:28, 9:25] = 80.0
    return img


def test_generation_takes_the_zoom_out_of_the_final_field(tiny_checkpoint):
    model = load_model(tiny_checkpoint(2, 32, name="keep", silent_head=True, keep_size=True, background_margin=2), device="cpu")
    img = _blob()
    kw = dict(t_prime=3, seed=4, schedule="paper")
    own = model.generate(img, return_frames=True, **kw)
    off = model.generate(img, return_frames=True, keep_size="off", **kw)
    assert own.keep_size is True and off.keep_size is False and off.zoom_removed == 1.0
    assert own.zoom_removed != 1.0
    np.testing.assert_array_equal(own.frames[-1].ddf, own.ddf)          # the last frame is the result
    assert [f.phase for f in own.frames] == [f.phase for f in off.frames]
    for a, b in zip(own.frames, off.frames):     # forward frames as they were; each recovery frame its own zoom out
        if a.phase == "forward":
            np.testing.assert_array_equal(a.ddf, b.ddf)
        else:
            assert not np.array_equal(a.ddf, b.ddf)
            assert (jacobian_determinant(torch.as_tensor(a.ddf)) <= 0).sum() == \
                (jacobian_determinant(torch.as_tensor(b.ddf)) <= 0).sum()
    assert not np.array_equal(own.ddf, off.ddf)
    assert (jacobian_determinant(torch.as_tensor(own.ddf)) <= 0).sum() == \
        (jacobian_determinant(torch.as_tensor(off.ddf)) <= 0).sum()
    x = model.prepare(img)[1]
    rep = {}
    phi_on, _ = model.generate_model_grid(x, 3, [4], schedule="paper", size_report=rep)
    phi_off, _ = model.generate_model_grid(x, 3, [4], schedule="paper", keep_size=False)
    expected, zooms = remove_global_scale(phi_off, x, image_interp=model.config.image_interp)
    torch.testing.assert_close(phi_on, expected)
    assert rep == {"keep_size": True, "zoom_removed": zooms}
    rep = {}
    phi_one, _ = model.generate_model_grid(x, 3, [4], schedule="paper", keep_size="inflation", size_report=rep)
    expected, zooms = remove_global_scale(phi_off, x, image_interp=model.config.image_interp, inflation_only=True)
    torch.testing.assert_close(phi_one, expected)
    assert rep == {"keep_size": "inflation", "zoom_removed": zooms} and zooms[0] >= 1.0
    res = model.generate(img, keep_size="inflation", **kw)
    assert res.keep_size == "inflation" and res.zoom_removed >= 1.0
    with pytest.raises(InputError, match="^keep_size must be 'on', 'off' or 'inflation'"):
        model.generate(img, t_prime=1, keep_size="maybe")


def test_command_lines_export_and_set_inference(tmp_path, tiny_checkpoint, capsys):
    from conftest import labelled_cases

    from napari_drdm.checkpoint import read_checkpoint
    from napari_drdm.export import load_manifest, reproduce_row
    from training.__main__ import main as training_main
    plain = tiny_checkpoint(2, 32, name="plain_keep", silent_head=True)   # the field: the forward one
    np.save(tmp_path / "im.npy", _blob())
    base = ["generate", str(tmp_path / "im.npy"), "--weights", plain, "--t-prime", "2", "--schedule", "paper",
            "--seed", "3", "--no-fold-guard"]
    assert main(base + ["--keep-size", "on", "--out", str(tmp_path / "on")]) == 0
    assert "keep_size=on (zoom " in capsys.readouterr().out
    side = json.loads((tmp_path / "on" / "im.json").read_text())
    assert side["keep_size"] is True and side["zoom_removed"] != 1.0
    with pytest.raises(SystemExit) as e:                      # refused while parsing: nothing written
        main(base + ["--keep-size", "yes", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--keep-size must be 'on', 'off' or 'inflation'" in one_line(capsys.readouterr().err)
    assert main(base + ["--keep-size", "inflation", "--out", str(tmp_path / "infl")]) == 0
    assert "keep_size=" in capsys.readouterr().out
    assert json.loads((tmp_path / "infl" / "im.json").read_text())["keep_size"] == "inflation"
    assert not (tmp_path / "x").exists()
    npz = tmp_path / "s.npz"
    np.savez(npz, images=_blob()[None])
    assert main(["evaluate", "--weights", plain, "--images", str(npz), "--t-prime", "2", "--samples", "1",
                 "--schedule", "paper", "--json", "--keep-size", "on"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["keep_size"] is True and ev["results"][0]["generations"][0]["zoom_removed"] != 1.0
    assert ev["results"][0]["plausibility"]["affine_zoom"]["mean"] == pytest.approx(1.0, abs=0.02)

    def blob(shape, k):
        img = np.zeros(shape, np.float32)
        img[8:22, 7:25] = 50.0 + k
        return img, (img > 0).astype(np.uint8)
    src = labelled_cases(tmp_path, blob)
    on = tmp_path / "aug_on"
    opts = ["-n", "1", "--t-prime", "2", "--schedule", "paper", "--weights", plain, "--batch", "2", "--no-progress"]
    assert main(["augment", str(src), str(on)] + opts + ["--keep-size", "on"]) == 0
    rows = load_manifest(on)["rows"]
    assert {r["keep_size"] for r in rows} == {True}
    res = reproduce_row(on / "manifest.json", rows[0]["row_id"], tmp_path / "again")
    assert all(res["identical"].values()), res
    infl = tmp_path / "aug_infl"
    assert main(["augment", str(src), str(infl)] + opts + ["--keep-size", "inflation"]) == 0
    rows_i = load_manifest(infl)["rows"]
    assert {r["keep_size"] for r in rows_i} == {"inflation"}
    res = reproduce_row(infl / "manifest.json", rows_i[0]["row_id"], tmp_path / "again_i")
    assert all(res["identical"].values()), res
    capsys.readouterr()
    assert main(["augment", str(src), str(on)] + opts + ["--resume"]) == 1      # the zoom kept: another setting
    assert "different settings (keep_size)" in one_line(capsys.readouterr().err)
    plain_out = tmp_path / "aug_plain"                      # a run.json written before keep_size existed resumes
    assert main(["augment", str(src), str(plain_out)] + opts) == 0
    run_file = plain_out / "run.json"
    old = json.loads(run_file.read_text())
    del old["keep_size"], old["model_defaults"]["keep_size"]
    run_file.write_text(json.dumps(old))
    capsys.readouterr()
    assert main(["augment", str(src), str(plain_out)] + opts + ["--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out
    out = tmp_path / "keep.safetensors"
    assert training_main(["set-inference", "--weights", plain, "--out", str(out), "--keep-size", "on",
                          "--measured", "a test"]) == 0
    assert "keep_size off -> on" in capsys.readouterr().out
    _, cfg, prov = read_checkpoint(out)
    assert cfg.keep_size is True and prov["inference_changes"][-1]["setting"] == "keep_size"
    assert training_main(["set-inference", "--weights", str(out), "--out", str(tmp_path / "infl.safetensors"),
                          "--keep-size", "inflation", "--measured", "a test"]) == 0
    assert "keep_size on -> inflation" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "infl.safetensors")[1].keep_size == "inflation"
    assert training_main(["set-inference", "--weights", plain, "--out", str(tmp_path / "bad.safetensors"),
                          "--keep-size", "perhaps", "--measured", "a test"]) == 2
    assert "--keep-size must be 'on', 'off' or 'inflation'" in one_line(capsys.readouterr().err)
