"""The DRDM explorer dock: deform an image step by step with DRDM and watch it being recovered.

This module starts and follows runs; the rest is composed in, one idea per module:

* :class:`~._form.ExplorerForm`, the controls (the generation options a magicgui container);
* :class:`~._input_choice.InputChoice`, the image and labels layers to deform;
* :class:`~._model_choice.ModelChoice`, the model, loaded off the UI thread;
* :func:`~._run_request.prepare_run`, Qt-free: the input checks, the frame plan and the
  generation's arguments (the reason Run is disabled, or what it starts);
* :class:`~._controller.ExplorerState`, Qt-free: the runs, their names and every text shown;
* :class:`~._run_layers.RunLayers`, each run's napari layers;
* :class:`~._run_choice.RunChoice`, the run shown, runs listed and removed;
* :class:`~._readout.FrameReadout`, the frame on screen: readout, plot and frame buttons;
* :func:`~._worker.explore`, the generation in a napari thread worker.

The UI thread only reads the frame store and updates layers, a few times per second.
"""
from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Dict, Optional

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.config import margin_as_option
from ..core.metrics import field_affine
from ._controller import ExplorerState, Run
from ._form import CONTROLS, SCHEDULES, ExplorerForm, scrolled
from ._input_choice import InputChoice
from ._inputs import spatial_ndim
from ._layers import FrameStore, field_summary
from ._lifetime import Connections, Lifetime, if_alive, stop_workers
from ._model_choice import ModelChoice, bundled_models
from ._paint import on_next_paint
from ._readout import FrameReadout
from ._run_choice import RunChoice
from ._run_layers import RunLayers
from ._run_request import RunRequest, prepare_run

if TYPE_CHECKING:
    import napari

__all__ = ["ExplorerWidget"]

class ExplorerWidget(QWidget):
    """Dock widget: image (+ labels) -> DRDM forward deformation and recovery, frame by frame.

    Args:
        napari_viewer: the viewer whose layers are deformed and that receives the output layers.
        parent: the Qt parent.
    """

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        from ._worker import default_threads
        self.viewer = napari_viewer
        self.state = ExplorerState()
        self.layers = RunLayers(napari_viewer)
        self._validation_cache: Dict[tuple, Optional[str]] = {}
        self._closed = False
        self._view_reset = False
        self.form = ExplorerForm(bundled_models(), default_threads(), on_pick=lambda j: self.set_frame(j))
        for name in CONTROLS:                    # the controls are attributes of the dock too (scripts, tests)
            setattr(self, name, getattr(self.form, name))
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(scrolled(self.form))
        self.inputs = InputChoice(napari_viewer, self.form)
        self.models = ModelChoice(self.form, self._on_model)
        self.frame_readout = FrameReadout(self.state, self.layers, self.form)
        self.runs = RunChoice(napari_viewer, self.state, self.layers, self.form, self.inputs, self.frame_readout)
        self._connect_form()
        self._conns = Connections()
        self._connect_viewer()
        self._timer = QTimer(self)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._flush)
        self._lifetime = Lifetime(self, self._teardown)
        self._refresh_layer_choices()
        self._follow_image()
        self.models.load()

    # ------------------------------------------------------------------ wiring
    def _connect_form(self):
        f = self.form
        f.run_btn.clicked.connect(self.run)
        f.cancel_btn.clicked.connect(self.cancel)
        f.image_combo.currentIndexChanged.connect(
            lambda _i: (self.inputs.auto_labels(), self._follow_image(), self.validate()))
        f.labels_combo.currentIndexChanged.connect(lambda _i: self.validate())
        f.slice_check.toggled.connect(lambda _b: self.validate())
        f.new_seed_btn.changed.connect(self.new_seed)
        f.gen.changed.connect(lambda _v: self.validate())
        # magicgui does not report a menu's return to "model default" (value None) as a change
        for combo in (f.padding_combo, f.input_padding_combo, f.background_combo, f.anatomy_combo,
                      f.keep_size_combo):
            combo.currentIndexChanged.connect(lambda _i: self.validate())

    def _connect_viewer(self):
        ev = self.viewer.layers.events
        for emitter, cb in ((ev.inserted, self._on_layers_changed), (ev.removed, self._on_layers_changed),
                            (ev.moved, self._on_layers_changed), (self.viewer.dims.events.point, self._on_dims),
                            (self.viewer.layers.selection.events.active, self._on_active_layer)):
            self._conns.connect(emitter, cb)
        for layer in self.viewer.layers:
            self._conns.connect(layer.events.name, self._on_layers_changed)

    def _teardown(self):
        """The widget or the viewer is going away: stop listening, stop and wait for the workers."""
        self._closed = True
        self.models.closed = True
        self._conns.disconnect_all()
        try:
            self._timer.stop()
        except RuntimeError:
            pass
        stop_workers([r.worker for r in self.state.runs if r.running] + [self.models.worker])

    # ------------------------------------------------------------------ inputs
    @if_alive
    def _on_layers_changed(self, event=None):
        if event is not None and getattr(event, "type", "") == "inserted":
            try:
                self._conns.connect(event.value.events.name, self._on_layers_changed)
            except Exception:  # noqa: BLE001 - a layer without a name event
                pass
        if event is not None and getattr(event, "type", "") == "removed":
            self.runs.forget_removed()
        self._refresh_layer_choices()

    def _refresh_layer_choices(self):
        if self.inputs.refresh():
            self._follow_image()                 # only a change of image may change the model
        self.validate()

    def _follow_image(self):
        """Until the user picks a model, use the default model of the image's dimensionality
        (a 3D volume gets the 3D model; a 2D image or a 2D+t cine the 2D one)."""
        img = self.inputs.image()
        if img is not None:
            self.models.follow(3 if spatial_ndim(img) >= 3 else 2)

    def set_image_layer(self, name: str):
        """Choose the image layer by name, as the user would."""
        self.inputs.set_image(name)

    def set_labels_layer(self, name: Optional[str]):
        """Choose the labels layer by name (None: no labels), as the user would."""
        self.inputs.set_labels(name)

    # ------------------------------------------------------------------ model
    def set_model(self, name: str):
        """Choose a bundled model by name, as the user would (it no longer follows the image)."""
        self.models.set_model(name)

    def set_checkpoint(self, path: str, size: Optional[int] = None):
        """Add a checkpoint file to the model list and select it (what Browse... does)."""
        self.models.set_checkpoint(path, size)

    def _on_model(self, model, new_source: bool):
        """The model changed (loading, loaded, failed): a new model brings its T, schedule and K, and the
        composition padding and input padding menus name its own settings."""
        if self._closed:
            return
        if model is not None:
            cfg = model.config
            self.form.gen.t_prime.max = int(cfg.n_steps)
            self.form.set_model_padding(cfg.compose_padding, cfg.input_padding,
                                        margin_as_option(cfg.background_margin), margin_as_option(cfg.anatomy_fit),
                                        cfg.keep_size or False)
            if new_source and cfg.schedule in SCHEDULES:     # a new model (not just a new device)
                self.form.gen.schedule.value = cfg.schedule
                self.form.gen.k.value = int(cfg.k_recursions)
        self.validate()

    @property
    def model(self):
        return self.models.model

    def model_ready(self) -> bool:
        return self.models.ready()

    @property
    def _model_loading(self) -> bool:
        return self.models.loading

    @property
    def _model_error(self) -> Optional[str]:
        return self.models.error

    # ------------------------------------------------------------------ validation
    def _request(self) -> RunRequest:
        """What Run would start now; InputError (a ValueError) with the reason when it cannot."""
        return prepare_run(self.inputs.image(), self.inputs.labels(), self.models.model, self.models.reason(),
                           self.form.generation(), self.viewer.dims.point, self.form.slice_check.isChecked(),
                           self._validation_cache)

    def validate(self) -> bool:
        """Check the inputs; enable Run or show why not. Returns whether Run is possible."""
        if not hasattr(self, "models") or self._closed:
            return False
        f = self.form
        try:
            req = self._request()
        except ValueError as e:
            f.reason_label.setText(str(e))
            f.input_info.setText("")
            f.plan_label.setText("")
            f.run_btn.setEnabled(False)
            return False
        f.reason_label.setText("")
        f.input_info.setText(req.inputs.describe)
        f.plan_label.setText(req.plan.describe())
        f.run_btn.setEnabled(not self.running)
        return True

    @property
    def reason(self) -> str:
        return self.form.reason_label.text()

    @property
    def running(self) -> bool:
        return self.state.running

    # ------------------------------------------------------------------ run
    def new_seed(self, *_args):
        self.form.seed_spin.setValue(random.randrange(0, 100000))

    def run(self):
        """Start a generation in a worker thread (no-op with the reason shown if inputs are invalid)."""
        t_click = time.perf_counter()            # timing starts at Run, before the inputs are read
        if self.running or not self.validate():
            return None
        from napari.qt.threading import create_worker

        from ._worker import explore
        f = self.form
        req = self._request()
        inp, plan, params, model = req.inputs, req.plan, req.params, self.models.model
        store = FrameStore(plan, has_labels=inp.labels is not None, lead_ndim=len(inp.lead_index))
        previous = self.state.current
        run = self.state.new_run(model.name, inp, params, store, *req.geometry)
        run.t_start = t_click
        self.runs.add(run, previous)
        f.progress.setRange(0, max(1, plan.n_total))
        f.progress.setValue(0)
        f.plan_label.setText(plan.describe())
        f.status_label.setText(self.state.progress_text(run))
        worker = create_worker(explore, model, inp.image, inp.labels, inp.spacing, params["t_prime"],
                               params["seed"], params["schedule"], params["k"], store,
                               threads=f.threads_spin.value() if model.device.type == "cpu" else None,
                               fold_guard=params["fold_guard"], compose_padding=params.get("compose_padding"),
                               input_padding=params.get("input_padding"),
                               background_margin=params.get("background_margin"),
                               anatomy_fit=params.get("anatomy_fit"), keep_size=params.get("keep_size"),
                               _start_thread=False)
        worker.yielded.connect(lambda info, run=run: self._on_yield(run, info))
        worker.returned.connect(lambda res, run=run: self._on_returned(run, res))
        worker.errored.connect(lambda e, run=run: self._on_error(run, e))
        worker.aborted.connect(lambda run=run: self._on_aborted(run))
        worker.finished.connect(lambda run=run: self._on_finished(run))
        run.worker = worker
        f.run_btn.setEnabled(False)
        f.cancel_btn.setEnabled(True)
        self._timer.start()
        worker.start()
        return worker

    def cancel(self):
        """Stop the running generation after the current step; computed frames stay."""
        for r in self.state.runs:
            if r.running and r.worker is not None:
                r.cancelled = True
                r.worker.quit()
                self.form.status_label.setText("cancelling after the current step ...")

    @if_alive
    def _on_yield(self, run: Run, info: dict):
        """Per frame: only bookkeeping; the widgets and layers are refreshed by the timer (5 per second)."""
        self.state.mark(run, "first_step")
        run.last_info = info
        if run.shown == 0 and run.store.n > 0:
            self._flush()                 # the first frame shows at once

    @if_alive
    def _flush(self, complete: bool = False):
        """Show new frames of the running (or just finished) runs."""
        f = self.form
        for run in self.state.runs:
            if not run.running and not complete:
                continue
            if run.running and not run.cancelled and run.last_info is not None:
                f.progress.setValue(run.last_info["done"])
                f.status_label.setText(self.state.progress_text(run))
            had_frames = "frames" in run.layers
            changed = self.layers.flush(run, complete)
            if not had_frames and "frames" in run.layers:
                self._first_frames_layer(run)
            n = run.layer_n.get("frames", run.store.n)
            if changed and f.follow_check.isChecked() and (run.running or run.shown < n) \
                    and run.id == self.state.current_id:
                self.layers.set_frame(run, n - 1)
            run.shown = n
        self.update_readout()

    def _first_frames_layer(self, run: Run):
        """The frames layer was just added: time it, hide the inputs under it, fit the view once."""
        self.state.mark(run, "first_layer")
        on_next_paint(self, lambda run=run: self.state.mark(run, "first_drawn"))
        for ly in (run.inputs.image_layer, run.inputs.labels_layer):
            if ly is not None and ly in self.viewer.layers:
                ly.visible = False              # the frames cover them; the outline shows the input
        if not self._view_reset:
            self._view_reset = True
            self.viewer.reset_view()

    @if_alive
    def _on_returned(self, run: Run, result):
        run.result = result
        run.final_metrics = field_summary(result.ddf, run.inputs.spacing)
        run.final_affine = field_affine(result.ddf)
        self._flush(complete=True)
        self.layers.add_final(run, result)

    @if_alive
    def _on_error(self, run: Run, error):
        run.running = False
        run.error = f"{type(error).__name__}: {error}"
        self.form.status_label.setText(f"error in {run.title}: {run.error}")

    @if_alive
    def _on_aborted(self, run: Run):
        run.cancelled = True

    @if_alive
    def _on_finished(self, run: Run):
        f = self.form
        self.state.mark(run, "end")
        run.running = False
        self._flush(complete=True)
        if "frames" in run.layers and run.id == self.state.current_id:
            self.viewer.layers.selection.active = run.layers["frames"]
        if run.last_info is not None:
            f.progress.setValue(run.last_info["done"])
        if not self.running:
            self._timer.stop()
        if run.cancelled:
            f.status_label.setText(self.state.cancelled_text(run))
        elif run.error is None:
            f.status_label.setText(self.state.done_text(run))
        f.cancel_btn.setEnabled(False)
        f.remove_btn.setEnabled(True)
        self.validate()
        self.update_readout()

    # ------------------------------------------------------------------ runs
    def show_run(self, run_id: Optional[int]):
        """Make ``run_id`` the current run: its layers visible, every other run's hidden."""
        self.runs.show(run_id)

    def remove_run(self, run_id: Optional[int] = None):
        """Delete a finished run's layers and frames (default: the current run)."""
        self.runs.remove(run_id)

    # ------------------------------------------------------------------ the frame on screen
    def step(self, delta: int):
        """Move the frame slider by ``delta`` frames (the ◀ ▶ buttons)."""
        self.frame_readout.step(delta)

    def set_frame(self, j: int):
        """Show frame ``j`` (0-based) of the current run."""
        self.frame_readout.set_frame(j)

    def readout_metrics(self) -> Optional[dict]:
        """The metrics of the frame on screen, None when no frame of the current run is drawn."""
        return self.frame_readout.metrics()

    @if_alive
    def update_readout(self):
        self.frame_readout.update()

    @if_alive
    def _on_active_layer(self, event=None):
        self.runs.follow_active_layer()
        self.update_readout()

    @if_alive
    def _on_dims(self, event=None):
        self.update_readout()
        img = self.inputs.image()
        model = self.models.model
        if not self.running and img is not None and model is not None and img.ndim > model.ndim:
            self.validate()                      # the slice a 2D model would use has changed

    def closeEvent(self, event):  # noqa: N802 - Qt API: stop work when the dock closes
        self.cancel()
        self._timer.stop()
        super().closeEvent(event)
