"""The bundled weights: registry integrity, defaults per dimensionality, cmr2d's licence and provenance,
and the plausibility figures that `drdm evaluate` reports for every model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_drdm.checkpoint import file_sha256, read_checkpoint
from napari_drdm.cli import main
from napari_drdm.core.metrics import affine_fit, anatomy_metrics, foreground_out_of_view_pct, plausibility_metrics
from napari_drdm.model import load_model
from napari_drdm.weights import WEIGHTS_DIR, default_weights, list_weights, registry, resolve_weights


def test_every_registry_entry_matches_its_file():
    reg = registry()
    assert reg, "no bundled weights"
    for name, e in reg.items():
        path = WEIGHTS_DIR / e["file"]
        assert file_sha256(path) == e["sha256"], name
        _, cfg, _ = read_checkpoint(path)
        assert (cfg.ndim, cfg.size) == (e["ndim"], e["size"]), name
        for alias in e.get("aliases", []):
            assert resolve_weights(alias) == (path, name)


def test_one_default_per_dimensionality_and_load_model_uses_it():
    marks = [e["default_for_ndim"] for e in registry().values() if e.get("default_for_ndim")]
    assert sorted(marks) == [2, 3]
    for nd in (2, 3):
        assert registry()[default_weights(nd)]["ndim"] == nd
    m = load_model(device="cpu")
    assert m.name == default_weights(2) and m.ndim == 2
    with pytest.raises(ValueError, match="2D or 3D"):
        default_weights(4)


def test_weights_command_marks_the_defaults(capsys):
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    for nd in (2, 3):
        line = next(ln for ln in out.splitlines() if ln.startswith(default_weights(nd) + " "))
        assert f"[default {nd}D]" in line
    assert sum("[default" in ln for ln in out.splitlines()) == 2
    assert any(e["name"] == "general2d" and e["default"] for e in list_weights())
    # each model's generation settings, read from its file: cmr2d's four changed ones among them
    assert sum(ln.startswith("    generates with: ") for ln in out.splitlines()) == len(registry())
    cmr = next(e for e in list_weights() if e["name"] == "cmr2d")
    assert cmr["inference"] == {"schedule": "reference", "loop_extra": 0, "k_recursions": 2, "compose_padding": "border",
                                "input_padding": 8, "background_margin": 8, "anatomy_fit": 16, "keep_size": False}
    assert ("generates with: reference loop, K=2, composition padding border, input padding 8 px, background margin "
            "8 px, view fitted to the anatomy (16 px around it)") in out
    gen = next(e for e in list_weights() if e["name"] == "general2d")      # session 24: its loop from T'+12
    assert gen["inference"] == dict(cmr["inference"], schedule="paper", loop_extra=12)
    assert "generates with: paper loop started 12 steps above T', K=2" in out
    assert "background margin 2 px, view the whole image" in out                   # the 3D models


def test_cmr2d_is_the_published_network_with_licence_and_provenance():
    path, _ = resolve_weights("cmr2d")
    state, cfg, prov = read_checkpoint(path)
    assert (cfg.ndim, cfg.size, cfg.field_scale, cfg.channels) == (2, 256, "reference", (10, 20, 40))
    assert prov["licence"] == "Apache-2.0" and "def_diff_rec" in prov["repository"]
    assert len(prov["upstream_sha256"]) == 64
    lic = (WEIGHTS_DIR / "LICENSE-cmr2d").read_text()
    assert "Apache License" in lic and "Version 2.0" in lic
    notice = (WEIGHTS_DIR / "NOTICE").read_text()
    assert "cmr2d.safetensors" in notice and "convert" in notice
    assert sum(v.numel() for v in state.values()) == 443435
    # one inference setting differs from the authors' 2D configuration, and the notice says so
    assert cfg.compose_padding == "border" and prov["authors_compose_padding"] == "zeros"
    assert "composition padding" in notice and 'compose_padding="zeros"' in notice


def _grid(n):
    return np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 2, indexing="ij"))


def test_affine_fit_recovers_rotation_zoom_and_separates_local_fields():
    c = _grid(48)
    th = np.radians(12.0)
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    rot = np.einsum("ij,j...->i...", 1.25 * R, c) - c      # pull-back by 1.25 R: anatomy shrinks to 0.8
    f = affine_fit(rot)
    assert f["affine_share_pct"] == pytest.approx(100.0)
    assert f["affine_rotation_deg"] == pytest.approx(12.0) and f["affine_zoom"] == pytest.approx(0.8)
    assert f["affine_residual_max_pct"] < 1e-9
    local = np.zeros((2, 48, 48))
    local[0] = 2.0 * np.exp(-((c ** 2).sum(0)) / 30.0)       # a bump: not affine
    g = affine_fit(local)
    assert g["affine_share_pct"] < 50.0 and g["affine_residual_max_pct"] > 2.0


def test_foreground_out_of_view_counts_only_content_leaving_the_image():
    img = np.zeros((64, 64))
    img[16:48, 16:48] = 1.0
    assert foreground_out_of_view_pct(img, np.zeros((2, 64, 64))) == 0.0
    shift = np.zeros((2, 64, 64))
    shift[1] = -24.0                                           # content moves 24 px right: 8 of 32 columns leave
    assert foreground_out_of_view_pct(img, shift) == pytest.approx(25.0, abs=0.5)
    assert foreground_out_of_view_pct(img, 0.5 * _grid(64)) == pytest.approx(0.0, abs=0.5)   # zoom out: all kept


def test_anatomy_metrics_count_only_the_pixels_that_show_the_foreground():
    img = np.zeros((64, 64))
    img[16:48, 16:48] = 1.0
    u = np.zeros((2, 64, 64))
    u[0, 56:, :] = 3.0 * np.arange(8)[::-1, None] - 12.0    # rows 56..63: a fold, in the background only
    assert np.any(np.gradient(u[0], axis=0)[56:] <= -1)
    m = anatomy_metrics(img, u, side=64)
    assert m["anatomy_folding_pct"] == 0.0 and m["anatomy_max_disp_pct"] == 0.0
    assert m["anatomy_share_pct"] == pytest.approx(25.0)
    v = u.copy()
    v[1, 20:28, 24:37] = -1.5 * (np.arange(24, 37) - 30.0)[None, :]   # d u/d col = -1.5: det -0.5, a fold
    m = anatomy_metrics(img, v, side=64)                                  # sampled cols 27..33: foreground
    assert 5.0 < m["anatomy_folding_pct"] < 15.0 and m["anatomy_max_disp_pct"] == pytest.approx(100 * 9.0 / 64)
    assert anatomy_metrics(np.zeros((64, 64)), v)["anatomy_share_pct"] == 0.0     # no foreground
    pm = plausibility_metrics(img, v, side=64)                  # one warp feeds both foreground figures
    assert pm["anatomy_folding_pct"] == m["anatomy_folding_pct"]
    assert pm["fg_out_of_view_pct"] == pytest.approx(foreground_out_of_view_pct(img, v))


def test_evaluate_reports_plausibility(tmp_path, tiny_ckpt2d, capsys):
    rng = np.random.default_rng(0)
    npz = tmp_path / "imgs.npz"
    np.savez(npz, images=rng.random((2, 32, 32)).astype(np.float32))
    assert main(["evaluate", "--weights", str(tiny_ckpt2d), "--images", str(npz), "--t-prime", "3",
                 "--samples", "2", "--schedule", "paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pl = out["results"][0]["plausibility"]
    for key in ("affine_share_pct", "affine_zoom", "affine_rotation_deg", "affine_residual_max_pct",
                "affine_residual_mean_pct", "fg_out_of_view_pct", "anatomy_folding_pct", "anatomy_max_disp_pct",
                "anatomy_share_pct"):
        assert np.isfinite(pl[key]["mean"]), key
    assert 0.0 <= pl["affine_share_pct"]["mean"] <= 100.0


def test_weights_table_runs_and_prints_both_tables(tmp_path, tiny_ckpt2d):
    from benchmarks import weights_table as wt
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "unseen2d_brain.npz", images=rng.random((2, 32, 32)).astype(np.float32))
    rec = wt.run_table([("tiny", str(tiny_ckpt2d))], tmp_path, tmp_path / "nokit", [3], 2, log=lambda m: None)
    assert [(r["model"], r["set"]) for r in rec["rows"]] == [("tiny", "brain")]   # other sets absent: skipped
    md = wt.markdown(rec)
    assert md.count("| tiny (2D, S=32) | brain | 3 |") == 3 and "foreground out of view" in md
    assert "folding in the anatomy" in md
    old = json.loads(json.dumps(rec))                 # a record saved before the anatomy figures
    for row in old["rows"]:
        for r in row["results"]:
            for key in ("anatomy_folding_pct", "anatomy_max_disp_pct", "anatomy_share_pct"):
                del r["plausibility"][key]
    assert wt.markdown(old).count("| tiny (2D, S=32) | brain | 3 |") == 2
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    assert wt.main(["--from-json", str(tmp_path / "rec.json")]) == 0


def test_weights_table_traces_a_mean_to_the_source_volumes(tmp_path, tiny_ckpt2d, capsys):
    """Every generation is kept with its image and seed; the last table splits a set by the source
    volume of its images (make_eval_sets.py's unseen2d.json), generation i on image i mod n."""
    from benchmarks import weights_table as wt
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "unseen2d_brain.npz", images=rng.random((3, 32, 32)).astype(np.float32))
    (tmp_path / "unseen2d.json").write_text(json.dumps(
        {"brain": {"slices": [["head_a.nii.gz", 4], ["head_a.nii.gz", 9], ["head_b.nii.gz", 2]]}}))
    rec = wt.run_table([("tiny", str(tiny_ckpt2d))], tmp_path, tmp_path / "nokit", [3], 4, log=lambda m: None)
    gens = rec["rows"][0]["results"][0]["generations"]
    assert [(g["image"].rsplit("[", 1)[1], g["seed"]) for g in gens] == [("0]", 0), ("1]", 1), ("2]", 2), ("0]", 3)]
    assert all(np.isfinite(g[k]) for g in gens for k in ("folding_pct", "max_disp_pct", "affine_zoom"))
    assert rec["rows"][0]["results"][0]["folding_pct"]["mean"] == pytest.approx(
        np.mean([g["folding_pct"] for g in gens]))
    split = wt.by_source(rec, wt._sources(tmp_path))
    assert "| tiny | brain | 3 | head_a.nii.gz | 3 |" in split and "| tiny | brain | 3 | head_b.nii.gz | 1 |" in split
    (tmp_path / "rec.json").write_text(json.dumps(rec))
    assert wt.main(["--from-json", str(tmp_path / "rec.json"), "--eval-dir", str(tmp_path)]) == 0
    assert "head_b.nii.gz" in capsys.readouterr().out
    assert wt.by_source(json.loads(json.dumps(rec).replace('"generations"', '"old"'))) == ""


def test_dark_frame_benchmark_reframes_and_reports_each_framing(tmp_path, tiny_ckpt2d, capsys):
    """benchmarks/dark_frame.py: shrinking puts the content in a zero frame, magnifying crops it;
    one row per model, set and framing, with the zoom and folding of every generation."""
    import torch

    from benchmarks import dark_frame as df
    x = torch.ones(1, 1, 32, 32)
    shrunk, big = df.reframe(x, 0.5), df.reframe(x, 1.5)
    assert shrunk[0, 0, 16, 16] == 1.0 and shrunk[0, 0, 0, 0] == 0.0
    assert 0.2 < float(shrunk.mean()) < 0.3                  # about 0.5^2 of the area
    assert torch.allclose(big, x) and torch.equal(df.reframe(x, 1.0), x)
    blob = torch.zeros(1, 1, 64, 64)
    blob[0, 0, 20:36, 10:30] = 1.0                          # 16 rows x 20 columns, off centre
    fitted = df.fit_to_anatomy(blob, 0.0, 0.05)
    rows, cols = torch.nonzero(fitted[0, 0] > 0.5).T
    assert (int(cols.min()), int(cols.max())) == (0, 63)     # the longer side fills the grid
    assert abs(float(rows.float().mean()) - 31.5) < 1.0 and 44 <= int(rows.max() - rows.min()) + 1 <= 54
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "unseen2d_ct.npz", images=rng.random((3, 32, 32)).astype(np.float32))
    out = tmp_path / "df.json"
    assert df.main(["--models", "--extra", f"tiny={tiny_ckpt2d}", "--eval-dir", str(tmp_path), "--sets", "ct",
                    "--images", "2", "--t-prime", "3", "--fit-margin", "0.05", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["framing"] for r in rows] == ["as is", "shrunk 0.7 in a dark frame", "magnified 1.3",
                                            "fitted to the anatomy, margin 0.05"]
    assert all(r["generations"] == 2 and np.isfinite(r["affine_zoom"]["mean"]) for r in rows)
    assert printed.count("| tiny | ct |") == 4
    assert df.main(["--models", "--extra", f"tiny={tiny_ckpt2d}", "--eval-dir", str(tmp_path), "--sets", "ct",
                    "--indices", "2", "0", "--t-prime", "2", "--coarsen", "2", "3", "--cut", "0.8", "--combined",
                    "--only", "as is", "coarsened", "cut", "combined", "--json", str(out), "--force"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["framing"] for r in rows] == ["as is", "coarsened 2 x 3", "cut at 0.8 of the anatomy",
                                            "combined: cut 0.8, coarsened 2 x 3, shrunk 0.7"]
    head = df.cut_anatomy(blob, 0.5, 0.05)                  # columns 10..29: keeps 10..20
    assert head[0, 0, 25, 20] == 1.0 and head[0, 0, 25, 21:].eq(0).all() and head[0, 0, 25, 10] == 1.0
    assert [p["image"] for p in rows[1]["per_generation"]] == [2, 0]
    for bad in (["--shrink", "1.2"], ["--magnify", "0.9"], ["--images", "0"], ["--fit-margin", "0.7"],
                ["--coarsen", "0.5", "2"], ["--indices", "-1"], ["--cut", "1.0"]):
        with pytest.raises(SystemExit) as e:
            df.main(["--models", "--eval-dir", str(tmp_path)] + bad)
        assert bad[0] in str(e.value)
    for bad, says in ((["--indices", "7"], "--indices"), (["--only", "rotated"], "--only rotated")):
        with pytest.raises(SystemExit) as e:
            df.main(["--models", "--extra", f"tiny={tiny_ckpt2d}", "--eval-dir", str(tmp_path), "--sets", "ct",
                     "--t-prime", "2"] + bad)
        assert says in str(e.value)


def test_generalisation_gap_benchmark_scores_both_splits_and_names_bad_input(tmp_path, tiny_ckpt2d, capsys):
    """benchmarks/generalisation_gap.py: the chosen training images and every validation image of
    a prepared file, one table row per split; bad input is one line naming the option."""
    from benchmarks import generalisation_gap as gg
    rng = np.random.default_rng(3)
    prep = tmp_path / "prep.npz"
    np.savez(prep, train_images=(rng.random((4, 32, 32)) * 255).astype(np.uint8),
             val_images=(rng.random((2, 32, 32)) * 255).astype(np.uint8),
             train_source=np.array([0, 1, 2, 3], np.int16), val_source=np.array([4, 5], np.int16))
    out = tmp_path / "gap.json"
    assert gg.main(["--weights", str(tiny_ckpt2d), "--prepared", str(prep), "--train-images", "1", "3",
                    "--samples", "2", "--t-prime", "3", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["splits"]["train"]["indices"] == [1, 3] and rec["splits"]["train"]["sources"] == [1, 3]
    assert rec["splits"]["val"]["indices"] == [0, 1]
    assert all(row["results"]["n"] == 2 and np.isfinite(row["results"]["folding_pct"]["mean"])
               for row in rec["splits"].values())
    printed = capsys.readouterr().out
    assert "| train | 2 |" in printed and "| val | 2 |" in printed
    assert gg.main(["--weights", str(tiny_ckpt2d), "--prepared", str(prep), "--splits", "val", "--val-images", "1",
                    "--samples", "1", "--t-prime", "3", "--input-padding", "4", "--json", str(out), "--force"]) == 0
    rec = json.loads(out.read_text())
    assert list(rec["splits"]) == ["val"] and rec["splits"]["val"]["indices"] == [1] and rec["input_padding"] == 4
    np.savez(tmp_path / "wrong.npz", train_images=np.zeros((2, 16, 16), np.uint8),
             val_images=np.zeros((1, 16, 16), np.uint8))
    for bad, word in ((["--prepared", str(tmp_path / "none.npz")], "--prepared"),
                      (["--prepared", str(prep), "--train-images", "9"], "--train-images"),
                      (["--prepared", str(prep), "--val-images", "2"], "--val-images"),
                      (["--prepared", str(prep), "--samples", "0"], "--samples"),
                      (["--prepared", str(tmp_path / "wrong.npz")], "--prepared")):
        with pytest.raises(SystemExit) as e:
            gg.main(["--weights", str(tiny_ckpt2d)] + bad)
        assert str(e.value).startswith(word) and "\n" not in str(e.value)


def test_reverse_trace_benchmark_records_every_step_and_names_bad_input(tmp_path, tiny_ckpt2d, capsys):
    """benchmarks/reverse_trace.py: one row per reverse step of the model's default loop (mean
    over the generations), consistent with the generation itself; the forward steps never fold."""
    from benchmarks import reverse_trace as rt
    from napari_drdm.commands.evaluate import collect_images
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "unseen2d_ct.npz", images=rng.random((2, 32, 32)).astype(np.float32))
    out = tmp_path / "trace.json"
    assert rt.main(["--models", "--extra", f"tiny={tiny_ckpt2d}", "--eval-dir", str(tmp_path), "--set", "ct",
                    "--t-prime", "3", "--samples", "2", "--every", "2", "--targets", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    model = load_model(str(tiny_ckpt2d))
    steps = rec["models"][0]["steps"]
    ts = [r["t"] for r in steps]
    assert ts == sorted(ts, reverse=True) and ts[-1] == 0
    images = collect_images([str(tmp_path / "unseen2d_ct.npz")], 2)
    x = torch.cat([model.prepare(a, sp)[1] for _, a, sp in images], 0)
    phi, _ = model.generate_model_grid(x, 3, [0, 1])
    from napari_drdm.core.metrics import folding_pct
    final = np.mean([folding_pct(phi[b].numpy()) for b in range(2)])
    assert abs(steps[-1]["phi_folding_pct"] - final) < 1e-6          # the last row is the generation
    for r in steps:
        assert 0 <= r["step_folding_pct"] <= 100 and r["step_mean_abs_px"] >= 0
        if r["step_folded_px"]:
            assert 0 <= r["step_folds_near_border_pct"] <= 100
    assert [r["step_folding_pct"] for r in rec["targets"]] == [0.0] * len(rec["targets"])
    assert "| t | phi folding % |" in capsys.readouterr().out
    for bad, word in ((["--samples", "0"], "--samples"), (["--extra", "nope"], "--extra"),
                      (["--eval-dir", str(tmp_path / "none")], "--eval-dir")):
        with pytest.raises(SystemExit) as e:
            rt.main(["--models", "--eval-dir", str(tmp_path), "--set", "ct"] + bad)
        assert str(e.value).startswith(word)


# the names users type (README, `drdm weights`): renaming or dropping one breaks their commands
BUNDLED = {"cmr2d": {"published2d", "upstream2d"}, "general2d": set(), "brain2d": {"drdm2d"}, "brain3d": {"drdm3d"},
           "general3d": set()}


def test_bundled_names_aliases_and_files():
    reg = registry()
    assert {n: set(e.get("aliases", [])) for n, e in reg.items()} == BUNDLED
    words = list(reg) + [a for e in reg.values() for a in e.get("aliases", [])]
    assert len(words) == len(set(words)), "a name or alias is used twice"
    files = sorted(p.name for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert sorted(e["file"] for e in reg.values()) == files            # no unregistered or missing file
    for name, e in reg.items():
        for word in [name, *e.get("aliases", [])]:
            assert resolve_weights(word) == (WEIGHTS_DIR / e["file"], name)
        assert len(e["sha256"]) == 64 and e.get("description") and e.get("provenance"), name


def test_a_loaded_model_carries_the_registered_name_and_hash():
    e = registry()["brain2d"]
    m = load_model("drdm2d", device="cpu")
    assert (m.name, m.sha256, m.ndim, m.size) == ("brain2d", e["sha256"], e["ndim"], e["size"])


def test_user_weights_folders_from_drdm_weights_dir(tmp_path, monkeypatch, tiny_checkpoint, capsys):
    """DRDM_WEIGHTS_DIR (folders separated by os.pathsep): their *.safetensors load by stem name;
    a bundled name is never shadowed by a user file."""
    import os
    from pathlib import Path
    a, b = tmp_path / "a", tmp_path / "b"
    mine = tiny_checkpoint(2, 16, path=a / "mine.safetensors")
    theirs = tiny_checkpoint(3, 16, path=b / "theirs.safetensors")
    tiny_checkpoint(2, 16, path=b / "cmr2d.safetensors")
    with pytest.raises(LookupError, match="unknown weights 'mine'.*cmr2d"):
        resolve_weights("mine")
    monkeypatch.setenv("DRDM_WEIGHTS_DIR", os.pathsep.join([str(a), str(b)]))
    with pytest.warns(FutureWarning, match="DRDM_WEIGHTS_DIR is deprecated: set NAPARI_DRDM_WEIGHTS_DIR"):
        assert resolve_weights("mine") == (Path(mine), "mine")
    assert resolve_weights("theirs") == (Path(theirs), "theirs")
    assert resolve_weights("cmr2d") == (WEIGHTS_DIR / registry()["cmr2d"]["file"], "cmr2d")
    m = load_model("theirs", device="cpu")
    assert (m.name, m.ndim, m.size) == ("theirs", 3, 16)
    user = [e for e in list_weights() if not e["bundled"]]
    assert [(e["name"], e["path"]) for e in user] == [("mine", mine), ("cmr2d", str(b / "cmr2d.safetensors")),
                                                      ("theirs", theirs)]
    assert main(["weights"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(ln for ln in out if ln.startswith("mine "))
    assert "user" in line and line.endswith(mine)
    assert out[out.index(line) + 1].startswith("    generates with: reference loop")   # a user file's too
    with pytest.raises(LookupError, match="unknown weights 'nobody'"):
        resolve_weights("nobody")


def test_fold_locations_finds_a_planted_border_fold_and_runs(tmp_path, tiny_ckpt2d, capsys):
    from benchmarks import fold_locations as fl
    img = np.zeros((32, 32), np.float32)
    img[8:24, 8:24] = 1.0                                  # foreground in the middle
    phi = np.zeros((2, 32, 32), np.float32)
    phi[0, 0:2, 10:14] = np.array([0.0, -3.0])[:, None]    # rows 0-1 swap order: folds at the top border
    phi[1, 16, 16] = 0.4                                    # the largest displacement elsewhere is small
    r = fl.locate(phi, img, band=4)
    assert r["folding_pct"] > 0 and r["folding_fg_pct"] == 0.0
    assert r["folds_in_band_pct"] == 100.0 and r["band_share_pct"] < 50.0
    assert r["max_disp_to_border"] <= 1 and not r["max_disp_in_fg"] and r["max_disp_fg_pct"] == pytest.approx(0.4 / 32 * 100)
    np.savez(tmp_path / "imgs.npz", images=np.stack([img, img.T]))
    assert fl.main(["--weights", str(tiny_ckpt2d), "--images", str(tmp_path / "imgs.npz"), "--max-images", "1",
                    "--seeds", "0", "--t-prime", "3", "--json", str(tmp_path / "out.json")]) == 0
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["seed"] == 0 and "folding" in capsys.readouterr().out


def test_gallery_draws_the_tables_generations(tmp_path, tiny_ckpt2d, capsys):
    """benchmarks/gallery.py: a drawn generation is the weights table's generation with the same
    number (image i mod n, seed i), figures included; one PNG and a JSON of every panel; a bad
    option is one line naming it."""
    from benchmarks import gallery as ga
    from benchmarks import weights_table as wt
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "unseen2d_brain.npz", images=rng.random((3, 32, 32)).astype(np.float32))
    rec = wt.run_table([("tiny", str(tiny_ckpt2d))], tmp_path, tmp_path / "nokit", [3], 5, log=lambda m: None)
    table = rec["rows"][0]["results"][0]["generations"]
    png, js = tmp_path / "g.png", tmp_path / "g.json"
    assert ga.main(["--extra", f"tiny={tiny_ckpt2d}", "--models", "--eval-dir", str(tmp_path), "--kit",
                    str(tmp_path / "nokit"), "--t-prime", "3", "--generations", "1", "4", "--out", str(png),
                    "--json", str(js)]) == 0
    assert png.stat().st_size > 10_000
    panels = json.loads(js.read_text())["models"][0]["panels"]
    assert [(p["image"], p["seed"]) for p in panels] == [(table[i]["image"], table[i]["seed"]) for i in (1, 4)]
    for p, i in zip(panels, (1, 4)):
        assert p["folding_pct"] == pytest.approx(table[i]["folding_pct"], abs=1e-6)
        assert p["max_disp_pct"] == pytest.approx(table[i]["max_disp_pct"], abs=1e-6)
    assert "seed 4" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ga.main(["--models", "--out", str(png), "--per-row", "0"])
    assert "--per-row" in str(e.value) and "\n" not in str(e.value)
    for script, extra in ((ga, ["--out", str(png)]), (wt, [])):   # both refuse as the command line is read
        with pytest.raises(SystemExit) as e:
            script.main(["--models", "--keep-size", "yes"] + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--keep-size must be 'on', 'off' or 'inflation'" in err and "Traceback" not in err


def test_paired_comparison_of_two_records(tmp_path, capsys):
    """benchmarks/paired.py: the mean difference over the generations both records hold (same image
    and seed) with its standard error; a record without generations, or a missing file, is one line."""
    from benchmarks import paired as pb

    def record(model, values, seeds=(0, 1, 2, 3)):
        gens = [{"image": f"b.npz[{s % 2}]", "seed": s, "max_disp_pct": v} for s, v in zip(seeds, values)]
        return {"rows": [{"model": model, "set": "brain", "results": [{"t_prime": 45, "generations": gens}]}]}
    base, other = record("a", [10.0, 12.0, 14.0, 16.0]), record("b", [11.0, 12.5, 15.0, 16.5, 99.0], (0, 1, 2, 3, 4))
    rows = pb.table(base, [other], ["max_disp_pct"])
    assert len(rows) == 1 and rows[0]["n"] == 4 and rows[0]["model"] == "b"
    assert rows[0]["diff"] == pytest.approx(0.75)                  # 1, 0.5, 1, 0.5: seed 4 is not in the base
    assert rows[0]["se"] == pytest.approx(np.std([1, 0.5, 1, 0.5], ddof=1) / 2)
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert pb.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--figures", "max_disp_pct"]) == 0
    assert "| brain | 45 | max_disp_pct | a | 13.00 | b | 13.75 | +0.75 ± 0.14 | 4 |" in capsys.readouterr().out
    (tmp_path / "old.json").write_text(json.dumps({"rows": [{"model": "a", "set": "brain", "results": [{"t_prime": 45}]}]}))
    for args, match in (([str(tmp_path / "old.json"), str(tmp_path / "b.json")], "keeps no generations"),
                        ([str(tmp_path / "none.json"), str(tmp_path / "b.json")], "no such file")):
        with pytest.raises(SystemExit, match=match) as e:
            pb.main(args)
        assert "\n" not in str(e.value)

    # --plot: one T' at a time; records pairing at two need --plot-t-prime (one line otherwise)
    for rec in (base, other):
        res = rec["rows"][0]["results"]
        res.append(dict(res[0], t_prime=70))
    (tmp_path / "a2.json").write_text(json.dumps(base))
    (tmp_path / "b2.json").write_text(json.dumps(other))
    png = tmp_path / "p.png"
    with pytest.raises(SystemExit, match="pair at T' = 45, 70; choose one with --plot-t-prime") as e:
        pb.main([str(tmp_path / "a2.json"), str(tmp_path / "b2.json"), "--plot", str(png)])
    assert not png.exists()
    assert pb.main([str(tmp_path / "a2.json"), str(tmp_path / "b2.json"), "--plot", str(png), "--plot-t-prime", "70",
                    "--target", "16"]) == 0
    assert png.stat().st_size > 5_000
    with pytest.raises(SystemExit, match="no paired max_disp_pct on the brain set at T' = 30"):
        pb.main([str(tmp_path / "a2.json"), str(tmp_path / "b2.json"), "--plot", str(tmp_path / "q.png"),
                 "--plot-t-prime", "30"])
