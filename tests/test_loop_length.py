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


def test_a_tail_runs_the_smallest_times_again_after_either_loop():
    from benchmarks import loop_length as ll
    from napari_drdm.core.recovery import reverse_timesteps
    ref = reverse_timesteps(45, 80, "reference")
    assert ll.lengthened(0, 10)(45, 80, "reference") == ref + list(range(9, -1, -1))
    assert ll.lengthened(0, 10)(5, 80, "paper") == [4, 3, 2, 1, 0] * 2          # capped at the loop's length
    assert ll.lengthened(0, 10)(0, 80, "paper") == []                           # T' = 0: no steps, no tail
    assert ll.lengthened(0, 0)(45, 80, "reference") == ref


@pytest.mark.parametrize("nd", [2, 3])
def test_step_smoothing_keeps_constant_and_linear_fields_and_damps_a_checkerboard(nd):
    import torch

    from benchmarks import loop_length as ll
    n = 12
    const = torch.full((1, nd, *[n] * nd), 2.5)
    torch.testing.assert_close(ll.gaussian_field(const, 1.0), const)
    ramp = torch.arange(n, dtype=torch.float32).reshape(*[1] * (nd + 1), n).expand(1, nd, *[n] * nd).contiguous()
    inner = (slice(None), slice(None), *[slice(3, n - 3)] * nd)
    torch.testing.assert_close(ll.gaussian_field(ramp, 1.0)[inner], ramp[inner])     # symmetric kernel
    idx = torch.stack(torch.meshgrid(*[torch.arange(n)] * nd, indexing="ij")).sum(0)
    checker = ((-1.0) ** idx).expand(1, nd, *[n] * nd)
    assert ll.gaussian_field(checker, 1.0)[inner].abs().max() < 0.05
    assert ll.gaussian_field(checker, 0.0) is checker


def test_smoothed_steps_patch_only_the_loop_and_are_undone(monkeypatch):
    """``--step-sigma``: each validation runs with the smoothed ``frac_to_px`` in core.recovery,
    and the engine's own function is back afterwards, also when a validation fails."""
    import torch

    from benchmarks import loop_length as ll
    from napari_drdm.core import recovery
    seen = []

    def fake_validate(run, weights, sets, log):
        idx = torch.arange(8).reshape(8, 1) + torch.arange(8).reshape(1, 8)
        u = recovery.frac_to_px(((-1.0) ** idx).expand(1, 2, 8, 8), 8.0)
        seen.append(float(u[..., 3:5, 3:5].abs().mean()))
        if len(seen) == 2:
            raise RuntimeError("stop")
        return {"val/T45/reference/max_disp_pct": 1.0, "val/T45/reference/folding_pct": 0.0}

    monkeypatch.setattr("training.export.validate_run", fake_validate)
    a = ll.argparse.Namespace(threads=None, set=[], k=[], tail=[0], step_sigma=[1.0], run="r", weights_file=None)
    with pytest.raises(RuntimeError, match="stop"):
        ll.measure(a)
    assert seen[0] == 8.0 and seen[1] < 1.0  # the tail-0 loop as shipped, then the smoothed one
    assert recovery.frac_to_px is ll._TO_PX and recovery.reverse_timesteps is ll._AS_SHIPPED


def test_a_validation_record_without_cued_copies_prints_dashes(tmp_path, capsys):
    """3D runs validate no cued copy: the table says "-" instead of failing."""
    from benchmarks import loop_length as ll
    row = ll.rows_of({"val/T45/reference/max_disp_pct": 30.0, "val/T45/reference/folding_pct": 1.8},
                     45, "reference", 90, None, 10)
    assert row["tail"] == 10 and "cued_folding_pct" not in row
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"run": "r", "weights": "w", "t_prime": 45, "rows": [row]}))
    assert ll.main(["--from-json", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "| 90 | reference | 10 | 0 | 30.00 | - | 1.800 | - |" in capsys.readouterr().out


def test_rows_table_and_plot_from_a_record(tmp_path, capsys):
    from benchmarks import loop_length as ll
    res = {"val/T45/paper/max_disp_pct": 14.0, "val/T45/paper/folding_pct": 1.1,
           "val/T45/cues/paper/max_disp_pct": 16.0, "val/T45/cues/paper/folding_pct": 1.2,
           "val/T45/forward/max_disp_pct": 26.0}
    row = ll.rows_of(res, 45, "paper", 45, 0)
    assert row == {"k": 0, "tail": 0, "steps": 45, "schedule": "paper", "clean_max_disp_pct": 14.0,
                   "clean_folding_pct": 1.1, "cued_max_disp_pct": 16.0, "cued_folding_pct": 1.2}
    ref = dict(row, k=None, steps=80, schedule="reference", clean_max_disp_pct=18.7)
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"run": "r", "weights": "w", "t_prime": 45, "rows": [ref, row]}))
    assert ll.main(["--from-json", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3].startswith("| 45 | 0 | 0 | 0 | 14.00 | 16.00 |") and out[4].startswith("| 80 | reference | 0 | 0 | 18.70 |")
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
        assert [(r["schedule"], r["loop_extra"]) for r in rec["rows"]] == [("paper", k)]
        disp[k] = rec["rows"][0]["results"][0]["max_disp_pct"]["mean"]
        assert recovery.reverse_timesteps is ll._AS_SHIPPED
    assert "every 'paper loop' above ran k = 5 steps more" in capsys.readouterr().out
    assert wt.main(["--from-json", str(tmp_path / "k5.json")]) == 0
    assert "tiny (2D, S=32, paper loop from T'+5)" in capsys.readouterr().out
    assert disp[0] != disp[5]
    with pytest.raises(SystemExit):
        ll.main(["--k", "1", "2", "--weights-table", "--", "--models"])
