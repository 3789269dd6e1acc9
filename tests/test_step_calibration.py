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
