"""The fold guard (issue 13): fold-free fields under the central and the strict Jacobian check,
untouched fields bit-identical, the guard's place in generation, the CLI and the export."""
from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_drdm.cli import main
from napari_drdm.core.foldguard import fold_mask, guard_field
from napari_drdm.core.metrics import displacement_pct, folding_pct, jacobian_determinant, strict_folding_pct
from napari_drdm.model import DRDM, guard_mode
from napari_drdm.outputs import nifti_array_to_ddf


def strict_mask(u: np.ndarray) -> np.ndarray:
    """Independent per-pixel strict check: det(I + J) for every choice of a forward or backward
    difference per axis (the existing side at the border)."""
    nd = u.shape[0]
    fwd, bwd = [], []
    for k in range(nd):
        d = np.diff(u, axis=k + 1)
        first = np.take(d, [0], axis=k + 1)
        last = np.take(d, [-1], axis=k + 1)
        fwd.append(np.concatenate([d, last], axis=k + 1))
        bwd.append(np.concatenate([first, d], axis=k + 1))
    bad = np.zeros(u.shape[1:], bool)
    for choice in itertools.product((0, 1), repeat=nd):
        J = np.stack([(fwd if c else bwd)[k] for k, c in enumerate(choice)], axis=1)  # (d_out, d_axis, ...)
        J = np.moveaxis(J, (0, 1), (-2, -1)) + np.eye(nd)
        bad |= np.linalg.det(J) <= 0
    return bad


def smooth_field(shape, amp, seed=0, passes=3):
    g = torch.Generator().manual_seed(seed)
    nd = len(shape)
    u = torch.randn((1, nd) + tuple(shape), generator=g)
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    for _ in range(passes):
        u = pool(F.pad(u, (2, 2) * nd, mode="replicate"), 5, stride=1)
    return u / u.abs().max() * amp


def plant_fold(u, centre, strength=3.0, sigma=3.0):
    """Add a local collapse: a radial displacement pulling pixels past the centre (det < 0 there)."""
    nd = u.shape[1]
    axes = [torch.arange(n, dtype=torch.float32) for n in u.shape[2:]]
    grids = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    rel = grids - torch.tensor(centre, dtype=torch.float32).view(nd, *([1] * nd))
    w = torch.exp(-(rel ** 2).sum(0) / (2 * sigma ** 2))
    return u - strength * rel[None] * w


def both_checks_clean(u) -> bool:
    """No fold under the Table-1 check, the metrics' strict check and the independent strict mask."""
    a = u[0].detach().cpu().numpy().astype(np.float64)
    return folding_pct(a) == 0.0 and strict_folding_pct(a) == 0.0 and not strict_mask(a).any()


def test_fold_mask_matches_the_metrics_2d_3d():
    for shape in [(23, 31), (9, 11, 10)]:
        u = smooth_field(shape, 4.0, seed=1, passes=1)
        a = u[0].numpy().astype(np.float64)
        expect = (jacobian_determinant(a) <= 0) | strict_mask(a)
        got = fold_mask(u, margin=0.0)[0].numpy()
        assert expect.any() and (~expect).any()
        np.testing.assert_array_equal(got, expect)
        assert 100 * strict_mask(a).mean() == pytest.approx(strict_folding_pct(a))
        # the float32 screen agrees away from the threshold
        assert (fold_mask(u, 0.0, exact=False)[0].numpy() != got).mean() < 1e-3


@pytest.mark.parametrize("shape,centres", [((64, 72), [(30, 40), (0, 0), (63, 35)]),
                                           ((24, 28, 20), [(12, 14, 10), (0, 27, 19)])])
def test_planted_folds_removed_locally(shape, centres):
    u0 = smooth_field(shape, 2.0, seed=3)
    assert both_checks_clean(u0)
    u = u0
    for c in centres:                       # inside, at a corner, on an edge
        u = plant_fold(u, c, sigma=3.0 if len(shape) == 2 else 2.0)
    assert folding_pct(u[0].numpy()) > 0 and strict_folding_pct(u[0].numpy()) > 0
    g, rep = guard_field(u)
    assert both_checks_clean(g)
    assert rep.fallback == [1.0] and rep.rounds[0] > 0
    assert (fold_mask(g)).sum() == 0                          # margin kept
    changed = (g != u).any(1)[0]
    assert 0 < changed.float().mean() < 0.35                  # local change only
    far = torch.ones_like(changed)
    for c in centres:                                         # far from every fold: bit-identical
        sl = tuple(slice(max(0, ci - 14), ci + 15) for ci in c)
        far[sl] = False
    assert not changed[far].any()
    m0, m1 = displacement_pct(u[0].numpy())[1], displacement_pct(g[0].numpy())[1]
    assert abs(m1 / m0 - 1) < 0.1


@pytest.mark.parametrize("n_folds,strength", [(20, 2.0), (40, 2.5)])
def test_3d_correction_fades_out_at_the_edge_of_the_changed_region(n_folds, strength):
    # many scattered folds, as the 3D model leaves them at a large T': the correction must fade out
    # towards the untouched field rather than stop with a jump (a jump at the region's edge makes
    # new folds there, and chasing them spread the change over the whole volume); a hard-edged
    # correction steps by 60-80 % of its largest change here
    shape, nd = (32, 32, 32), 3
    u = smooth_field(shape, 3.0, seed=11)
    g = torch.Generator().manual_seed(4)
    for c in torch.randint(0, min(shape), (n_folds, nd), generator=g).tolist():
        u = plant_fold(u, c, strength=strength, sigma=1.5)
    assert strict_folding_pct(u[0].numpy()) > 1.0
    out, rep = guard_field(u)
    assert both_checks_clean(out) and rep.fallback == [1.0]
    d = (out - u).norm(dim=1)[0]
    changed = d > 0
    edge = changed & (F.max_pool3d((~changed)[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0)
    assert 0 < changed.float().mean() < 0.6 and edge.any()
    assert float(d[edge].max()) < 0.3 * float(d.max())          # small steps into the untouched field
    m0, m1 = displacement_pct(u[0].numpy())[1], displacement_pct(out[0].numpy())[1]
    assert abs(m1 / m0 - 1) < 0.1


def test_fold_free_fields_come_out_bit_identical():
    for shape in [(40, 33), (12, 10, 14)]:
        u = smooth_field(shape, 1.5, seed=5)
        g, rep = guard_field(u)
        assert g is u and rep.folded_before == [0] and rep.changed == [0]
    # in a batch: only the folded sample changes
    clean = smooth_field((40, 33), 1.5, seed=6)
    folded = plant_fold(smooth_field((40, 33), 1.5, seed=7), (20, 16))
    g, rep = guard_field(torch.cat([clean, folded]))
    assert torch.equal(g[0], clean[0]) and not torch.equal(g[1], folded[0])
    assert rep.folded_before[0] == 0 and rep.folded_before[1] > 0
    assert both_checks_clean(g[1:2])


def test_fallback_terminates_fold_free():
    for shape in [(20, 20), (8, 9, 10)]:
        u = smooth_field(shape, 8.0, seed=2, passes=1)          # folds almost everywhere
        g, rep = guard_field(u, max_rounds=0)                    # no smoothing: the fallback must do it
        assert rep.fallback[0] < 1.0 and both_checks_clean(g)
        zero = torch.zeros((1, len(shape)) + shape)
        assert guard_field(zero)[0] is zero


def test_guard_mode_and_errors():
    assert guard_mode(False) is None and guard_mode(True) == "final" and guard_mode("step") == "step"
    with pytest.raises(ValueError, match="fold_guard"):
        guard_mode("sometimes")
    with pytest.raises(ValueError, match="shape"):
        guard_field(torch.zeros(1, 3, 8, 8))


@pytest.fixture
def folding_model(tiny_checkpoint):
    # random weights on a large forward field: the recovered field folds
    return DRDM.from_checkpoint(tiny_checkpoint(2, 32, seed=1))


def test_generate_fold_guard_original_grid_and_frames(folding_model):
    img = np.random.default_rng(0).random((37, 50)).astype(np.float32)
    kw = dict(t_prime=40, seed=2, schedule="paper", spacing=(1.0, 1.3))
    off = folding_model.generate(img, **kw)
    again = folding_model.generate(img, fold_guard=False, **kw)
    np.testing.assert_array_equal(off.ddf, again.ddf)                # the guard off changes nothing
    assert off.guard is None
    assert folding_pct(off.ddf) > 0 or strict_folding_pct(off.ddf) > 0
    for mode in ("final", "step", "chain"):
        on = folding_model.generate(img, fold_guard=mode, return_frames=True, **kw)
        assert on.ddf.shape == off.ddf.shape
        assert folding_pct(on.ddf) == 0 and strict_folding_pct(on.ddf) == 0, mode   # the returned field
        assert on.metrics["folding_pct"] == 0 and on.guard["method"] == mode
        rec = [f for f in on.frames if f.phase == "recovery"]
        assert len(rec) == 40
        for f in rec:
            assert folding_pct(f.ddf) == 0 and strict_folding_pct(f.ddf) == 0 and f.guard is not None
        if mode == "final":       # same reverse loop: only the final correction differs
            np.testing.assert_array_equal(on.forward_ddf, off.forward_ddf)
            assert on.guard["folded_pct_before"][0] > 0


def test_generate_model_grid_final_equals_guarded_unguarded(folding_model):
    from napari_drdm.fold_report import compare_guard, summarise_rows
    x = torch.rand(2, 1, 32, 32)
    phi, _ = folding_model.generate_model_grid(x, 30, [0, 1])
    info = {}
    phi_g, _ = folding_model.generate_model_grid(x, 30, [0, 1], fold_guard=True, guard_report=info)
    assert torch.equal(phi_g, guard_field(phi)[0]) and info["method"] == "final"
    rows = compare_guard(folding_model, x, 30, [0, 1])
    s = summarise_rows(rows)
    assert s["on"]["share_with_any_fold"] == 0 and s["on"]["share_with_any_strict_fold"] == 0
    assert s["off"]["share_with_any_strict_fold"] > 0
    assert s["on"]["inverse_residual_mean_px"] > 0 and s["time_ratio"] >= 1.0


def test_transform_fold_guard(folding_model):
    from napari_drdm.transforms import DRDMTransform
    img = np.random.default_rng(1).random((1, 40, 36)).astype(np.float32)
    out = DRDMTransform(folding_model, label_keys=(), t_prime=40, seed=0, ddf_key="ddf", fold_guard=True,
                        schedule="paper")({"image": img})
    assert folding_pct(out["ddf"]) == 0 and strict_folding_pct(out["ddf"]) == 0


def test_cli_generate_writes_the_checked_field(tmp_path, capsys, tiny_checkpoint):
    ck = tiny_checkpoint(3, 16, seed=1)
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.0, 2.0, 1.0])
    ip = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((18, 21, 12)).astype(np.float32), aff), str(ip))
    base = ["generate", str(ip), "--weights", str(ck), "--t-prime", "30", "--schedule", "paper"]
    assert main(base + ["--out", str(tmp_path / "on")]) == 0             # default: on
    assert "fold guard" in capsys.readouterr().out
    assert main(base + ["--no-fold-guard", "--out", str(tmp_path / "off")]) == 0
    fields = {}
    for tag in ("on", "off"):
        arr = np.asanyarray(nib.load(tmp_path / tag / "v_ddf.nii.gz").dataobj)
        fields[tag] = nifti_array_to_ddf(arr, (1.5, 1.0, 2.0))
    assert folding_pct(fields["on"]) == 0 and strict_folding_pct(fields["on"]) == 0
    assert strict_folding_pct(fields["off"]) > 0
    side = json.loads((tmp_path / "on" / "v.json").read_text())
    assert side["fold_guard"]["method"] == "final"


def test_export_fold_guard_and_reproduce(tmp_path, tiny_checkpoint):
    from napari_drdm.export import ArrayInput, ExportOptions, reproduce_row, run_export
    model = DRDM.from_checkpoint(tiny_checkpoint(2, 32, seed=1))
    img = np.random.default_rng(2).random((30, 44)).astype(np.float32)
    out = tmp_path / "set"
    opts = ExportOptions(per_image=2, t_prime="40", schedule="paper", fold_guard=True, inverse=True)
    run_export([ArrayInput("a", img)], out, opts, model=model)
    m = json.loads((out / "manifest.json").read_text())
    for row in m["rows"]:
        assert row["fold_guard"] is True and row["folding_pct"] == 0
        ddf = nifti_array_to_ddf(np.asanyarray(nib.load(out / row["ddf"]).dataobj), (1.0, 1.0))
        assert folding_pct(ddf) == 0 and strict_folding_pct(ddf) == 0
    res = reproduce_row(out, m["rows"][0]["row_id"], tmp_path / "again", model=model)
    assert all(res["identical"].values())


def test_cli_evaluate_fold_guard(tmp_path, capsys, tiny_checkpoint):
    ck = tiny_checkpoint(2, 32, seed=1)
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    rc = main(["evaluate", "--weights", str(ck), "--images", str(npz), "--t-prime", "30", "--samples", "2",
               "--schedule", "paper", "--fold-guard", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    (g,) = out["fold_guard"]
    assert g["t_prime"] == 30 and g["n"] == 2 and g["on"]["share_with_any_strict_fold"] == 0
    assert g["off"]["folding_pct_mean"] == pytest.approx(out["results"][0]["folding_pct"]["mean"])
    for key in ("max_disp_pct_mean", "mean_disp_pct_mean", "inverse_residual_mean_px", "seconds_per_generation"):
        assert key in g["on"] and key in g["off"]


def test_dilation_is_the_box_dilation_and_handles_any_radius():
    from napari_drdm.core.foldguard import _dilate
    g = torch.Generator().manual_seed(0)
    for shape in [(2, 30, 41), (1, 9, 12, 10)]:
        m = torch.rand(shape, generator=g) > 0.97
        pool = F.max_pool2d if len(shape) == 3 else F.max_pool3d
        for r in (1, 2, 5):
            ref = pool(m[:, None].float(), 2 * r + 1, stride=1, padding=r)[:, 0] > 0
            assert torch.equal(_dilate(m, r), ref)
        assert bool(_dilate(m, 10 ** 6).all())                 # the fallback's last neighbourhood


def test_benchmark_keeps_and_reuses_the_unguarded_fields(tmp_path, tiny_checkpoint):
    from benchmarks.fold_guard import main as bench
    ck = tiny_checkpoint(2, 32, seed=1)
    np.savez(tmp_path / "unseen2d_cardiac.npz", images=np.random.default_rng(0).random((2, 32, 32)).astype(np.float32))
    base = ["--eval", str(tmp_path), "--models", ck, "--sets", "cardiac", "--per-set", "1", "--t-prime", "30"]
    assert bench(base + ["--save-fields", str(tmp_path / "f"), "--json", str(tmp_path / "a.json")]) == 0
    (saved,) = sorted((tmp_path / "f").glob("*.pt"))
    assert bench(base + ["--fields", str(tmp_path / "f"), "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text())["runs"][0]["rows"][0] for n in ("a.json", "b.json"))
    assert a["off"] == b["off"] and a["seconds_off"] == b["seconds_off"]       # the same field, not a new loop
    assert b["on"]["strict_folding_pct"] == 0 and b["off"]["strict_folding_pct"] > 0
    assert torch.load(saved, weights_only=True)["phi"].shape == (1, 2, 32, 32)
