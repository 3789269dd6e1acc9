"""benchmarks/step_calibration.py: the size of a model's steps against the steps they undo."""
from __future__ import annotations

import json

import numpy as np
import pytest


def _eval_dir(tmp_path):
    rng = np.random.default_rng(5)
    for name, n in (("brain", 3), ("ct", 2)):
        np.savez(tmp_path / f"unseen2d_{name}.npz", images=rng.random((n, 32, 32)).astype(np.float32))
    (tmp_path / "unseen2d.json").write_text(json.dumps(
        {"brain": {"slices": [["head_a/a.nii.gz", 1], ["head_b/b.nii.gz", 2], ["head_b/b.nii.gz", 3]]}}))
    return tmp_path


def test_a_silent_network_undoes_nothing_and_sets_split_by_source(tmp_path, tiny_checkpoint, capsys):
    from benchmarks import step_calibration as sc
    silent = tiny_checkpoint(2, 32, silent_head=True, name="silent")
    noisy = tiny_checkpoint(2, 32, seed=1, name="noisy")
    out = tmp_path / "cal.json"
    assert sc.main(["--models", "--extra", f"silent={silent}", f"noisy={noisy}", "--eval-dir", str(_eval_dir(tmp_path)),
                    "--t", "3", "9", "--images", "2", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    silent_rec, noisy_rec = rec["models"]
    assert sorted(silent_rec["groups"]) == ["brain: head_a", "brain: head_b", "ct"]
    assert [r["n"] for r in silent_rec["groups"]["brain: head_b"]] == [2, 2]
    for rows in silent_rec["groups"].values():         # a zero estimate: slope and size ratio 0
        for r in rows:
            assert r["slope"] == 0.0 and r["ratio"] == 0.0 and r["slope_fg"] == 0.0
    for rows in noisy_rec["groups"].values():
        for r in rows:
            assert all(np.isfinite(r[k]) for k in ("slope", "cos", "ratio")) and r["ratio"] > 0
            assert -1.0 <= r["cos"] <= 1.0
    assert "| noisy | brain: head_a | 9 |" in capsys.readouterr().out


def test_bad_arguments_are_one_line(tmp_path, tiny_ckpt2d):
    from benchmarks import step_calibration as sc
    with pytest.raises(SystemExit, match="--images: expected a positive number"):
        sc.main(["--models", "--extra", f"x={tiny_ckpt2d}", "--images", "0"])
    with pytest.raises(SystemExit, match="no evaluation images"):
        sc.main(["--models", "--extra", f"x={tiny_ckpt2d}", "--eval-dir", str(tmp_path)])


def test_triplanar_estimate_puts_each_slice_component_on_its_own_axis():
    """A fake 2D network whose two output components are ramps along the slice's two in-plane axes
    (scaled 1 and 2): every 3D component must come out a ramp along its own axis only, the mean of
    the two slice directions that contain it (axis 0: 1 and 1; axis 1: 2 and 1; axis 2: 2 and 2)."""
    import torch

    from benchmarks.step_calibration import triplanar_estimator

    def fake(x, t, k):
        a, b = x.shape[2:]
        r0 = torch.arange(a, dtype=x.dtype).view(1, a, 1).expand(x.shape[0], a, b)
        r1 = torch.arange(b, dtype=x.dtype).view(1, 1, b).expand(x.shape[0], a, b)
        return torch.stack([r0, 2 * r1], 1)

    S = 8
    est = triplanar_estimator(fake, k=1, padding=0)(torch.rand(1, 1, S, S, S), torch.tensor([3]))
    assert est.shape == (1, 3, S, S, S)
    ramp = torch.arange(S, dtype=torch.float32)
    for d, scale in ((0, 1.0), (1, 1.5), (2, 2.0)):
        want = (scale * ramp).view([S if i == d else 1 for i in range(3)]).expand(S, S, S)
        assert torch.allclose(est[0, d], want), d


def test_triplanar_rows_score_a_2d_model_on_the_3d_models_draws(tmp_path, tiny_checkpoint, capsys):
    import nibabel as nib

    from benchmarks import step_calibration as sc
    kit = tmp_path / "kit"
    (kit / "lung1").mkdir(parents=True)
    vol = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(kit / "lung1" / "lung1_ct.nii.gz"))
    m3 = tiny_checkpoint(3, 16, name="m3")
    m2 = tiny_checkpoint(2, 32, name="m2")
    out = tmp_path / "cal.json"
    assert sc.main(["--models", "--extra", f"m3={m3}", "--kit", str(kit), "--t", "3", "--images", "1",
                    "--triplanar", m2, "--json", str(out)]) == 0
    own, tri = json.loads(out.read_text())["models"]
    assert tri["triplanar_of"] == "m3" and list(tri["groups"]) == list(own["groups"]) == ["ct"]
    assert -1.0 <= tri["groups"]["ct"][0]["cos"] <= 1.0 and tri["groups"]["ct"][0]["ratio"] > 0
    assert tri["groups"]["ct"][0]["cos"] != own["groups"]["ct"][0]["cos"]
    assert "m2 tri-planar (x1) on m3's draws | ct | 3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected a 2D model"):
        sc.main(["--models", "--extra", f"m3={m3}", "--kit", str(kit), "--t", "3", "--images", "1", "--triplanar", m3])
    with pytest.raises(SystemExit, match="--triplanar no_such_model: ") as e:
        sc.main(["--models", "--extra", f"m3={m3}", "--kit", str(kit), "--triplanar", "no_such_model"])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--triplanar-upsample: expected a positive number"):
        sc.main(["--models", "--extra", f"m3={m3}", "--triplanar", m2, "--triplanar-upsample", "0"])
