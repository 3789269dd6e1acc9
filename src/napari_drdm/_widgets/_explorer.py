"""The DRDM explorer dock: deform an image step by step with DRDM and watch it being recovered.

A thin Qt view (qtpy only).  The state of the runs and every text it shows come from the Qt-free
:class:`~._controller.ExplorerState`; the layers are made by a composed
:class:`~._run_layers.RunLayers`; the inputs are read and checked by :func:`~._inputs.read_inputs`
(the engine's own checks); the generation runs in a napari thread worker (:mod:`._worker`).
The UI thread only reads the frame store and updates layers, a few times per second.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._controller import ExplorerState, Run
from ._inputs import Inputs, is_output_layer, layer_affine, read_inputs, spatial_ndim
from ._layers import DEFAULT_BUDGET_MIB, FrameStore, field_summary, label_dtype, plan_frames
from ._lifetime import Connections, Lifetime, if_alive, stop_workers
from ._plot import MetricPlot
from ._run_layers import RunLayers

if TYPE_CHECKING:
    import napari

__all__ = ["ExplorerWidget"]

BROWSE = "Browse..."
NO_LABELS = "(none)"
REFERENCE_SUFFIXES = (".pth", ".pt")


class _PaintWatcher(QObject):
    """Calls ``callback()`` once, when the viewer's canvas next paints (the frame is on screen)."""

    def __init__(self, canvas: QWidget, callback):
        super().__init__(canvas)
        self._callback = callback
        canvas.installEventFilter(self)

    def eventFilter(self, obj, event):  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Paint and self._callback is not None:
            cb, self._callback = self._callback, None
            obj.removeEventFilter(self)
            cb()
        return False


def _canvas_of(widget: QWidget) -> Optional[QWidget]:
    """The vispy canvas widget in the widget's window (the napari viewer), if docked in one."""
    win = widget.window()
    if win is None or win is widget:
        return None
    return next((w for w in win.findChildren(QWidget) if type(w).__name__ == "CanvasBackendDesktop"), None)


def scrolled(inner: QWidget) -> QScrollArea:
    """``inner`` in a frameless vertical scroll area: the dock can be shorter than its content."""
    area = QScrollArea()
    area.setWidget(inner)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    return area


class ExplorerWidget(QWidget):
    """Dock widget: image (+ labels) -> DRDM forward deformation and recovery, frame by frame."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = ExplorerState()
        self.layers = RunLayers(napari_viewer)
        self._model = None
        self._model_error: Optional[str] = None
        self._model_request = 0
        self._model_loading = False
        self._model_worker = None
        self._model_touched = False           # the user chose a model: stop following the image
        self._labels_touched = False          # the user chose labels (or none): stop choosing for them
        self._last_model_index = -1
        self._defaults_from: Optional[tuple] = None
        self._validation_cache: Dict[tuple, Optional[str]] = {}
        self._closed = False
        self._view_reset = False
        self._build_ui()
        self._conns = Connections()
        self._connect_viewer()
        self._timer = QTimer(self)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._flush)
        self._lifetime = Lifetime(self, self._teardown)
        self._refresh_layer_choices()
        self._auto_model()
        self._on_model_choice()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        inner = QWidget()
        outer = QVBoxLayout(inner)
        outer.addWidget(self._input_box())
        outer.addWidget(self._model_box())
        outer.addWidget(self._generation_box())
        self.reason_label = QLabel("")
        self.reason_label.setWordWrap(True)
        self.reason_label.setStyleSheet("color: #e0a040;")
        outer.addWidget(self.reason_label)
        self.plan_label = QLabel("")
        self.plan_label.setWordWrap(True)
        outer.addWidget(self.plan_label)
        row = QHBoxLayout()
        self.run_btn = QPushButton("Run")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        outer.addLayout(row)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m frames")
        outer.addWidget(self.progress)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        outer.addWidget(self.status_label)
        outer.addWidget(self._runs_box())
        outer.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(scrolled(inner))

        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)

    def _input_box(self) -> QGroupBox:
        box = QGroupBox("Input")
        f = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to deform. A 2D+t cine with a 2D model uses the time frame on "
                                    "screen. The explorer's own output layers are not listed.")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Optional label map, deformed with the same fields (nearest neighbour).")
        self.slice_check = QCheckBox("slice on screen (2D model on a 3D volume)")
        self.slice_check.setToolTip("A 3D volume needs a 3D model; tick this to deform only the 2D slice on screen "
                                    "with a 2D model.")
        self.input_info = QLabel("")
        self.input_info.setWordWrap(True)
        f.addRow("Image", self.image_combo)
        f.addRow("Labels", self.labels_combo)
        f.addRow(self.slice_check)
        f.addRow(self.input_info)
        self.image_combo.currentIndexChanged.connect(
            lambda _i: (self._auto_labels(), self._auto_model(), self.validate()))
        self.labels_combo.activated.connect(self._on_labels_activated)
        self.labels_combo.currentIndexChanged.connect(lambda _i: self.validate())
        self.slice_check.toggled.connect(lambda _b: self.validate())
        return box

    def _model_box(self) -> QGroupBox:
        import os

        from ..weights import list_weights
        from ._worker import default_threads
        box = QGroupBox("Model")
        f = QFormLayout(box)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Bundled weights, or Browse... for a checkpoint file (.safetensors "
                                    "from this project, or a reference-implementation .pth state_dict).")
        try:
            entries = list_weights()
        except Exception:  # noqa: BLE001 - a broken registry must not break the widget
            entries = []
        self._known_models = entries
        for e in entries:
            desc = f"{e['name']}"
            if e.get("ndim"):
                desc += f" ({e['ndim']}D, S={e.get('size', '?')})"
            self.model_combo.addItem(desc, e["path"] if not e.get("bundled") else e["name"])
        self.model_combo.addItem(BROWSE, None)
        self.size_spin = QSpinBox()
        self.size_spin.setRange(8, 1024)
        self.size_spin.setSingleStep(8)
        self.size_spin.setValue(256)
        self.size_spin.setToolTip("Model side S for reference .pth checkpoints (they do not record it).")
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.setToolTip("auto: cuda > mps > cpu")
        self.threads_spin = QSpinBox()
        self.threads_spin.setRange(1, max(1, os.cpu_count() or 1))
        self.threads_spin.setValue(default_threads())
        self.threads_spin.setToolTip("CPU threads for generation. Default: torch's when OpenMP threads sleep while "
                                     "waiting (`drdm info`: openmp_wait); else the cores not busy now (load "
                                     "average), keeping one for the viewer on machines with more than two cores.")
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        f.addRow("Model", self.model_combo)
        f.addRow("S (.pth)", self.size_spin)
        f.addRow("Device", self.device_combo)
        f.addRow("CPU threads", self.threads_spin)
        f.addRow(self.model_info)
        self.model_combo.activated.connect(self._on_model_activated)
        self.model_combo.currentIndexChanged.connect(lambda _i: self._on_model_choice())
        self.device_combo.currentIndexChanged.connect(lambda _i: self._on_model_choice())
        self.size_spin.editingFinished.connect(self._on_model_choice)
        return box

    def _generation_box(self) -> QGroupBox:
        """T', seed, schedule, K, frame memory and the fold guard.  Options of the generation itself
        go here as one more row, read in :meth:`_params`."""
        box = QGroupBox("Generation")
        f = QFormLayout(box)
        self.generation_form = f
        self.tprime_spin = QSpinBox()
        self.tprime_spin.setRange(0, 80)
        self.tprime_spin.setValue(45)
        self.tprime_spin.setToolTip("T': number of forward diffusion steps (0..T); larger = stronger deformation.")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2 ** 31 - 1)
        self.seed_spin.setValue(0)
        self.new_seed_btn = QPushButton("new seed")
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.seed_spin, 1)
        seed_row.addWidget(self.new_seed_btn)
        self.schedule_combo = QComboBox()
        self.schedule_combo.addItems(["reference", "paper"])
        self.schedule_combo.setToolTip("reference: all T reverse steps (the authors' code); "
                                       "paper: T' reverse steps (Algorithm 2 as printed).")
        self.k_spin = QSpinBox()
        self.k_spin.setRange(1, 10)
        self.k_spin.setValue(2)
        self.k_spin.setToolTip("K: internal recursions of the network per reverse step.")
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(16, 1 << 20)
        self.budget_spin.setSingleStep(256)
        self.budget_spin.setValue(DEFAULT_BUDGET_MIB)
        self.budget_spin.setSuffix(" MiB")
        self.budget_spin.setToolTip("Memory for the stored frames. Over it, frames are stored compactly "
                                    "(float16) and then only every k-th frame is kept.")
        f.addRow("T'", self.tprime_spin)
        f.addRow("Seed", seed_row)
        f.addRow("Schedule", self.schedule_combo)
        f.addRow("K", self.k_spin)
        f.addRow("Frame memory", self.budget_spin)
        self.guard_check = QCheckBox("fold guard")
        self.guard_check.setToolTip("Make every recovery frame and the result fold-free (det(I + grad phi) > 0 "
                                    "everywhere, central and strict checks) by a local correction; the readout "
                                    "shows how many pixels folded before it. Off: the model's own fields.")
        f.addRow("", self.guard_check)
        self.new_seed_btn.clicked.connect(self.new_seed)
        self.schedule_combo.currentIndexChanged.connect(lambda _i: self.validate())
        for w in (self.tprime_spin, self.k_spin, self.budget_spin):
            w.valueChanged.connect(lambda _v: self.validate())
        return box

    def _runs_box(self) -> QGroupBox:
        box = QGroupBox("Runs and the frame on screen")
        v = QVBoxLayout(box)
        row = QHBoxLayout()
        self.run_combo = QComboBox()
        self.run_combo.setToolTip("The run shown (its layers are visible, the others hidden).")
        self.remove_btn = QPushButton("remove run")
        self.remove_btn.setToolTip("Delete the chosen run's layers and frames.")
        self.remove_btn.setEnabled(False)
        row.addWidget(self.run_combo, 1)
        row.addWidget(self.remove_btn)
        v.addLayout(row)
        row = QHBoxLayout()
        self.prev_btn = QPushButton("◀")
        self.next_btn = QPushButton("▶")
        self.prev_btn.setToolTip("previous frame")
        self.next_btn.setToolTip("next frame")
        self.follow_check = QCheckBox("follow new frames")
        self.follow_check.setChecked(True)
        row.addWidget(self.prev_btn)
        row.addWidget(self.next_btn)
        row.addWidget(self.follow_check, 1)
        v.addLayout(row)
        self.readout = QLabel("no run yet")
        self.readout.setWordWrap(True)
        self.readout.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.readout)
        self.plot = MetricPlot(on_pick=self.set_frame)
        v.addWidget(self.plot)
        self.prev_btn.clicked.connect(lambda: self.step(-1))
        self.next_btn.clicked.connect(lambda: self.step(+1))
        self.run_combo.activated.connect(lambda i: self.show_run(self.run_combo.itemData(i)))
        self.remove_btn.clicked.connect(lambda: self.remove_run())
        return box

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
        self._conns.disconnect_all()
        try:
            self._timer.stop()
        except RuntimeError:
            pass
        stop_workers([r.worker for r in self.state.runs if r.running] + [self._model_worker])

    # ------------------------------------------------------------------ layer choices
    @if_alive
    def _on_layers_changed(self, event=None):
        if event is not None and getattr(event, "type", "") == "inserted":
            try:
                self._conns.connect(event.value.events.name, self._on_layers_changed)
            except Exception:  # noqa: BLE001 - a layer without a name event
                pass
        if event is not None and getattr(event, "type", "") == "removed":
            self._forget_removed_runs()
        self._refresh_layer_choices()

    def _image_layers(self):
        from napari.layers import Image
        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and not is_output_layer(ly)]

    def _labels_candidates(self):
        from napari.layers import Image, Labels
        labs = [ly for ly in self.viewer.layers if isinstance(ly, Labels) and not is_output_layer(ly)]
        imgs = [ly for ly in self.viewer.layers if isinstance(ly, Image) and not is_output_layer(ly)
                and not ly.rgb]
        return labs + imgs

    @staticmethod
    def _label_text(layer) -> str:
        return layer.name if layer.__class__.__name__ == "Labels" else f"{layer.name} (image)"

    def _refresh_layer_choices(self):
        cur_img = self.image_combo.currentText()
        cur_lab = self.labels_combo.currentText()
        imgs = [ly.name for ly in self._image_layers()]
        labs = [self._label_text(ly) for ly in self._labels_candidates()]
        for combo, names, cur, extra in ((self.image_combo, imgs, cur_img, []),
                                         (self.labels_combo, labs, cur_lab, [NO_LABELS])):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + names)
            if cur in extra + names:
                combo.setCurrentText(cur)
            combo.blockSignals(False)
        self._auto_labels()
        if self.image_combo.currentText() != cur_img:
            self._auto_model()                   # only a change of image may change the model
        self.validate()

    def _auto_labels(self):
        """Until the user picks labels, choose a labels layer with the image's shape (or none)."""
        if self._labels_touched:
            return
        img = self._chosen_image()
        pick = NO_LABELS
        for ly in self._labels_candidates():
            if ly.__class__.__name__ == "Labels" and img is not None and ly.data.shape == img.data.shape:
                pick = ly.name
                break
        self.labels_combo.blockSignals(True)
        self.labels_combo.setCurrentText(pick)
        self.labels_combo.blockSignals(False)

    def _auto_model(self):
        """Until the user picks a model, choose the default bundled model of the image's dimensionality
        (a 3D volume gets the 3D model; a 2D image or a 2D+t cine the 2D one)."""
        if self._model_touched or not hasattr(self, "model_combo"):
            return
        img = self._chosen_image()
        if img is None:
            return
        from ..weights import default_weights
        try:
            name = default_weights(3 if spatial_ndim(img) >= 3 else 2)
        except (LookupError, ValueError, OSError):
            return
        idx = self.model_combo.findData(name)
        if idx >= 0 and idx != self.model_combo.currentIndex():
            self.model_combo.setCurrentIndex(idx)

    def _chosen_image(self):
        name = self.image_combo.currentText()
        return next((ly for ly in self._image_layers() if ly.name == name), None)

    def _chosen_labels(self):
        text = self.labels_combo.currentText()
        if not text or text == NO_LABELS:
            return None
        return next((ly for ly in self._labels_candidates() if self._label_text(ly) == text), None)

    def set_image_layer(self, name: str):
        """Choose the image layer by name, as the user would."""
        self.image_combo.setCurrentText(name)

    def _on_labels_activated(self, _index: int):
        self._labels_touched = True

    def set_labels_layer(self, name: Optional[str]):
        """Choose the labels layer by name (None: no labels), as the user would."""
        self._labels_touched = True
        if name is None:
            self.labels_combo.setCurrentText(NO_LABELS)
            return
        idx = self.labels_combo.findText(name)
        if idx < 0:
            idx = self.labels_combo.findText(f"{name} (image)")
        self.labels_combo.setCurrentIndex(idx)

    # ------------------------------------------------------------------ model
    def _on_model_activated(self, index: int):
        self._model_touched = True          # the user chose: stop following the image's dimensionality
        if self.model_combo.itemText(index) == BROWSE:
            path, _ = QFileDialog.getOpenFileName(self, "DRDM checkpoint", "",
                                                  "DRDM checkpoints (*.safetensors *.pth *.pt);;All files (*)")
            if path:
                self.set_checkpoint(path)
            else:
                self.model_combo.setCurrentIndex(max(0, self._last_model_index))

    def set_model(self, name: str):
        """Choose a bundled model by name, as the user would (it no longer follows the image)."""
        idx = self.model_combo.findData(name)
        if idx < 0:
            raise ValueError(f"no bundled model {name!r}")
        self._model_touched = True
        self.model_combo.setCurrentIndex(idx)

    def set_checkpoint(self, path: str, size: Optional[int] = None):
        """Add a checkpoint file to the model list and select it (what Browse... does)."""
        self._model_touched = True
        path = str(path)
        if size is not None:
            self.size_spin.setValue(int(size))
        idx = self.model_combo.findData(path)
        if idx < 0:
            self.model_combo.insertItem(self.model_combo.count() - 1, Path(path).name, path)
            idx = self.model_combo.findData(path)
        if self.model_combo.currentIndex() == idx:
            self._on_model_choice()
        else:
            self.model_combo.setCurrentIndex(idx)

    def _model_source(self) -> Tuple[Optional[str], Optional[int], str]:
        src = self.model_combo.currentData()
        is_ref = src is not None and str(src).lower().endswith(REFERENCE_SUFFIXES)
        self.size_spin.setEnabled(bool(is_ref))
        return src, (self.size_spin.value() if is_ref else None), self.device_combo.currentText()

    def _on_model_choice(self):
        if self._closed:
            return
        if self.model_combo.currentText() != BROWSE:
            self._last_model_index = self.model_combo.currentIndex()
        src, size, device = self._model_source()
        self._model = None
        self._model_error = None
        if src is None:
            self._model_loading = False
            self.model_info.setText("")
            self.validate()
            return
        self._model_request += 1
        req = self._model_request
        self._model_loading = True
        self.model_info.setText(f"loading {Path(str(src)).name} ...")
        self.validate()
        from napari.qt.threading import create_worker

        from ._worker import try_load_model
        worker = create_worker(try_load_model, str(src), size, device, _start_thread=False)
        worker.returned.connect(lambda res, req=req: self._on_model_loaded(req, *res))
        self._model_worker = worker
        worker.start()

    @if_alive
    def _on_model_loaded(self, req: int, model, error):
        if req != self._model_request:
            return
        self._model_loading = False
        if error is not None:
            self._model = None
            self._model_error = f"Model {Path(str(self._model_source()[0])).name} on "\
                f"{self.device_combo.currentText()} cannot be used: {error}"
            self.model_info.setText("")
        else:
            self._model = model
            cfg = model.config
            self.tprime_spin.setMaximum(cfg.n_steps)
            src = self._model_source()[:2]
            if self._defaults_from != src:       # a new model (not just a new device)
                self._defaults_from = src
                self.schedule_combo.setCurrentText(cfg.schedule)
                self.k_spin.setValue(int(cfg.k_recursions))
            self.model_info.setText(f"{model.name}: {model.ndim}D, S={model.size}, T={cfg.n_steps}, "
                                    f"on {model.device}")
        self.validate()

    @property
    def model(self):
        return self._model

    def model_ready(self) -> bool:
        return self._model is not None and not self._model_loading

    # ------------------------------------------------------------------ validation
    def _read_inputs(self) -> Inputs:
        """The arrays a run would use; raises ValueError with the reason when they are unusable."""
        img_layer = self._chosen_image()
        if img_layer is None:
            raise ValueError("No image layer: open an image or a sample (File > Open Sample > napari-drdm).")
        if self._model is None:
            if self._model_loading:
                raise ValueError("Loading the model ...")
            if self._model_error:
                raise ValueError(self._model_error)
            raise ValueError("Choose a model: a bundled one or Browse... for a checkpoint file.")
        return read_inputs(img_layer, self._chosen_labels(), self._model.ndim, self.viewer.dims.point,
                           self.slice_check.isChecked(), self._validation_cache)

    def _plan_for(self, inp: Inputs):
        from ..core.recovery import reverse_timesteps
        cfg = self._model.config
        t_prime = self.tprime_spin.value()
        schedule = self.schedule_combo.currentText()
        n_rec = len(reverse_timesteps(t_prime, cfg.n_steps, schedule)) if (t_prime > 0 or schedule == "reference") \
            else 0
        lo, hi = float(np.min(inp.image)), float(np.max(inp.image))
        return plan_frames(inp.image.shape, t_prime, n_rec, label_dtype(inp.labels), (lo, hi),
                           self.budget_spin.value() * 2 ** 20)

    def validate(self) -> bool:
        """Check the inputs; enable Run or show why not. Returns whether Run is possible."""
        if not hasattr(self, "run_btn") or self._closed:
            return False
        try:
            inp = self._read_inputs()
            plan = self._plan_for(inp)
        except ValueError as e:
            self.reason_label.setText(str(e))
            self.input_info.setText("")
            self.plan_label.setText("")
            self.run_btn.setEnabled(False)
            return False
        self.reason_label.setText("")
        self.input_info.setText(inp.describe)
        self.plan_label.setText(plan.describe())
        self.run_btn.setEnabled(not self.running)
        return True

    @property
    def reason(self) -> str:
        return self.reason_label.text()

    @property
    def running(self) -> bool:
        return self.state.running

    # ------------------------------------------------------------------ run
    def new_seed(self):
        self.seed_spin.setValue(random.randrange(0, 100000))

    def _params(self) -> dict:
        """What the generation is asked (add new generation options here, and to ``explore``)."""
        cfg = self._model.config
        p = {"t_prime": self.tprime_spin.value(), "seed": self.seed_spin.value(),
             "schedule": self.schedule_combo.currentText(), "k": self.k_spin.value(),
             "device": str(self._model.device), "fold_guard": self.guard_check.isChecked()}
        variant = []
        if p["schedule"] != cfg.schedule or p["k"] != cfg.k_recursions:
            variant.append(f"{p['schedule']} K{p['k']}")
        if p["fold_guard"]:
            variant.append("guard")
        if variant:
            p["variant"] = " ".join(variant)
        return p

    def _output_geometry(self, inp: Inputs):
        layer = inp.image_layer
        scale = tuple(float(s) for s in layer.scale)
        translate = [float(t) for t in layer.translate]
        for a, i in enumerate(inp.lead_index):
            translate[a] += i * scale[a]
        aff = layer_affine(layer)
        if aff is not None:
            md = layer.metadata or {}
            if md.get("drdm_time_first") or layer.ndim > 3:
                aff = None                           # the affine does not describe the stack axes
            elif inp.lead_index:
                aff = aff.copy()
                for a, i in enumerate(inp.lead_index):
                    aff[:3, 3] += aff[:3, a] * i
        return scale, tuple(translate), aff

    def run(self):
        """Start a generation in a worker thread (no-op with the reason shown if inputs are invalid)."""
        t_click = time.perf_counter()            # timing starts at Run, before the inputs are read
        if self.running or not self.validate():
            return None
        from napari.qt.threading import create_worker

        from ._worker import explore
        inp = self._read_inputs()
        plan = self._plan_for(inp)
        model = self._model
        params = self._params()
        store = FrameStore(plan, has_labels=inp.labels is not None, lead_ndim=len(inp.lead_index))
        previous = self.state.current
        run = self.state.new_run(model.name, inp, params, store, *self._output_geometry(inp))
        run.t_start = t_click
        if previous is not None:
            self.layers.set_run_visible(previous, False)     # one run on screen at a time
        self.run_combo.addItem(run.title, run.id)
        self.run_combo.setCurrentIndex(self.run_combo.count() - 1)
        self.remove_btn.setEnabled(False)
        self.progress.setRange(0, max(1, plan.n_total))
        self.progress.setValue(0)
        self.plan_label.setText(plan.describe())
        self.status_label.setText(self.state.progress_text(run))
        worker = create_worker(explore, model, inp.image, inp.labels, inp.spacing, params["t_prime"],
                               params["seed"], params["schedule"], params["k"], store,
                               threads=self.threads_spin.value() if model.device.type == "cpu" else None,
                               fold_guard=params["fold_guard"], _start_thread=False)
        worker.yielded.connect(lambda info, run=run: self._on_yield(run, info))
        worker.returned.connect(lambda res, run=run: self._on_returned(run, res))
        worker.errored.connect(lambda e, run=run: self._on_error(run, e))
        worker.aborted.connect(lambda run=run: self._on_aborted(run))
        worker.finished.connect(lambda run=run: self._on_finished(run))
        run.worker = worker
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._timer.start()
        worker.start()
        return worker

    def cancel(self):
        """Stop the running generation after the current step; computed frames stay."""
        for r in self.state.runs:
            if r.running and r.worker is not None:
                r.cancelled = True
                r.worker.quit()
                self.status_label.setText("cancelling after the current step ...")

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
        for run in self.state.runs:
            if not run.running and not complete:
                continue
            if run.running and not run.cancelled and run.last_info is not None:
                self.progress.setValue(run.last_info["done"])
                self.status_label.setText(self.state.progress_text(run))
            had_frames = "frames" in run.layers
            changed = self.layers.flush(run, complete)
            if not had_frames and "frames" in run.layers:
                self._first_frames_layer(run)
            n = run.layer_n.get("frames", run.store.n)
            if changed and self.follow_check.isChecked() and (run.running or run.shown < n) \
                    and run.id == self.state.current_id:
                self.layers.set_frame(run, n - 1)
            run.shown = n
        self.update_readout()

    def _first_frames_layer(self, run: Run):
        """The frames layer was just added: time it, hide the inputs under it, fit the view once."""
        self.state.mark(run, "first_layer")
        canvas = _canvas_of(self)
        if canvas is not None and canvas.isVisible():
            _PaintWatcher(canvas, lambda run=run: self.state.mark(run, "first_drawn"))
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
        self._flush(complete=True)
        self.layers.add_final(run, result)

    @if_alive
    def _on_error(self, run: Run, error):
        run.running = False
        run.error = f"{type(error).__name__}: {error}"
        self.status_label.setText(f"error in {run.title}: {run.error}")

    @if_alive
    def _on_aborted(self, run: Run):
        run.cancelled = True

    @if_alive
    def _on_finished(self, run: Run):
        self.state.mark(run, "end")
        run.running = False
        self._flush(complete=True)
        if "frames" in run.layers and run.id == self.state.current_id:
            self.viewer.layers.selection.active = run.layers["frames"]
        if run.last_info is not None:
            self.progress.setValue(run.last_info["done"])
        if not self.running:
            self._timer.stop()
        if run.cancelled:
            self.status_label.setText(self.state.cancelled_text(run))
        elif run.error is None:
            self.status_label.setText(self.state.done_text(run))
        self.cancel_btn.setEnabled(False)
        self.remove_btn.setEnabled(True)
        self.validate()
        self.update_readout()

    # ------------------------------------------------------------------ runs
    def show_run(self, run_id: Optional[int]):
        """Make ``run_id`` the current run: its layers visible, every other run's hidden."""
        run = self.state.select(run_id)
        if run is None:
            return
        for r in self.state.runs:
            if r is not run:
                self.layers.set_run_visible(r, False)
        self.layers.set_run_visible(run, True)
        idx = self.run_combo.findData(run.id)
        if idx >= 0:
            self.run_combo.setCurrentIndex(idx)
        self.remove_btn.setEnabled(not run.running)
        self.update_readout()

    def remove_run(self, run_id: Optional[int] = None):
        """Delete a finished run's layers and frames (default: the current run)."""
        run_id = self.state.current_id if run_id is None else run_id
        run = self.state.remove(run_id)
        if run is None:
            return
        self.layers.remove(run)
        self._drop_run_item(run.id)

    def _drop_run_item(self, run_id: int):
        idx = self.run_combo.findData(run_id)
        if idx >= 0:
            self.run_combo.removeItem(idx)
        if self.state.current is not None:
            self.show_run(self.state.current_id)
        else:
            for ly in self._image_layers() + self._labels_candidates():
                ly.visible = True
            self.remove_btn.setEnabled(False)
            self.readout.setText("no run yet")
            self.plot.clear()

    def _forget_removed_runs(self):
        """The user deleted a run's frames layer from the layer list: forget that run."""
        for run in list(self.state.runs):
            layer = run.layers.get("frames")
            if not run.running and layer is not None and layer not in self.viewer.layers:
                self.layers.remove(run)
                self.state.remove(run.id)
                self._drop_run_item(run.id)

    # ------------------------------------------------------------------ the frame on screen
    def _frame_on_screen(self, run: Run) -> Tuple[Optional[int], str]:
        layer = self.layers.frames_layer(run)
        return self.state.frame_on_screen(run, self.layers.data_position(run),
                                          bool(layer is not None and layer.visible))

    def step(self, delta: int):
        """Move the frame slider by ``delta`` frames (the ◀ ▶ buttons)."""
        run = self.state.current
        if run is None:
            return
        j, _why = self._frame_on_screen(run)
        if run.running:
            self.follow_check.setChecked(False)   # the user takes over the slider
        self.layers.set_frame(run, (j if j is not None else 0) + delta)

    def set_frame(self, j: int):
        """Show frame ``j`` (0-based) of the current run."""
        run = self.state.current
        if run is not None:
            if run.running:
                self.follow_check.setChecked(False)
            self.layers.set_frame(run, j)

    @if_alive
    def _on_active_layer(self, event=None):
        run = self.state.run_of_layer(self.viewer.layers.selection.active)
        if run is not None and run.id != self.state.current_id:
            self.state.select(run.id)
            idx = self.run_combo.findData(run.id)
            if idx >= 0:
                self.run_combo.setCurrentIndex(idx)
        self.update_readout()

    @if_alive
    def _on_dims(self, event=None):
        self.update_readout()
        img = self._chosen_image()
        if not self.running and img is not None and self._model is not None and img.ndim > self._model.ndim:
            self.validate()                      # the slice a 2D model would use has changed

    def readout_metrics(self) -> Optional[dict]:
        """The metrics of the frame on screen, None when no frame of the current run is drawn."""
        run = self.state.current
        if run is None:
            return None
        j, _ = self._frame_on_screen(run)
        return None if j is None else run.store.metrics[j]

    @if_alive
    def update_readout(self):
        run = self.state.current
        if run is None:
            return
        j, why = self._frame_on_screen(run)
        self.readout.setText(self.state.readout(run, j, why))
        self.plot.set_data(run.series(), j, run.title)

    def closeEvent(self, event):  # noqa: N802 - Qt API: stop work when the dock closes
        self.cancel()
        self._timer.stop()
        super().closeEvent(event)
