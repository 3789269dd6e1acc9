"""The path autotuner (core/autotune.py): picks the faster of two fake paths on an injected clock,
caches the decision with its measurements, reuses it, and ignores a broken or stale cache.
Nothing here asserts on real time."""
from __future__ import annotations

import json

import pytest
import torch

from napari_drdm.core import autotune


class FakeClock:
    """A clock that only moves when a fake path 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _paths(clock, cost):
    calls = {n: 0 for n in cost}

    def make(n):
        def run():
            calls[n] += 1
            clock.now += cost[n]
        return run
    return {n: make(n) for n in cost}, calls


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_DRDM_AUTOTUNE_FILE", str(tmp_path / "autotune.json"))
    autotune.forget()
    yield tmp_path / "autotune.json"
    autotune.forget()


@pytest.mark.parametrize("cost,best", [({"onednn": 0.010, "native": 0.004}, "native"),
                                       ({"onednn": 0.003, "native": 0.009}, "onednn")])
def test_picks_the_faster_path_caches_and_reuses(fresh, cost, best):
    clock = FakeClock()
    paths, calls = _paths(clock, cost)
    key = autotune.make_key(device="cpu", ndim=2, shape=(32, 32), batch=1, threads=2)
    d = autotune.decide(key, paths, clock=clock)
    assert d.path == best and d.source == "measured"
    assert d.medians_ms == pytest.approx({n: c * 1e3 for n, c in cost.items()})
    n_timed = len(d.samples_ms[best])
    assert autotune.MIN_ROUNDS <= n_timed <= autotune.MAX_ROUNDS
    assert all(calls[n] == n_timed + 1 for n in cost)            # one warm-up each, then interleaved
    stored = json.loads(fresh.read_text())
    (rec,) = stored["entries"].values()
    assert rec["path"] == best and set(rec["medians_ms"]) == set(cost) and rec["key"]["shape"] == [32, 32]

    # reused: in this process (memo) and in a new one (the file), without running anything
    assert autotune.decide(key, paths, clock=clock).path == best
    autotune.forget()
    before = dict(calls)
    again = autotune.decide(key, paths, clock=clock)
    assert again.path == best and again.source == "cache" and calls == before
    assert again.medians_ms == pytest.approx(d.medians_ms)

    # another combination (more threads) is measured on its own
    other = autotune.make_key(device="cpu", ndim=2, shape=(32, 32), batch=1, threads=1)
    assert autotune.decide(other, paths, clock=clock).source == "measured"
    assert len(json.loads(fresh.read_text())["entries"]) == 2


def test_alternating_order_and_budget(fresh):
    clock = FakeClock()
    order = []

    def path(n, c):
        def run():
            order.append(n)
            clock.now += c
        return run
    s = autotune.measure({"a": path("a", 0.125), "b": path("b", 0.125)}, clock=clock, min_rounds=3, budget_s=0.5)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]        # warm-up, then ABBA...
    assert s == {"a": [0.125] * 3, "b": [0.125] * 3}                     # over budget: MIN rounds only
    s = autotune.measure({"a": path("a", 4.0), "b": path("b", 4.0)}, clock=clock, min_rounds=3, budget_s=0.5)
    assert s == {"a": [4.0], "b": [4.0]}                             # very slow passes: one round
    s = autotune.measure({"a": path("a", 0.001), "b": path("b", 0.001)}, clock=clock, budget_s=10.0)
    assert len(s["a"]) == autotune.MAX_ROUNDS                       # cheap: up to MAX rounds


@pytest.mark.parametrize("content", ["{not json", "[]", json.dumps({"format": -1, "entries": {}}),
                                     "\x00\xff garbage"])
def test_broken_cache_is_ignored_and_rewritten(fresh, content):
    fresh.write_bytes(content.encode("latin-1"))
    clock = FakeClock()
    paths, _ = _paths(clock, {"onednn": 0.002, "native": 0.001})
    key = autotune.make_key(device="cpu", ndim=3, shape=(16, 16, 16), batch=2, threads=1)
    assert autotune.read_cache() == {}
    d = autotune.decide(key, paths, clock=clock)
    assert d.path == "native" and d.source == "measured"
    assert len(autotune.read_cache()) == 1                          # rewritten as a valid file


def test_stale_entry_is_measured_again(fresh):
    clock = FakeClock()
    paths, calls = _paths(clock, {"onednn": 0.002, "native": 0.001})
    key = autotune.make_key(device="cpu", ndim=2, shape=(64, 64), batch=1, threads=1)
    autotune.decide(key, paths, clock=clock)
    data = json.loads(fresh.read_text())
    (ks,) = data["entries"]
    data["entries"][ks]["path"] = "vanished"                        # a path that is no candidate now
    fresh.write_text(json.dumps(data))
    autotune.forget()
    before = sum(calls.values())
    d = autotune.decide(key, paths, clock=clock)
    assert d.source == "measured" and d.path == "native" and sum(calls.values()) > before
    assert json.loads(fresh.read_text())["entries"][ks]["path"] == "native"


def test_unwritable_cache_still_decides(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("NAPARI_DRDM_AUTOTUNE_FILE", str(blocker / "sub" / "autotune.json"))
    autotune.forget()
    clock = FakeClock()
    paths, _ = _paths(clock, {"onednn": 0.001, "native": 0.002})
    d = autotune.decide(autotune.make_key(device="cpu", ndim=2, shape=(8, 8)), paths, clock=clock)
    assert d.path == "onednn" and "not cached" in d.reason
    autotune.forget()


def test_engine_uses_and_caches_the_measured_path(fresh, monkeypatch):
    """The engine's real candidates: whichever wins is recorded with both timings, reused by a
    second engine without measuring, and gives the plain network's numbers."""
    from napari_drdm.core import native
    from napari_drdm.core.fast import InferenceEngine
    from napari_drdm.core.network import DRDMNet

    monkeypatch.delenv("NAPARI_DRDM_NATIVE", raising=False)
    monkeypatch.delenv("NAPARI_DRDM_AUTOTUNE", raising=False)
    if native.load() is None:
        pytest.skip(f"native kernels not built here: {native.status()}")
    torch.manual_seed(0)
    net = DRDMNet(2).eval()
    eng = InferenceEngine(net)
    shape = (1, 1, 24, 24)
    d = eng.path_decision(shape)
    assert d.source == "measured" and d.path in ("native", "onednn")
    assert set(d.medians_ms) == {"native", "onednn"}
    assert eng.native_in_use(torch.device("cpu"), shape) is (d.path == "native")
    autotune.forget()
    d2 = InferenceEngine(net).path_decision(shape)
    assert d2.source == "cache" and d2.path == d.path
    x, t = torch.rand(shape), torch.tensor([30])
    with torch.no_grad():
        torch.testing.assert_close(eng.single_pass(x, t), net.single_pass(x, t), atol=1e-5, rtol=0)


def test_environment_still_forces_the_path(fresh, monkeypatch):
    from napari_drdm.core import native
    from napari_drdm.core.fast import InferenceEngine
    from napari_drdm.core.network import DRDMNet

    if native.load() is None:
        pytest.skip(f"native kernels not built here: {native.status()}")
    net = DRDMNet(2).eval()
    for val, path in (("1", "native"), ("0", "onednn")):
        monkeypatch.setenv("NAPARI_DRDM_NATIVE", val)
        d = InferenceEngine(net).path_decision((1, 1, 16, 16))
        assert (d.path, d.source) == (path, "forced")
    assert not fresh.exists()                                       # forced: nothing measured or stored


def test_cli_info_shows_the_decision_and_its_measurements(fresh, capsys):
    from napari_drdm.cli import main
    from napari_drdm.core import native

    assert main(["info", "--tune", "2d16", "--threads", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (d,) = info["path_decisions"]
    assert d["size"] == "2d16" and d["path"] in ("native", "onednn", "generic")
    if native.load() is not None and info["onednn_fused_convolutions"]:
        assert d["source"] == "measured" and set(d["median_ms"]) == {"native", "onednn"}
        (row,) = info["cached_path_decisions"]
        assert row["size"] == "2d16" and row["threads"] == 1 and row["path"] == d["path"]
    with pytest.raises(SystemExit):
        main(["info", "--tune", "2d15"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("drdm info: error: --tune: expected a size like 2d256")


@pytest.mark.parametrize("env,pre,expect", [({}, "", "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "", "ACTIVE"),
                                            ({"GOMP_SPINCOUNT": "1000"}, "", None),
                                            ({}, "import torch; ", None)])
def test_openmp_threads_sleep_unless_chosen_otherwise(env, pre, expect):
    """napari_drdm sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp, never over the user's
    choice, and not when torch was loaded first (too late then: it says so)."""
    import os
    import subprocess
    import sys
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    e.update(env)
    code = pre + "import os, napari_drdm; print(os.environ.get('OMP_WAIT_POLICY')); print(napari_drdm.OPENMP_WAIT)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    policy, why = out.stdout.strip().splitlines()
    assert policy == str(expect)
    assert ("set by napari_drdm" in why) is (expect == "PASSIVE" and not env)
    if pre:
        assert "torch was imported before" in why


def test_explorer_threads_follow_the_wait_policy(monkeypatch):
    """The explorer uses torch's default thread count when OpenMP threads sleep while they wait;
    only when they spin the load-based default (the measured reason for it)."""
    import os

    import napari_drdm
    from napari_drdm._widgets._worker import default_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(napari_drdm, "OPENMP_PASSIVE", True)
    assert default_threads() == 7
    monkeypatch.setattr(napari_drdm, "OPENMP_PASSIVE", False)
    assert default_threads() == 3


def test_cache_keeps_the_newest_entries(fresh, monkeypatch):
    monkeypatch.setattr(autotune, "MAX_ENTRIES", 3)
    clock = FakeClock()
    paths, _ = _paths(clock, {"onednn": 0.002, "native": 0.001})
    stamps = iter(f"2026-01-0{i}T00:00:00Z" for i in range(1, 10))
    monkeypatch.setattr(autotune.time, "strftime", lambda fmt, t=None: next(stamps))
    for S in (8, 16, 24, 32, 40):
        autotune.decide(autotune.make_key(device="cpu", ndim=2, shape=(S, S)), paths, clock=clock)
    kept = sorted(r["key"]["shape"][0] for r in autotune.read_cache().values())
    assert kept == [24, 32, 40]


def test_path_decision_for_a_float64_network(fresh):
    from napari_drdm.core.fast import InferenceEngine
    from napari_drdm.core.network import DRDMNet

    d = InferenceEngine(DRDMNet(2).eval().double()).path_decision((1, 1, 16, 16))
    assert d.path == "onednn" and "float32" in d.reason and not fresh.exists()
