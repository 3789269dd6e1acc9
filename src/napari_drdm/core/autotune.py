"""Choose the CPU inference path by measurement, once per machine and problem, and remember it.

Which of the engine's CPU paths is fastest (oneDNN with the native kernels of
:mod:`~napari_drdm.core.native` for the finest levels, or oneDNN alone) depends on the CPU, its
caches, the thread count, the image size and the PyTorch build: on two machines of the same kind
the native kernels were 2.8x faster on one and 1.5x slower on the other.  A CPU flag
cannot tell these apart, so the first pass of a new combination of

    (device, CPU model, ndim, spatial shape, batch, threads, torch version, kernel build, network)

times each candidate for a few interleaved passes (a warm-up each, then rounds in alternating
order; at least ``MIN_ROUNDS``, more while under ``BUDGET_S``), keeps the fastest by median, and
stores the decision with its measurements in ``autotune.json`` in the cache folder
(:func:`napari_drdm.core.native_build._cache_dir`; ``$NAPARI_DRDM_AUTOTUNE_FILE`` overrides the file).
Later processes read the decision back.  A corrupt file, an entry of another format, or an entry
naming a path that is not a candidate now is ignored and rewritten.

``NAPARI_DRDM_NATIVE=0/1`` still forces a path (no measurement); ``NAPARI_DRDM_AUTOTUNE=0`` turns
measuring off (the CPU-flag rule of :func:`napari_drdm.core.native_build.auto_enabled` then decides).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from . import environment

__all__ = ["Decision", "enabled", "cache_file", "cpu_model", "make_key", "measure", "decide", "read_cache",
           "forget", "MIN_ROUNDS", "MAX_ROUNDS", "BUDGET_S"]

FORMAT = 1          # bump when the file layout or the meaning of a key changes: older entries are ignored
MIN_ROUNDS = 2      # timed passes per candidate, at least (after one warm-up pass each)
MAX_ROUNDS = 6      # at most
MAX_ENTRIES = 256   # decisions kept in the file (the newest)
BUDGET_S = 1.0      # more rounds (up to MAX_ROUNDS) only while the timed rounds took less than this

_lock = threading.Lock()
_memo: Dict[str, "Decision"] = {}


@dataclass
class Decision:
    """A chosen path and why: ``path`` (a candidate name), ``reason`` (one line),
    ``samples_ms`` (each candidate's timed passes), ``medians_ms``, ``source``
    ("measured", "cache", "forced" or "single candidate") and the ``key`` fields."""

    path: str
    reason: str
    source: str
    samples_ms: Dict[str, List[float]] = field(default_factory=dict)
    medians_ms: Dict[str, float] = field(default_factory=dict)
    key: Dict[str, object] = field(default_factory=dict)
    measured_at: Optional[str] = None
    cost_s: Optional[float] = None
    load_average: Optional[List[float]] = None

    def as_dict(self) -> dict:
        """A JSON-ready copy (for ``drdm info`` and the benchmark's record)."""
        return asdict(self)


def enabled() -> bool:
    """False when ``NAPARI_DRDM_AUTOTUNE`` is 0/false/no/off (measuring turned off)."""
    return environment.flag("AUTOTUNE") is not False


def cache_file() -> Path:
    """Where decisions are kept: ``$NAPARI_DRDM_AUTOTUNE_FILE``, else ``autotune.json`` in the
    kernels' cache folder."""
    env = environment.get("AUTOTUNE_FILE")
    if env:
        return Path(env)
    from .native_build import _cache_dir
    return _cache_dir() / "autotune.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def make_key(**fields) -> Dict[str, object]:
    """The decision key: the given fields (device, ndim, shape, batch, threads, ...) plus the CPU
    model and the cache format, with tuples as lists (as they come back from JSON).

    Args:
        **fields: JSON-serialisable values that identify the problem and the build.
    """
    key = {"format": FORMAT, "cpu_model": cpu_model()}
    key.update({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})
    return key


def _load() -> Optional[List[float]]:
    """The 1/5/15-minute load averages (a decision measured on a busy machine says so)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _key_str(key: Mapping[str, object]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def measure(candidates: Mapping[str, Callable[[], object]], clock: Callable[[], float] = time.perf_counter,
            min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, budget_s: float = BUDGET_S,
            warmup: int = 1) -> Dict[str, List[float]]:
    """Time each candidate: ``warmup`` untimed calls each, then rounds that call every candidate
    once (order reversed every other round, so drift of the machine's load hits all alike).

    Args:
        candidates: name -> a callable that runs one pass (its result is ignored).
        clock: a monotonic clock in seconds (tests inject a fake one).
        min_rounds: timed rounds at least (one only when they already took 4x ``budget_s``).
        max_rounds: timed rounds at most.
        budget_s: further rounds (after ``min_rounds``) only while the timed rounds so far took
            less than this.
        warmup: untimed calls per candidate first (primitive creation, weight packing).

    Returns:
        name -> list of seconds per timed call.
    """
    names = list(candidates)
    for _ in range(max(0, int(warmup))):
        for n in names:
            candidates[n]()
    samples: Dict[str, List[float]] = {n: [] for n in names}
    spent, r = 0.0, 0
    # at least one round; MIN_ROUNDS unless passes are so slow that they would cost 4x the budget
    while r < 1 or (r < int(min_rounds) and spent < 4 * budget_s) or (spent < budget_s and r < int(max_rounds)):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = clock()
            candidates[n]()
            dt = clock() - t0
            samples[n].append(dt)
            spent += dt
        r += 1
    return samples


def read_cache(path: Optional[Path] = None) -> Dict[str, dict]:
    """The stored decisions (key string -> record); {} when the file is missing, unreadable,
    corrupt or of another format.

    Args:
        path: the cache file (default :func:`cache_file`).
    """
    path = Path(path) if path is not None else cache_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}


def _write_cache(path: Path, ks: str, record: dict) -> Optional[str]:
    """Add one record (atomically: a temporary file renamed over the old one); the reason on failure."""
    try:
        entries = read_cache(path)
        entries[ks] = record
        if len(entries) > MAX_ENTRIES:       # old torch versions and kernel builds: keep the newest
            keep = sorted(entries, key=lambda k: str(entries[k].get("measured_at")), reverse=True)[:MAX_ENTRIES]
            entries = {k: entries[k] for k in keep}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"format": FORMAT, "entries": entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        return f"not cached ({e.strerror or e})"
    return None


def _valid(record: dict, names: Sequence[str]) -> bool:
    med = record.get("medians_ms")
    return (record.get("path") in names and isinstance(med, dict) and all(n in med for n in names)
            and all(isinstance(med[n], (int, float)) for n in names))


def forget() -> None:
    """Drop the in-process memo (the file stays; tests and ``drdm info`` use this)."""
    with _lock:
        _memo.clear()


def decide(key: Dict[str, object], candidates: Mapping[str, Callable[[], object]],
           path: Optional[Path] = None, clock: Callable[[], float] = time.perf_counter, **measure_kw) -> Decision:
    """The fastest candidate for ``key``: from this process's memo, else the cache file, else
    measured now (and stored).  Candidates are tried in the given order on ties.

    Args:
        key: from :func:`make_key`.
        candidates: name -> callable running one pass; one candidate is chosen without timing.
        path: the cache file (default :func:`cache_file`).
        clock: passed to :func:`measure`.
        **measure_kw: ``min_rounds``, ``max_rounds``, ``budget_s``, ``warmup`` for :func:`measure`.
    """
    names = list(candidates)
    if not names:
        raise ValueError("no candidate paths to choose from")
    if len(names) == 1:
        return Decision(names[0], "the only path available", "single candidate", key=dict(key))
    path = Path(path) if path is not None else cache_file()
    ks = _key_str(key) + "|" + ",".join(names)
    with _lock:
        got = _memo.get(ks)
        if got is not None:
            return got
        rec = read_cache(path).get(ks)
        if rec is not None and _valid(rec, names):
            d = Decision(rec["path"], str(rec.get("reason", "")), "cache",
                         {n: list(v) for n, v in (rec.get("samples_ms") or {}).items()},
                         {n: float(rec["medians_ms"][n]) for n in names}, dict(key),
                         rec.get("measured_at"), rec.get("cost_s"), rec.get("load_average"))
            _memo[ks] = d
            return d
        t0 = time.perf_counter()
        samples = measure(candidates, clock=clock, **measure_kw)
        cost = time.perf_counter() - t0
        med = {n: statistics.median(v) * 1e3 for n, v in samples.items()}
        best = min(names, key=lambda n: (med[n], names.index(n)))
        others = ", ".join(f"{n} {med[n]:.1f} ms" for n in names if n != best)
        reason = (f"measured fastest: {best} {med[best]:.1f} ms vs {others} "
                  f"(median of {len(samples[best])} interleaved passes)")
        d = Decision(best, reason, "measured", {n: [round(s * 1e3, 3) for s in v] for n, v in samples.items()},
                     {n: round(v, 3) for n, v in med.items()}, dict(key),
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), round(cost, 3), _load())
        rec = d.as_dict()
        rec.pop("source")
        failed = _write_cache(path, ks, rec)
        if failed:
            d.reason += f"; {failed}"
        _memo[ks] = d
        return d
