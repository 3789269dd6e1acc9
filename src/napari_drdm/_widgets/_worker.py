"""The explorer's background work, Qt-free: model loading (cached) and a frame generator.

:func:`explore` wraps :meth:`DRDM.iter_generate`: for every frame it computes, off the UI thread,
what the layers need (Jacobian, folding, warped grid, vectors, readout metrics) and writes it into a
:class:`~._layers.FrameStore`; it yields a small progress dict per frame (so a GUI worker can stop
between any two steps) and returns the :class:`~napari_drdm.model.GenerationResult`.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.generators import Returning
from ._layers import FrameStore, grid_lines, pack_frame, vector_lattice

__all__ = ["load_model_cached", "try_load_model", "explore", "model_key"]

_CACHE: "OrderedDict[tuple, Any]" = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2


def model_key(source: str, size: Optional[int], device: str) -> tuple:
    return (str(source), int(size) if size else None, str(device or "auto"))


def load_model_cached(source: str, size: Optional[int] = None, device: str = "auto"):
    """``load_model`` with a small process-wide cache (switching back and forth is instant)."""
    key = model_key(source, size, device)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    from ..model import load_model

    model = load_model(source, device=None if device == "auto" else device, size=size)
    with _CACHE_LOCK:
        _CACHE[key] = model
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return model


def try_load_model(source: str, size: Optional[int] = None, device: str = "auto") -> Tuple[Any, Optional[str]]:
    """(model, None) or (None, reason): an unusable checkpoint or device is an expected outcome in a GUI."""
    try:
        return load_model_cached(source, size, device), None
    except Exception as e:  # noqa: BLE001 - shown to the user as the reason Run is disabled
        return None, f"{type(e).__name__}: {e}"


def default_threads() -> int:
    """CPU threads for generation.  When OpenMP threads sleep while they wait (napari_drdm sets
    OMP_WAIT_POLICY=PASSIVE when it is imported before torch): torch's default, as everywhere
    else.  When they spin: the cores not busy right now (1-minute load average), all of them on an
    idle machine with one or two cores, one kept for the viewer on larger machines.

    On a busy machine spinning threads only wait on the cores other processes hold (measured: two
    threads on a two-core machine running something else are several times slower than one).
    Sleeping instead, a 2D 128 pass on a loaded 2-core machine took 107 ms at 2 threads and 117 ms
    at 1.
    """
    import os

    import torch

    from .. import OPENMP_PASSIVE
    if OPENMP_PASSIVE:
        return max(1, torch.get_num_threads())
    n = os.cpu_count() or 1
    try:
        busy = int(round(os.getloadavg()[0]))
    except (OSError, AttributeError):          # no load average (Windows)
        busy = 0
    usable = n if n <= 2 else n - 1
    return max(1, min(usable, n - busy))


def explore(model, image: np.ndarray, labels: Optional[np.ndarray], spacing: Sequence[float], t_prime: int,
            seed: int, schedule: str, k: int, store: FrameStore, threads: Optional[int] = None,
            fold_guard: bool = False, compose_padding: Optional[str] = None,
            input_padding: Optional[int] = None,
            background_margin: Union[None, int, str] = None,
            anatomy_fit: Union[None, int, str] = None,
            keep_size: Union[None, bool, str] = None) -> Iterator[Dict[str, Any]]:
    """Run one generation, filling ``store``; yields progress dicts, returns the GenerationResult.

    ``threads``: torch CPU threads for this (worker) thread; None leaves torch's setting alone.
    ``fold_guard``: every recovery frame's field is made fold-free; its metrics then carry
    ``guard_folded_px`` (pixels folded before the correction, model grid) and ``guard_changed_px``.
    ``compose_padding``: "border" or "zeros"; None: the model's own.
    ``input_padding``: pixels of mirrored image around the network's input at every reverse step;
    None: the model's own.
    ``background_margin``: pixels kept around the anatomy (the field beyond extended smoothly;
    the last recovery frame carries it), or "off"; None: the model's own.
    ``anatomy_fit``: pixels kept around the anatomy in the model's fitted view, or "off" (the whole
    image); None: the model's own.
    ``keep_size``: True takes the final field's global zoom over the anatomy out (the last recovery
    frame carries it), False keeps it; None: the model's own.
    """
    import torch

    from ..core.spatial import warp

    if threads:
        torch.set_num_threads(int(threads))

    shape = tuple(image.shape)
    t0 = time.perf_counter()
    gen = Returning(model.iter_generate(image, labels, t_prime=t_prime, seed=seed, schedule=schedule, k=k,
                                        spacing=spacing, frames=True, render=True, fold_guard=fold_guard,
                                        compose_padding=compose_padding, input_padding=input_padding,
                                        background_margin=background_margin, anatomy_fit=anatomy_fit,
                                        keep_size=keep_size))
    grid_t = torch.as_tensor(grid_lines(shape))[None, None] if store.has_grid else None
    lattice = vector_lattice(shape)
    n_forward = store.plan.n_forward
    i = 0
    for fr in gen:
        if store.wants(i):
            warped = None
            if grid_t is not None:
                with torch.no_grad():
                    warped = warp(grid_t, torch.as_tensor(fr.ddf)[None], "linear", "zeros")[0, 0].numpy()
            packed = pack_frame(fr.ddf, fr.image, fr.labels, warped, store.plan, spacing, lattice)
            meta = {"phase": fr.phase, "index": fr.index, "total": fr.total, "t": fr.t,
                    "frame": i, "n_total": store.plan.n_total}
            if fr.guard is not None:
                meta.update(guard_folded_px=fr.guard["folded_px_before"], guard_changed_px=fr.guard["changed_px"])
            if fr.background is not None:
                meta.update(background_margin=fr.background["margin"],
                            background_replaced_pct=fr.background["replaced_pct"])
            store.add(packed, meta)
        i += 1
        store.n_seen = i
        yield {"done": i, "total": store.plan.n_total, "kept": store.n, "phase": fr.phase,
               "index": fr.index, "phase_total": fr.total, "t": fr.t,
               "elapsed": time.perf_counter() - t0, "forward": i <= n_forward}
    return gen.value
