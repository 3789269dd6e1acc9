"""The explorer's state, Qt-free: its runs, their names, which frame is on screen and what to say.

The Qt dock (:mod:`._explorer`) only forwards user actions here and shows the texts it gets back;
the layers (:mod:`._run_layers`) are made from the :class:`Run` records kept here.  Everything
is plain Python and numpy, so it is tested without Qt or napari.

Conventions, the same everywhere on screen:

* frames are numbered from 0, as napari's "frame" slider is;
* metrics are those of the total field on the **image grid** (the pixels the layers show):
  displacement in % of the largest physical side, folding in % of pixels with det(J) <= 0.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.config import KEEP_SIZE_INFLATION
from ..core.metrics import affine_text
from ._inputs import Inputs
from ._layers import FrameStore

__all__ = ["Run", "ExplorerState", "GRID_NOTE", "metrics_text", "background_text", "view_text"]

GRID_NOTE = "image grid"

# the layers of a run, bottom to top; folds stay on top of everything else
KINDS = ("frames", "labels", "grid", "jacobian", "vectors", "outline", "folding")


def metrics_text(m: dict, shape: Sequence[int]) -> str:
    """One labelled line of the frame metrics (displacement and folding, image grid)."""
    grid = "x".join(str(n) for n in shape)
    return (f"displacement max {m['max_disp_pct']:.2f} %, mean {m['mean_disp_pct']:.2f} % of side; "
            f"folding {m['folding_pct']:.3f} % of pixels (min det J {m['min_jacobian']:.3f}) "
            f"[{GRID_NOTE} {grid}]")


def background_text(margin: int, replaced_pct: float) -> str:
    """One sentence on the background extension of a recovered field (README "Units and conventions")."""
    return (f"Background beyond {margin} px of the anatomy extended smoothly ({replaced_pct:.1f} % of the field "
            f"replaced; Background margin: off keeps the loop's field).")


def view_text(fit: int, zoom: float) -> str:
    """One sentence on the model's view fitted to the anatomy (README "Units and conventions")."""
    if zoom <= 1.0 + 1e-6:
        return f"Anatomy fit {fit} px: the anatomy fills the image, the model saw all of it."
    return (f"Anatomy fit {fit} px: the model saw a square around the anatomy, enlarged {zoom:.2f}x; the field "
            f"outside it continues the field at its edge (Anatomy fit: off shows the model the whole image).")


@dataclass
class Run:
    """One generation: what it was asked, what it stored, its layers and its timing."""

    id: int
    model: str
    inputs: Inputs
    params: Dict[str, Any]
    store: FrameStore
    out_scale: Tuple[float, ...]
    out_translate: Tuple[float, ...]
    out_affine: Optional[np.ndarray]
    worker: Any = None
    kinds: Tuple[str, ...] = ()                                    # layers this run makes, in order
    layers: Dict[str, Any] = field(default_factory=dict)
    layer_n: Dict[str, int] = field(default_factory=dict)         # frames each layer shows
    final: Dict[str, Any] = field(default_factory=dict)           # recovered image/labels/field
    shown: int = 0
    running: bool = True
    cancelled: bool = False
    error: Optional[str] = None
    t_start: float = 0.0
    t_first_step: Optional[float] = None        # the worker's first frame (s after Run)
    t_first_layer: Optional[float] = None       # the frames layer added to the viewer
    t_first_drawn: Optional[float] = None       # the canvas drew after that
    t_end: Optional[float] = None
    result: Any = None
    last_info: Optional[dict] = None
    final_metrics: Optional[dict] = None
    final_affine: Optional[dict] = None                            # the recovered field's affine part

    @property
    def title(self) -> str:
        """Short and unique: run number, model, seed and T' (the layer list elides long names)."""
        p = self.params
        t = f"#{self.id} {self.model} s{p['seed']} T'{p['t_prime']}"
        if p.get("variant"):
            t += f" {p['variant']}"
        if self.inputs.lead_index:
            t += " @" + ",".join(str(i) for i in self.inputs.lead_index)
        return t

    def layer_name(self, kind: str) -> str:
        return f"{kind} {self.title}"

    @property
    def n(self) -> int:
        return self.store.n

    def all_layers(self) -> List[Any]:
        return list(self.layers.values()) + list(self.final.values())

    def series(self) -> Dict[str, np.ndarray]:
        """Per stored frame (0-based): max/mean displacement %, folding %, and the phase boundary."""
        ms = self.store.metrics[: self.store.n]
        return {"max": np.array([m["max_disp_pct"] for m in ms], float),
                "mean": np.array([m["mean_disp_pct"] for m in ms], float),
                "folding": np.array([m["folding_pct"] for m in ms], float),
                "forward": np.array([m["phase"] == "forward" for m in ms], bool)}


class ExplorerState:
    """The runs of one explorer and which of them is the current one."""

    def __init__(self):
        self.runs: List[Run] = []
        self._counter = 0
        self.current_id: Optional[int] = None

    # ------------------------------------------------------------------ runs
    def new_run(self, model: str, inputs: Inputs, params: Dict[str, Any], store: FrameStore,
                out_scale, out_translate, out_affine) -> Run:
        """Record a run about to start; it becomes the current one.

        Args:
            model: the model's name (goes into every layer name).
            inputs: what :func:`read_inputs` returned.
            params: t_prime, seed, schedule, compose_padding, input_padding, k, fold_guard (and a ``variant``
                string when not the model's default, e.g. "paper K2 guard").
            store: the frame store the worker fills.
            out_scale, out_translate, out_affine: geometry of the output layers (without the frame axis).
        """
        self._counter += 1
        run = Run(self._counter, model, inputs, dict(params), store, tuple(out_scale), tuple(out_translate),
                  out_affine)
        run.kinds = tuple(k for k in KINDS if k != "labels" or "labels" in store.buffers)
        run.t_start = time.perf_counter()
        self.runs.append(run)
        self.current_id = run.id
        return run

    def get(self, run_id: Optional[int]) -> Optional[Run]:
        return next((r for r in self.runs if r.id == run_id), None)

    @property
    def current(self) -> Optional[Run]:
        return self.get(self.current_id)

    @property
    def running(self) -> bool:
        return any(r.running for r in self.runs)

    def select(self, run_id: Optional[int]) -> Optional[Run]:
        if self.get(run_id) is not None:
            self.current_id = run_id
        return self.current

    def remove(self, run_id: int) -> Optional[Run]:
        """Forget a (finished) run; the previous one becomes current. Returns the removed run."""
        run = self.get(run_id)
        if run is None or run.running:
            return None
        self.runs.remove(run)
        if self.current_id == run_id:
            self.current_id = self.runs[-1].id if self.runs else None
        return run

    def run_of_layer(self, layer) -> Optional[Run]:
        rid = (getattr(layer, "metadata", None) or {}).get("drdm_run")
        return self.get(rid)

    # ------------------------------------------------------------------ timing
    @staticmethod
    def mark(run: Run, what: str) -> None:
        """Record the first time of ``what`` (first_step, first_layer, first_drawn, end) after Run."""
        attr = f"t_{what}"
        if getattr(run, attr) is None:
            setattr(run, attr, time.perf_counter() - run.t_start)

    # ------------------------------------------------------------------ the frame on screen
    @staticmethod
    def frame_on_screen(run: Run, data_pos: Optional[Sequence[float]], visible: bool
                        ) -> Tuple[Optional[int], str]:
        """(frame index, '') when a frame of ``run`` is drawn, else (None, why not).

        Args:
            run: the run.
            data_pos: the viewer's current point in the frames layer's data coordinates
                (frame axis first), or None when the layer is not in the viewer.
            visible: whether the frames layer is visible.
        """
        n = run.store.n
        if data_pos is None or n == 0:
            return None, f"run {run.title} has no frames layer on screen"
        if not visible:
            return None, f"run {run.title}: its frames layer is hidden"
        j = int(np.round(data_pos[0]))
        if j < 0 or j >= n:
            return None, f"the frame slider is at {j}; run {run.title} has frames 0-{n - 1}"
        lead = run.inputs.lead_index
        for a, i in enumerate(lead):
            at = int(np.round(data_pos[1 + a]))
            if at != 0:
                what = "time" if run.inputs.image_layer is not None and \
                    (getattr(run.inputs.image_layer, "metadata", None) or {}).get("drdm_time_first") \
                    and a == 0 else f"axis {a}"
                return None, (f"run {run.title} was made at {what} {i}; the slider is at {i + at}: "
                              f"its layers are not drawn here")
        return j, ""

    @staticmethod
    def readout(run: Run, j: Optional[int], why: str) -> str:
        """The readout text for frame ``j`` of ``run`` (or why nothing of it is on screen)."""
        if j is None:
            return f"<b>{run.title}</b><br>{why}"
        m = run.store.metrics[j]
        if m["phase"] == "forward":
            what = f"forward t'={m['t']} of {m['total']}"
        else:
            what = f"recovery step {m['index']} of {m['total']} (t={m['t']})"
        n = run.store.n
        line = f"frame {j} of 0-{n - 1}"
        if n != m["n_total"]:
            line += f" (computed frame {m['frame']} of 0-{m['n_total'] - 1})"
        txt = f"<b>{run.title}</b><br>{line}: {what}<br>" + metrics_text(m, run.store.plan.shape)
        if "guard_folded_px" in m:        # the fold guard corrected this (recovery) frame
            txt += (f"<br>fold guard: {m['guard_folded_px']} px folded before (model grid), "
                    f"{m['guard_changed_px']} px corrected, 0 after")
        if "background_margin" in m:      # the last recovery frame carries the background extension
            txt += "<br>" + background_text(m["background_margin"], m["background_replaced_pct"]) + \
                " The frames before show the loop's own field."
        return txt

    # ------------------------------------------------------------------ status lines
    @staticmethod
    def progress_text(run: Run) -> str:
        info = run.last_info or {}
        if not info:
            return f"running {run.title} ..."
        what = f"forward t'={info['t']}" if info["forward"] else \
            f"recovery step {info['index']} of {info['phase_total']} (t={info['t']})"
        return f"running {run.title}: computed {info['done']} of {info['total']} frames, {what}"

    @staticmethod
    def done_text(run: Run) -> str:
        """The status after a finished run: timing from Run, and the recovered field's metrics."""
        took = run.t_end if run.t_end is not None else time.perf_counter() - run.t_start
        first = run.t_first_drawn if run.t_first_drawn is not None else run.t_first_layer
        parts = [f"{run.title} done in {took:.1f} s"]
        if first is not None:
            parts.append(f"first frame on screen {first:.2f} s after Run")
        txt = ", ".join(parts) + "."
        if run.final_metrics is not None:
            txt += " Recovered field: " + metrics_text(run.final_metrics, run.store.plan.shape)
        if run.final_affine is not None:
            txt += " " + affine_text(run.final_affine)
        margin = getattr(run.result, "background_margin", None)
        if margin is not None:
            txt += " " + background_text(margin, run.result.background_replaced_pct)
        fit = getattr(run.result, "anatomy_fit", None)
        if fit is not None:
            txt += " " + view_text(fit, run.result.view_zoom)
        keep = getattr(run.result, "keep_size", False)
        if keep == KEEP_SIZE_INFLATION and run.result.zoom_removed == 1.0:
            txt += " Anatomy size kept (inflation only): the anatomy was not enlarged, nothing taken out."
        elif keep:
            txt += f" Anatomy size kept: a global zoom of {run.result.zoom_removed:.3f} taken out."
        guard = getattr(run.result, "guard", None)
        if guard:
            txt += (f" Fold guard: {guard['folded_pct_before'][0]:.3f} % of model-grid pixels folded before, "
                    f"{guard['changed_pct'][0]:.3f} % changed.")
        return txt

    @staticmethod
    def cancelled_text(run: Run) -> str:
        return (f"{run.title} cancelled after {run.store.n_seen} of {run.store.plan.n_total} frames; "
                f"the {run.store.n} computed frames are kept (no recovered layers).")
