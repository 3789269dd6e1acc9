"""``anatomy_fit``: the model's view fitted to the anatomy (core/view.py).  The reverse loop runs on a
square around everything bright and its fields come back to the whole grid.  The view geometry,
the round trip of fields and images, the configuration and option, the Python API and ``drdm
evaluate``.  Tiny random 2D checkpoints (S = 32)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import one_line

from napari_drdm.cli import main
from napari_drdm.core.config import DRDMConfig, check_anatomy_fit
from napari_drdm.core.spatial import warp
from napari_drdm.core.view import anatomy_views, field_from_view, to_view
from napari_drdm.errors import InputError
from napari_drdm.model import load_model, resolve_anatomy_fit
from napari_drdm.validate import check_anatomy_fit_option


def _small_blob(size=32, box=(10, 20, 8, 18), value=1.0):
    x = torch.zeros(1, 1, size, size)
    a, b, c, d = box
    x[0, 0, a:b, c:d] = value
    return x


def test_view_geometry():
    x = torch.cat([_small_blob(64, (20, 40, 10, 30)), torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 64, 64),
                   _small_blob(64, (24, 40, 20, 36))])
    views = anatomy_views(x, margin=4)
    # a 20-pixel anatomy with 4 free pixels each side needs 20 * 64 / 56 = 22.9: capped at 2x (32)
    assert views[0].ratio == pytest.approx(0.5) and views[0].zoom == pytest.approx(2.0)
    assert views[1].whole and views[2].whole                   # nothing bright / bright everywhere
    fitted = anatomy_views(x[:1], margin=4, max_zoom=4.0)[0]
    assert fitted.ratio == pytest.approx(20 / 56)              # the margin is in the view's pixels
    inside = (to_view(x[:1], [fitted])[0, 0] > 0.5).nonzero()
    assert inside.min(0).values.tolist() == [4, 4] and inside.max(0).values.tolist() == [59, 59]
    # centred on the anatomy, and kept on the grid where the anatomy touches an edge
    edge = anatomy_views(_small_blob(64, (0, 16, 40, 64)), margin=0)[0]
    assert edge.ratio == pytest.approx(0.5) and edge.offset == pytest.approx((-0.25, 31.75))   # start + ratio/2 - 1/2


def test_fields_come_back_scaled_and_held_outside_the_view():
    x = _small_blob(64, (20, 40, 10, 30))
    (view,) = anatomy_views(x, margin=4)
    u = torch.zeros(1, 2, 64, 64)
    u[:, 0], u[:, 1] = 3.0, -2.0                              # a translation on the view
    back = field_from_view(u, [view])
    torch.testing.assert_close(back[:, 0], torch.full((1, 64, 64), 1.5))
    torch.testing.assert_close(back[:, 1], torch.full((1, 64, 64), -1.0))
    # a smooth image warped on the whole grid agrees, inside the view, with the view warped by u
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    img = (torch.sin(yy / 7) * torch.cos(xx / 9) + 1)[None, None]
    m = torch.linspace(-1, 1, 64)
    u = torch.stack([2 * torch.outer(torch.cos(m * 2), m), -1.5 * torch.outer(m, torch.sin(m * 3))])[None]
    whole = warp(img, field_from_view(u, [view]), "linear", "zeros")
    in_view = warp(to_view(img, [view]), u, "linear", "zeros")
    diff = (to_view(whole, [view]) - in_view)[..., 4:-4, 4:-4].abs().max()
    assert float(diff) < 0.02
    assert field_from_view(u, [anatomy_views(torch.ones(1, 1, 64, 64), 4)[0]]) is u      # whole: untouched


def test_config_rule_option_and_resolution():
    assert check_anatomy_fit(None, 32) is None and check_anatomy_fit(15, 32) == 15
    for bad in (16, -1, 2.5, "4", True):
        with pytest.raises(InputError, match="^anatomy_fit must be None"):
            check_anatomy_fit(bad, 32)
    cfg = DRDMConfig(size=32, anatomy_fit=4)
    assert DRDMConfig.from_dict(json.loads(cfg.to_json())).anatomy_fit == 4
    assert DRDMConfig.from_dict({"size": 32}).anatomy_fit is None            # older files: the whole image
    assert [check_anatomy_fit_option(v) for v in (None, "off", " Off", 0, "8")] == [None, "off", "off", 0, 8]
    with pytest.raises(InputError) as e:
        check_anatomy_fit_option(16, 32)
    assert one_line(str(e.value)) == ("--anatomy-fit: expected 'off' or a whole number of pixels from 0 to below "
                                      "S/2 = 16 (the model's side S = 32), got 16")
    assert [resolve_anatomy_fit(v, cfg) for v in (None, "off", 0, 8)] == [4, None, 0, 8]
    assert resolve_anatomy_fit(None, DRDMConfig(size=32)) is None


def test_generation_runs_on_the_view_and_returns_the_whole_grid(tiny_checkpoint):
    model = load_model(tiny_checkpoint(2, 32, name="fit4", anatomy_fit=4), device="cpu")
    img = np.zeros((48, 48), np.float32)
    img[18:30, 16:32] = 50.0
    kw = dict(t_prime=3, seed=2, schedule="paper")
    own = model.generate(img, return_frames=True, **kw)
    off = model.generate(img, return_frames=True, anatomy_fit="off", **kw)
    assert own.anatomy_fit == 4 and off.anatomy_fit is None
    assert own.view_zoom == pytest.approx(2.0) and off.view_zoom == 1.0
    assert own.ddf.shape == off.ddf.shape == (2, 48, 48)
    np.testing.assert_array_equal(own.frames[-1].ddf, own.ddf)
    assert len(own.frames) == len(off.frames) and not np.array_equal(own.ddf, off.ddf)
    # on the model grid: the loop on the view, its fields brought back
    x = model.prepare(img)[1]
    report = {}
    phi, psi = model.generate_model_grid(x, 3, [2], schedule="paper", view_report=report)
    views = anatomy_views(x, 4)
    phi_v, psi_v = model.generate_model_grid(to_view(x, views), 3, [2], schedule="paper", anatomy_fit="off")
    torch.testing.assert_close(phi, field_from_view(phi_v, views))
    torch.testing.assert_close(psi, field_from_view(psi_v, views))
    assert report == {"fit": 4, "zoom": [pytest.approx(2.0)]}
    for bad in (16, -1, "whole"):
        with pytest.raises(InputError) as e:
            model.generate(img, t_prime=1, anatomy_fit=bad)
        assert one_line(str(e.value)).startswith("anatomy_fit: expected 'off' or a whole number")


def test_evaluate_records_the_fit_and_each_view(tmp_path, tiny_checkpoint, capsys):
    ckpt = tiny_checkpoint(2, 32, name="plain_fit")
    img = np.zeros((32, 32), np.float32)
    img[10:22, 12:20] = 9.0
    npz = tmp_path / "s.npz"
    np.savez(npz, images=img[None])
    ev = ["evaluate", "--weights", ckpt, "--images", str(npz), "--t-prime", "2", "--samples", "1",
          "--schedule", "paper", "--json"]
    assert main(ev) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main(ev + ["--anatomy-fit", "2"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert whole["anatomy_fit"] is None and fitted["anatomy_fit"] == 2
    assert whole["results"][0]["generations"][0]["view_zoom"] == 1.0
    assert fitted["results"][0]["generations"][0]["view_zoom"] == pytest.approx(2.0)
    with pytest.raises(SystemExit) as e:
        main(ev + ["--anatomy-fit", "-1"])
    assert e.value.code == 2 and "--anatomy-fit: expected 'off'" in one_line(capsys.readouterr().err)
    assert main(ev + ["--anatomy-fit", "16"]) == 1
    assert "below S/2 = 16" in one_line(capsys.readouterr().err)


def _small_disc(shape=(32, 32), seed=0):
    """A bright disc of radius a fifth of the side in a dark frame (the view zooms in), and its labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (min(shape) / 5) ** 2
    return (disc * 100.0 + np.abs(rng.normal(0, 0.5, shape))).astype(np.float32), disc.astype(np.uint8)


def test_export_records_resumes_and_reproduces_the_fit(tmp_path, tiny_checkpoint, capsys):
    from conftest import labelled_cases

    from napari_drdm.export import ExportOptions, load_manifest, reproduce_row
    fit4 = tiny_checkpoint(2, 32, name="fit4", anatomy_fit=4)
    src = labelled_cases(tmp_path, _small_disc)
    own, off = tmp_path / "own", tmp_path / "off"
    opts = ["-n", "1", "--t-prime", "2", "--schedule", "paper", "--weights", fit4, "--batch", "2", "--no-progress"]
    assert main(["augment", str(src), str(own)] + opts) == 0
    assert main(["augment", str(src), str(off)] + opts + ["--anatomy-fit", "off"]) == 0
    a, b = load_manifest(own), load_manifest(off)
    assert {r["anatomy_fit"] for r in a["rows"]} == {4} and {r["anatomy_fit"] for r in b["rows"]} == {"off"}
    rows_a, rows_b = ({r["row_id"]: r for r in m["rows"]} for m in (a, b))
    assert all(rows_a[k]["ddf_sha256"] != rows_b[k]["ddf_sha256"] for k in rows_a)
    for folder in (own, off):            # a batch of two views of different sizes reproduces one row alone
        res = reproduce_row(folder / "manifest.json", "case1_aug000", tmp_path / f"again_{folder.name}")
        assert all(res["identical"].values()), res
    capsys.readouterr()
    assert main(["augment", str(src), str(off)] + opts + ["--resume"]) == 1
    assert "different settings (anatomy_fit)" in one_line(capsys.readouterr().err)
    assert main(["augment", str(src), str(own)] + opts + ["--anatomy-fit", "4", "--resume"]) == 0
    assert "0 outputs written (2 already done)" in capsys.readouterr().out
    with pytest.raises(InputError, match="^--anatomy-fit: expected 'off'"):
        ExportOptions(anatomy_fit="whole").validate()
    out = tmp_path / "refused"
    assert main(["augment", str(src), str(out)] + opts + ["--anatomy-fit", "16"]) == 1
    assert "below S/2 = 16" in one_line(capsys.readouterr().err)


def test_transform_and_set_inference(tmp_path, tiny_checkpoint, capsys):
    from napari_drdm.checkpoint import read_checkpoint
    from napari_drdm.transforms import DRDMTransform
    from training.__main__ import main as training_main
    plain = tiny_checkpoint(2, 32, name="plain_t")
    img, _ = _small_disc()
    data = {"image": img[None]}
    whole, fitted = (DRDMTransform(plain, label_keys=(), t_prime="2", schedule="paper", ddf_key="ddf", seed=1,
                                   anatomy_fit=m) for m in (None, 4))
    assert not np.array_equal(whole(data)["ddf"], fitted(data)["ddf"])
    with pytest.raises(InputError, match="^anatomy_fit: expected 'off'"):
        DRDMTransform(plain, anatomy_fit=-3)
    out = tmp_path / "fit.safetensors"
    assert training_main(["set-inference", "--weights", plain, "--out", str(out), "--anatomy-fit", "4",
                          "--measured", "a test"]) == 0
    assert "anatomy_fit off -> 4" in capsys.readouterr().out
    _, cfg, prov = read_checkpoint(out)
    assert cfg.anatomy_fit == 4 and prov["inference_changes"][-1]["setting"] == "anatomy_fit"
    again = (DRDMTransform(w, label_keys=(), t_prime="2", schedule="paper", ddf_key="ddf", seed=1, anatomy_fit=m)
             for w, m in ((str(out), None), (plain, 4)))       # the file's own fit = the fit asked for
    np.testing.assert_array_equal(*(t(data)["ddf"] for t in again))


def test_3d_generation_runs_on_a_cube_around_the_anatomy(tiny_checkpoint):
    """A 3D model with a fit: the loop runs on a cube around the anatomy; its fields come back."""
    model = load_model(tiny_checkpoint(3, 16, name="fit3d", anatomy_fit=2), device="cpu")
    vol = np.zeros((20, 16, 16), np.float32)
    vol[6:14, 5:11, 4:12] = 30.0
    x = model.prepare(vol)[1]
    report = {}
    phi, _ = model.generate_model_grid(x, 2, [3], schedule="paper", view_report=report)
    views = anatomy_views(x, 2)
    assert report["zoom"] == [pytest.approx(views[0].zoom)] and views[0].zoom > 1.2
    phi_v, _ = model.generate_model_grid(to_view(x, views), 2, [3], schedule="paper", anatomy_fit="off")
    torch.testing.assert_close(phi, field_from_view(phi_v, views))
    res = model.generate(vol, t_prime=2, seed=3, schedule="paper")
    assert res.ddf.shape == (3, 20, 16, 16) and res.view_zoom == pytest.approx(views[0].zoom)
