"""benchmarks/downstream_seg.py: the few-shot segmentation benchmark runs on any images+labels
.npz (``--quick`` on a synthetic set, tiny sizes), writes a well-formed JSON, and refuses bad
input with one line."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from benchmarks import downstream_seg as ds


def _synthetic(path, n=12, side=32, seed=0):
    """Discs with a core (labels 0, 1, 2) growing along the stack, on noise; labels stored as 0/5/9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    imgs, labs = [], []
    for i in range(n):
        cy, cx = side / 2 + rng.uniform(-3, 3, 2)
        d = np.hypot(yy - cy, xx - cx)
        r = 6 + 0.3 * i
        lab = (d < r).astype(np.int16) + (d < r / 2)
        imgs.append(lab * 0.4 + rng.normal(0, 0.05, (side, side)))
        labs.append(np.choose(lab, [0, 5, 9]))
    np.savez(path, images=np.asarray(imgs, np.float32), labels=np.asarray(labs, np.int16))
    return path


@pytest.mark.slow
def test_quick_run_on_synthetic_npz(tmp_path, capsys, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("NAPARI_DRDM_NATIVE", "0")       # the tiny model needs no compiled kernels
    monkeypatch.setenv("NAPARI_DRDM_AUTOTUNE", "0")     # nor path timing
    data = _synthetic(tmp_path / "syn.npz", side=40)   # DRDM deforms 40^2 slices, the U-Net sees 32^2
    ckpt = tiny_checkpoint(2, 32, path=tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    rc = ds.main(["--quick", "--data", str(data), "--size", "32", "--width", "4", "--steps", "3", "--batch", "2",
                  "--k", "2", "--seeds", "0,1,2", "--pool", "1", "--otf-draws", "1", "--models", str(ckpt),
                  "--t-prime", "2", "--schedule", "paper", "--threads", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "downstream_seg.json").read_text())
    assert (out / "downstream_seg.png").stat().st_size > 1000
    assert (out / "downstream_seg.txt").read_text().strip()
    info = res["datasets"]["syn"]
    assert info["class_names"] == {"1": "label 5", "2": "label 9"}
    split = info["split"]
    assert not set(split["train"]) & set(split["test"])
    assert split["nearest_train_distance"] >= 2          # never a neighbour of a training slice
    arms = {r["arm"] for r in res["runs"]}
    assert arms == {"none", "affine", "elastic", "drdm-export[tiny]", "drdm-otf[tiny]", "drdm-export+affine[tiny]"}
    assert len(res["runs"]) == len(arms) * 3
    for r in res["runs"]:
        assert r["k"] == 2 and r["seed"] in (0, 1, 2) and r["train_s"] > 0
        vals = r["metrics"]["per_class"]["dsc"] + [r["metrics"]["mean"][m] for m in ("dsc", "sensitivity", "precision")]
        vals += [v for p in r["metrics"]["per_slice"] for v in p["dsc"]]
        assert all(v is None or 0.0 <= v <= 1.0 for v in vals)
        assert len(r["metrics"]["per_slice"]) == len(split["test"])
    otf = [r for r in res["runs"] if r["base_arm"] == "drdm-otf"]
    assert all(r["otf_calls"] == 2 + 1 for r in otf)    # one per training slice, then --otf-draws
    pool = res["augmentation"]["syn"]["drdm_export[tiny]"]
    assert pool["n"] == 2 and not pool["resumed"]      # 1 pair x 2 training slices
    el = res["augmentation"]["syn"]["elastic"]
    assert el["target_max_disp_pct"] == pytest.approx(pool["median"]["max_disp_pct"])
    assert el["achieved"]["max_disp_pct"] == pytest.approx(el["target_max_disp_pct"], rel=0.25)
    assert {s["arm"] for s in res["summary"]} == arms
    assert all(s["n_seeds"] == 3 for s in res["summary"])
    assert {t["arm"] for t in res["paired_tests"]} == {a for a in arms if a.startswith("drdm")}
    assert all(t["n_pairs"] >= 2 for t in res["paired_tests"])


def test_split_rules():
    n = 10
    d = {"images": np.zeros((n, 8, 8), np.float32), "labels": np.ones((n, 8, 8), np.int64),
         "volumes": np.zeros(n).astype(str), "positions": np.arange(n, dtype=float), "kind": "cross-slice"}
    s = ds.make_split(d, "index:0-4/6-9", None)
    assert s["train"] == [0, 1, 2, 3, 4] and s["test"] == [6, 7, 8, 9] and s["min_gap"] == 2
    with pytest.raises(ds.BenchError, match="within 2"):
        ds.make_split(d, "index:0-4/5-9", None)           # slice 5 touches slice 4
    b = ds.make_split(d, "blocks:2", None)
    assert min(b["test"]) - max(b["train"]) >= 2
    assert ds.pick_k(d, s["train"], 2) == [1, 3]                   # middles of two halves
    assert ds.pick_k(d, s["train"], 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ds.BenchError, match="K = 6"):
        ds.pick_k(d, s["train"], 6)
    d["volumes"] = np.array(list("aaaaabbbbb"))
    v = ds.make_split(d, "volume:a/b", None)
    assert v["kind"] == "cross-subject" and v["test"] == [5, 6, 7, 8, 9]


def test_scores():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    truth = np.array([[0, 1, 0], [2, 0, 0]])
    s = ds.scores(ds.counts(pred, truth, 4))
    assert s["dsc"][0] == pytest.approx(2 / 3) and s["sensitivity"][0] == 1 and s["precision"][0] == 0.5
    assert s["dsc"][1] == pytest.approx(2 / 3)
    assert np.isnan(s["dsc"][2]) and np.isnan(s["sensitivity"][2])    # absent from truth and prediction


@pytest.mark.parametrize("argv, msg", [
    (["--data", "{bad}"], "missing labels"),
    (["--data", "nothing_here.npz"], "neither a built-in source"),
    (["--data", "{syn}", "--split", "index:0-4/5-9"], "within"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, msg):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8), np.float32))
    syn = _synthetic(tmp_path / "syn.npz", side=16)
    argv = [a.format(bad=tmp_path / "bad.npz", syn=syn) for a in argv]
    rc = ds.main(argv + ["--arms", "none", "--out", str(tmp_path / "o"), "--size", "16"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1


def test_fields_are_what_they_claim():
    rng = np.random.default_rng(0)
    a = ds.affine_field(3, 32, rng, rot_deg=0.0, scale=(1.0, 1.0), shift=0.0)
    assert float(a.abs().max()) < 1e-5                     # identity when nothing is drawn
    e1 = ds.elastic_field(4, 32, np.random.default_rng(1), (2, 2), (1, 1))
    e2 = ds.elastic_field(4, 32, np.random.default_rng(1), (2, 2), (3, 3))
    assert np.allclose(e2.numpy(), 3 * e1.numpy(), atol=1e-5)   # magnitude scales the smoothed noise
    assert float(e1.abs().max()) < 1.0                     # smoothing shrinks uniform(-1, 1) noise


def test_missing_reference_data_is_skipped(tmp_path, capsys):
    syn = _synthetic(tmp_path / "syn.npz", side=16)
    out = tmp_path / "o"
    rc = ds.main(["--data", f"acdc,{syn}", "--reference", str(tmp_path / "absent"), "--arms", "none", "--k", "2",
                  "--seeds", "0", "--steps", "1", "--batch", "1", "--size", "16", "--width", "2", "--threads", "1",
                  "--out", str(out)])
    res = json.loads((out / "downstream_seg.json").read_text())
    assert rc == 0 and list(res["datasets"]) == ["syn"] and "acdc" in res["skipped"]
    assert "[acdc] skipped" in capsys.readouterr().out


def _record(arms, seeds=(0, 1), split=None, steps=200, offset=0.0):
    """A finished run's record with hand-made scores: arm i scores 0.5 + 0.1 i (+ offset) on every
    slice, give or take a little noise (differences that never vary make the tests' statistics warn)."""
    split = split or {"kind": "index", "train": [0, 1], "test": [3, 4]}
    rng = np.random.default_rng(len(arms) + int(100 * offset))
    runs = []
    for i, arm in enumerate(arms):
        for seed in seeds:
            v = 0.5 + 0.1 * i + offset + 0.01 * seed
            per_slice = [{"slice": s, "mean_dsc": v + rng.normal(0, 0.005), "dsc": [v]} for s in split["test"]]
            metrics = {"per_class": {m: [v] for m in ("dsc", "sensitivity", "precision")},
                       "mean": {m: v for m in ("dsc", "sensitivity", "precision")}, "per_slice": per_slice}
            runs.append({"dataset": "syn", "arm": arm, "base_arm": arm.split("[")[0], "k": 2, "seed": seed,
                         "train_s": 1.0, "metrics": metrics})
    config = {"steps": steps, "batch": 8, "size": 128, "width": 8, "lr": 0.01, "pool": 6, "t_prime": "45",
              "p_aug": 0.8, "n_seeds": len(seeds)}
    return {"config": config, "datasets": {"syn": {"class_names": {"1": "a"}, "split": split}}, "runs": runs}


def test_records_of_two_models_merge_into_one_table_with_tests_against_named_arms(tmp_path, capsys):
    """``--replot A.json B.json --baselines ...``: one table, one plot, the merged record beside it;
    every DRDM arm tested against each named arm the records hold, never against itself."""
    a = _record(["none", "elastic", "drdm-export[m1]"])
    b = _record(["drdm-export[m2]"], offset=0.3)
    merged = ds.merge_results([a, b], ["elastic", "drdm-export[m1]", "affine"])
    assert {s["arm"] for s in merged["summary"]} == {"none", "elastic", "drdm-export[m1]", "drdm-export[m2]"}
    pairs = {(t["arm"], t["baseline"]): t for t in merged["paired_tests"]}
    assert set(pairs) == {("drdm-export[m1]", "elastic"), ("drdm-export[m2]", "elastic"),
                          ("drdm-export[m2]", "drdm-export[m1]")}            # no affine arm, no self-test
    t = pairs[("drdm-export[m2]", "drdm-export[m1]")]
    assert t["n_pairs"] == 4 and t["wins"] == 4 and t["mean_difference"] == pytest.approx(0.1, abs=0.02)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = tmp_path / "m.png"
    assert ds.main(["--replot", str(pa), str(pb), "--baselines", "elastic,none", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"drdm-export\[m2\] - none, K=2: mean DSC difference \+(29|30|31)\.\d points", text)
    assert out.stat().st_size > 1000
    assert json.loads(out.with_suffix(".json").read_text())["merged_from"] == [str(pa), str(pb)]


def test_seeds_are_the_independent_pairs_of_the_trusted_test(capsys):
    """Beside the optimistic (seed, slice) pairs, each DRDM arm is tested over seeds: one difference
    of the pooled mean DSC per seed.  Six positive differences of distinct size: the exact
    two-sided Wilcoxon p is 2 / 2^6; one negative seed and it is no longer the smallest."""
    rec = _record(["elastic", "drdm-export[m]"], seeds=range(6))
    gains = [0.05, 0.03, 0.04, 0.06, 0.01, 0.02]
    for r in rec["runs"]:
        if r["arm"] == "elastic":
            r["metrics"]["mean"]["dsc"] = 0.6
        else:
            r["metrics"]["mean"]["dsc"] = 0.6 + gains[r["seed"]]
    t = ds.paired_tests(rec["runs"])[0]
    assert t["n_pairs"] == 12 and t["seeds"] == 6 and (t["seed_wins"], t["seed_losses"]) == (6, 0)
    assert t["seed_mean_difference"] == pytest.approx(np.mean(gains))
    assert t["seed_wilcoxon_p"] == pytest.approx(2 / 64) and t["seed_t_p"] < 0.01
    text = ds.format_table({"datasets": rec["datasets"], "summary": ds.summarise(rec["runs"]), "paired_tests": [t]})
    assert "per seed: +3.5 points over 6 seeds (6 better, 0 worse); Wilcoxon p = 0.0312" in text
    gains[4] = -0.01
    for r in rec["runs"]:
        if r["arm"] != "elastic":
            r["metrics"]["mean"]["dsc"] = 0.6 + gains[r["seed"]]
    t = ds.paired_tests(rec["runs"])[0]
    assert (t["seed_wins"], t["seed_losses"]) == (5, 1) and t["seed_wilcoxon_p"] == pytest.approx(4 / 64)


@pytest.mark.parametrize("other, msg", [
    (dict(split={"kind": "index", "train": [0], "test": [3, 4]}), "syn: the records were run on different splits"),
    (dict(steps=100), "the records trained with different steps: 200 and 100"),
    (dict(), "syn drdm-export\\[m1\\] K=2 seed 0: in more than one record"),
])
def test_records_that_do_not_belong_together_are_refused(other, msg):
    a = _record(["drdm-export[m1]"])
    with pytest.raises(ds.BenchError, match=msg):
        ds.merge_results([a, _record(["drdm-export[m1]"] if not other else ["drdm-export[m2]"], **other)])
