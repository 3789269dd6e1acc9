"""core/background.py: the recovered field in empty background replaced by the harmonic extension
of the field around it (benchmarks/background_extension.py measures it on the held-out slices)."""
from __future__ import annotations

import pytest
import torch

from napari_drdm.core.background import empty_background, extend_into_background, harmonic_fill
from napari_drdm.core.metrics import folding_pct


def _disc(S, r, nd=2):
    axes = torch.meshgrid(*[torch.arange(S).float() - S / 2 + 0.5] * nd, indexing="ij")
    return (sum(a ** 2 for a in axes) < r ** 2)[None, None]


def test_harmonic_fill_keeps_the_rest_reproduces_linear_fields_and_stays_within_the_boundary_values():
    S = 64
    hole = _disc(S, 18)
    yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
    linear = torch.stack([0.3 * yy - 0.2 * xx + 5.0, 0.1 * xx])[None]
    out = harmonic_fill(linear, hole, iters=200)
    assert torch.equal(out[:, :, ~hole[0, 0]], linear[:, :, ~hole[0, 0]])           # outside: untouched
    assert (out - linear).abs().max() < 0.05                  # a linear field is harmonic: recovered
    noisy = torch.randn(1, 2, S, S, generator=torch.Generator().manual_seed(0))
    filled = harmonic_fill(noisy, hole)
    inside, outside = filled[:, :, hole[0, 0]], noisy[:, :, ~hole[0, 0]]
    assert (inside.amax(-1) <= outside.amax(-1) + 1e-5).all() and (inside.amin(-1) >= outside.amin(-1) - 1e-5).all()
    assert inside.std() < 0.5 * noisy.std()                   # smooth where it was noise
    assert torch.equal(harmonic_fill(noisy, torch.zeros_like(hole)), noisy)           # nothing free


def test_empty_background_is_far_from_anatomy_in_the_input_and_the_deformed_image():
    img = torch.zeros(1, 1, 32, 32)
    img[0, 0, 10:14, 10:14] = 1.0
    moved = torch.zeros_like(img)
    moved[0, 0, 20:22, 20:22] = 1.0
    free = empty_background(img, moved, margin=3)[0, 0]
    assert not free[7:17, 7:17].any() and not free[17:25, 17:25].any()
    assert free[6, 6] and free[0, 31] and free[15, 26]
    assert torch.equal(empty_background(img, moved, 0)[0, 0], (img + moved)[0, 0] <= 0.05)
    with pytest.raises(ValueError, match="margin"):
        empty_background(img, moved, -1)


@pytest.mark.parametrize("nd", [2, 3])
def test_extend_into_background_removes_folds_there_and_keeps_the_anatomy(nd):
    S = 32 if nd == 2 else 16
    image = _disc(S, S / 6, nd).float()
    g = torch.Generator().manual_seed(1)
    phi = torch.randn((1, nd) + (S,) * nd, generator=g) * 2.0          # folds everywhere
    new, free = extend_into_background(phi, image, margin=2)
    assert free.any() and not free[(0, 0) + (S // 2,) * nd]
    assert torch.equal(new[:, :, ~free[0, 0]], phi[:, :, ~free[0, 0]])
    assert folding_pct(new[0].numpy()) < folding_pct(phi[0].numpy())


def test_background_extension_benchmark_reports_before_and_after(tmp_path, tiny_checkpoint, capsys):
    """benchmarks/background_extension.py: one row per generation with the figures before and
    after; the table groups them per set; bad input is one line naming the option."""
    import json

    import numpy as np

    from benchmarks import background_extension as be
    ck = tiny_checkpoint(2, 32, name="bg2d")
    rng = np.random.default_rng(0)
    for set_name in ("brain", "ct", "cardiac"):
        imgs = np.zeros((2, 32, 32), np.float32)
        imgs[:, 10:22, 10:22] = rng.random((2, 12, 12))
        np.savez(tmp_path / f"unseen2d_{set_name}.npz", images=imgs)
    out = tmp_path / "bg.json"
    assert be.main(["--models", "--extra", f"tiny={ck}", "--eval-dir", str(tmp_path), "--samples", "2",
                    "--t-prime", "2", "--margin", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and {r["set"] for r in rows} == {"brain", "ct", "cardiac"}
    assert all(0 < r["replaced_pct"] < 100 and r["after"]["folding_pct"] <= r["before"]["folding_pct"] + 1e-9
               for r in rows)
    assert capsys.readouterr().out.count("| tiny |") == 3          # 3 sets (no source record: no per-source rows)
    # a 3D model: the kit's held-out volumes
    import nibabel as nib
    ck3 = tiny_checkpoint(3, 16, name="bg3d")
    vol = np.zeros((16, 16, 16), np.float32)
    vol[5:11, 5:11, 5:11] = 1.0 + rng.random((6, 6, 6))
    for rel in be.SETS_3D.values():
        (tmp_path / "kit" / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "kit" / rel))
    argv3 = ["--models", "--extra", f"t3={ck3}", "--kit", str(tmp_path / "kit"), "--samples", "1",
             "--t-prime", "1", "--margin", "1", "--json", str(out)]
    before = out.read_bytes()
    with pytest.raises(SystemExit) as e:                  # the 2D record is not overwritten without --force
        be.main(argv3)
    assert e.value.code == 2 and out.read_bytes() == before
    assert f"{out} already exists" in capsys.readouterr().err
    assert be.main(argv3 + ["--force"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["set"] for r in rows] == ["brain", "ct"] and all(0 < r["replaced_pct"] < 100 for r in rows)
    for bad in (["--samples", "0"], ["--margin", "-1"]):
        with pytest.raises(SystemExit) as e:
            be.main(["--models", "--eval-dir", str(tmp_path)] + bad)
        assert bad[0] in str(e.value)
