"""benchmarks/loop_length.py: the validator's paper loop lengthened by k steps, its table and plot."""
from __future__ import annotations

import json

import pytest


def test_lengthened_loop_runs_from_t_prime_plus_k_and_leaves_the_reference_alone():
    from benchmarks import loop_length as ll
    from napari_drdm.core.recovery import reverse_timesteps
    assert ll.lengthened(0)(45, 80, "paper") == reverse_timesteps(45, 80, "paper")
    steps = ll.lengthened(12)(45, 80, "paper")
    assert steps[0] == 56 and steps[-1] == 0 and len(steps) == 57
    assert ll.lengthened(50)(45, 80, "paper") == reverse_timesteps(45, 80, "reference")   # capped at T - 1
    assert ll.lengthened(12)(45, 80, "reference") == reverse_timesteps(45, 80, "reference")
    with pytest.raises(ValueError, match="T' must lie in 0..80"):
        ll.lengthened(3)(81, 80, "paper")


def test_rows_table_and_plot_from_a_record(tmp_path, capsys):
    from benchmarks import loop_length as ll
    res = {"val/T45/paper/max_disp_pct": 14.0, "val/T45/paper/folding_pct": 1.1,
           "val/T45/cues/paper/max_disp_pct": 16.0, "val/T45/cues/paper/folding_pct": 1.2,
           "val/T45/forward/max_disp_pct": 26.0}
    row = ll.rows_of(res, 45, "paper", 45, 0)
    assert row == {"k": 0, "steps": 45, "schedule": "paper", "clean_max_disp_pct": 14.0,
                   "clean_folding_pct": 1.1, "cued_max_disp_pct": 16.0, "cued_folding_pct": 1.2}
    ref = dict(row, k=None, steps=80, schedule="reference", clean_max_disp_pct=18.7)
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"run": "r", "weights": "w", "t_prime": 45, "rows": [ref, row]}))
    assert ll.main(["--from-json", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3].startswith("| 45 | 0 | 14.00 | 16.00 |") and out[4].startswith("| 80 | reference | 18.70 |")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_weights_table_with_a_lengthened_paper_loop(tmp_path, tiny_ckpt2d, capsys):
    """``--weights-table``: weights_table.py runs with ``--schedule paper`` and the loop k steps
    longer (a different field from k = 0 on the same image and seed), records k in every row, says
    so in the table, and leaves the engine's loop as it was."""
    import numpy as np

    from benchmarks import loop_length as ll
    from benchmarks import weights_table as wt
    from napari_drdm.core import recovery
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "unseen2d_brain.npz", images=rng.random((1, 32, 32)).astype(np.float32))
    disp = {}
    for k in (0, 5):
        path = tmp_path / f"k{k}.json"
        assert ll.main(["--k", str(k), "--weights-table", "--", "--models", "--extra", f"tiny={tiny_ckpt2d}",
                        "--eval-dir", str(tmp_path), "--kit", str(tmp_path / "nokit"), "--t-prime", "3",
                        "--samples", "1", "--json", str(path)]) == 0
        rec = json.loads(path.read_text())
        assert [(r["schedule"], r["loop_extra_steps"]) for r in rec["rows"]] == [("paper", k)]
        disp[k] = rec["rows"][0]["results"][0]["max_disp_pct"]["mean"]
        assert recovery.reverse_timesteps is ll._AS_SHIPPED
    assert "every 'paper loop' above ran k = 5 steps more" in capsys.readouterr().out
    assert wt.main(["--from-json", str(tmp_path / "k5.json")]) == 0
    assert "tiny (2D, S=32, paper loop from T'+5)" in capsys.readouterr().out
    assert disp[0] != disp[5]
    with pytest.raises(SystemExit):
        ll.main(["--k", "1", "2", "--weights-table", "--", "--models"])
