"""The fold guard measured: the same generations with and without it (``drdm evaluate --fold-guard``,
``benchmarks/fold_guard.py``).

Per generation (model grid, pixels): folding under the central-difference Jacobian (paper Table 1)
and under the strict check (every one-sided / corner-simplex determinant), max and mean
displacement in % of the side, the residual of the fixed-point inverse (``core.spatial.invert_field``:
|v(x) + phi(x + v(x))|, pixels, i.e. compose(phi, inverse) against the identity) and the time.

With the default method ("final") the guarded field is the unguarded one passed through
:func:`~napari_drdm.core.foldguard.guard_field` (the reverse loop is the same), so one reverse loop
gives both rows and the guard's time is measured on its own and added; other methods run the loop
again with the guard inside.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["field_row", "guard_rows", "compare_guard", "summarise_rows", "GuardCollector"]


def field_row(phi_px, side: int, inverse_iterations: int = 50) -> Dict[str, float]:
    """Metrics of one pixel field (d, *spatial) on its own grid.

    Args:
        phi_px: pixel displacement field, torch tensor (d, *spatial).
        side: image side the displacement percentages refer to.
        inverse_iterations: fixed-point iterations of the inverse.
    """
    from .core.metrics import field_metrics, strict_folding_pct
    from .core.spatial import invert_field
    row = field_metrics(phi_px, side=side)
    row["strict_folding_pct"] = strict_folding_pct(phi_px)
    nd = phi_px.shape[0]
    _, res = invert_field(phi_px[None], (1.0,) * nd, inverse_iterations)
    row["inverse_residual_max_px"] = res["inverse_residual_max_px"]
    row["inverse_residual_mean_px"] = res["inverse_residual_mean_mm"]   # spacing 1: mm == px
    return row


def compare_guard(model, x_model, t_prime: int, seeds: Sequence[int], method: str = "final",
                  schedule: Optional[str] = None, k: Optional[int] = None,
                  inverse_iterations: int = 50, compose_padding: Optional[str] = None,
                  input_padding: Optional[int] = None) -> List[dict]:
    """Generate ``x_model`` (B, 1, S...) with and without the fold guard; one dict per sample.

    Args:
        model: a loaded :class:`~napari_drdm.model.DRDM`.
        x_model: images on the model grid, in [0, 1].
        t_prime: T'.
        seeds: one forward-draw seed per image.
        method: guard method (``napari_drdm.guard_modes.GUARD_MODES``).
        schedule, k: reverse loop options (None: the model's).
        inverse_iterations: fixed-point iterations of the inverse field.
        compose_padding: reverse-loop composition padding, "border" or "zeros" (None: the model's).
        input_padding: pixels of mirrored image around the network's input at every reverse step
            (None: the model's).

    Returns:
        ``[{"off": row, "on": row, "seconds_off": s, "seconds_on": s, "guard": {...}}]``, the
        seconds being the batch's time divided by its size.
    """
    from .guard_modes import guard_mode
    method = guard_mode(method)
    if method is None:
        raise ValueError("compare_guard needs a guard method")
    n = len(seeds)
    t0 = time.perf_counter()
    phi_off, _ = model.generate_model_grid(x_model, t_prime, seeds, schedule=schedule, k=k,
                                           compose_padding=compose_padding, input_padding=input_padding)
    t_off = (time.perf_counter() - t0) / n
    if method == "final":
        return guard_rows(phi_off, model.size, seeds, t_off, inverse_iterations)
    t0 = time.perf_counter()
    info: dict = {}
    phi_on, _ = model.generate_model_grid(x_model, t_prime, seeds, schedule=schedule, k=k,
                                          fold_guard=method, guard_report=info, compose_padding=compose_padding,
                                          input_padding=input_padding)
    t_on = (time.perf_counter() - t0) / n
    return _rows(phi_off, phi_on, model.size, seeds, t_off, t_on, info, inverse_iterations)


def guard_rows(phi_off, side: int, seeds: Sequence[int], seconds_off: float,
               inverse_iterations: int = 50) -> List[dict]:
    """Rows of :func:`compare_guard` for the "final" method, from unguarded recovered fields.

    Args:
        phi_off: unguarded recovered fields (B, d, S...), pixels, model grid.
        side: model side S.
        seeds: the seed of each sample (recorded only).
        seconds_off: time per generation of the reverse loop that made ``phi_off``.
        inverse_iterations: fixed-point iterations of the inverse field.
    """
    from .core.foldguard import guard_field
    t0 = time.perf_counter()
    phi_on, rep = guard_field(phi_off)
    t_on = seconds_off + (time.perf_counter() - t0) / len(seeds)
    return _rows(phi_off, phi_on, side, seeds, seconds_off, t_on, rep.as_dict(), inverse_iterations)


def _rows(phi_off, phi_on, side, seeds, t_off, t_on, info, inverse_iterations):
    n = len(seeds)
    out = []
    for b in range(n):
        out.append({"seed": int(seeds[b]), "off": field_row(phi_off[b], side, inverse_iterations),
                    "on": field_row(phi_on[b], side, inverse_iterations),
                    "seconds_off": t_off, "seconds_on": t_on,
                    "guard": {key: (val[b] if isinstance(val, list) else val) for key, val in info.items()}})
    return out


def _mean(v) -> float:
    return float(np.mean(np.asarray(v, dtype=np.float64)))


def summarise_rows(rows: List[dict]) -> dict:
    """Aggregate :func:`compare_guard` rows: per side ("off"/"on") the mean metrics and the share
    of generations with any folded pixel (central / strict), plus the paired changes."""
    summary = {"n": len(rows)}
    for side in ("off", "on"):
        r = [row[side] for row in rows]
        summary[side] = {
            "folding_pct_mean": _mean([x["folding_pct"] for x in r]),
            "strict_folding_pct_mean": _mean([x["strict_folding_pct"] for x in r]),
            "share_with_any_fold": _mean([x["folding_pct"] > 0 for x in r]),
            "share_with_any_strict_fold": _mean([x["strict_folding_pct"] > 0 for x in r]),
            "max_disp_pct_mean": _mean([x["max_disp_pct"] for x in r]),
            "mean_disp_pct_mean": _mean([x["mean_disp_pct"] for x in r]),
            "inverse_residual_mean_px": _mean([x["inverse_residual_mean_px"] for x in r]),
            "inverse_residual_max_px_mean": _mean([x["inverse_residual_max_px"] for x in r]),
            "seconds_per_generation": _mean([row[f"seconds_{side}"] for row in rows]),
        }
    off, on = summary["off"], summary["on"]
    summary["mean_disp_change_pct"] = _mean([100.0 * (row["on"]["mean_disp_pct"] / row["off"]["mean_disp_pct"] - 1)
                                             for row in rows if row["off"]["mean_disp_pct"] > 0])
    summary["max_abs_mean_disp_change_pct"] = float(max(
        (abs(100.0 * (row["on"]["mean_disp_pct"] / row["off"]["mean_disp_pct"] - 1))
         for row in rows if row["off"]["mean_disp_pct"] > 0), default=0.0))
    summary["time_ratio"] = on["seconds_per_generation"] / off["seconds_per_generation"]
    return summary


class GuardCollector:
    """For ``drdm evaluate --fold-guard``: called with each batch's unguarded fields, it measures the
    "final" guard on them (no second reverse loop); :meth:`results` gives one summary per T'."""

    def __init__(self, side: int, inverse_iterations: int = 50):
        self.side, self.inverse_iterations = side, inverse_iterations
        self.rows: Dict[int, List[dict]] = {}

    def __call__(self, t_prime: int, phi_off, seeds: Sequence[int], seconds: float):
        """Args: t_prime: T'; phi_off: the batch's unguarded fields; seeds: their seeds; seconds: the batch's time."""
        rows = guard_rows(phi_off, self.side, seeds, seconds / len(seeds), self.inverse_iterations)
        self.rows.setdefault(int(t_prime), []).extend(rows)

    def results(self) -> List[dict]:
        return [dict(summarise_rows(rows), t_prime=tp, method="final") for tp, rows in self.rows.items()]
