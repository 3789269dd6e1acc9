"""The DRDM explorer: deform an image step by step with DRDM and watch it being recovered.

A thin Qt view (qtpy only) over :mod:`._worker` (the generation loop, in a napari thread worker)
and :mod:`._layers` (what is stored per frame, within a memory budget); the output layers of
a run are made and refreshed by :mod:`._run_layers`.  The UI thread only reads
the frame store and updates layers, a few times per second.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ._layers import DEFAULT_BUDGET_MIB, FrameStore, label_dtype, plan_frames
from ._run_layers import RunLayersMixin, _if_alive

if TYPE_CHECKING:
    import napari

__all__ = ["ExplorerWidget"]

BROWSE = "Browse..."
NO_LABELS = "(none)"
REFERENCE_SUFFIXES = (".pth", ".pt")
@dataclass
class _Inputs:
    """What a run needs, read from the chosen layers (the spatial block the model will see)."""

    image_layer: Any
    labels_layer: Any
    image: np.ndarray                       # (*spatial)
    labels: Optional[np.ndarray]
    spacing: Tuple[float, ...]              # spatial spacing
    lead_index: Tuple[int, ...]             # indices of the leading (stack/time) axes, () if none
    describe: str


@dataclass
class _Run:
    """One generation and its layers."""

    id: int
    base: str
    inputs: _Inputs
    params: Dict[str, Any]
    store: FrameStore
    out_scale: Tuple[float, ...]
    out_translate: Tuple[float, ...]
    out_affine: Optional[np.ndarray]
    worker: Any = None
    kinds: Tuple[str, ...] = ()                                    # layers this run makes, in order
    layers: Dict[str, Any] = field(default_factory=dict)
    layer_n: Dict[str, int] = field(default_factory=dict)         # frames each layer shows
    shown: int = 0
    running: bool = True
    cancelled: bool = False
    t_start: float = 0.0
    t_first: Optional[float] = None
    result: Any = None
    last_info: Optional[dict] = None


def _layer_affine_meta(layer) -> Optional[np.ndarray]:
    md = getattr(layer, "metadata", None) or {}
    aff = md.get("affine")
    if aff is None:
        return None
    a = np.asarray(aff, dtype=np.float64)
    ok = a.shape == (4, 4) and np.all(np.isfinite(a)) and abs(np.linalg.det(a[:3, :3])) > 1e-12
    return a if ok else None


class ExplorerWidget(RunLayersMixin, QWidget):
    """Dock widget: image (+ labels) -> DRDM forward deformation and recovery, frame by frame."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: Optional[QWidget] = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self._runs: List[_Run] = []
        self._run_counter = 0
        self._model = None
        self._model_error: Optional[str] = None
        self._model_request = 0
        self._model_loading = False
        self._validation_cache: Dict[tuple, Optional[str]] = {}
        self._labels_touched = False          # the user chose labels (or none): stop choosing for them
        self._build_ui()
        self._connect_viewer()
        self._timer = QTimer(self)
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._flush)
        self._refresh_layer_choices()
        self._on_model_choice()

    # ------------------------------------------------------------------ UI
    def _build_ui(self):
        outer = QVBoxLayout(self)

        box_in = QGroupBox("Input")
        f = QFormLayout(box_in)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to deform. A stack (3D or 2D+t) with a 2D model uses the "
                                    "slice currently shown by the viewer's sliders.")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Optional label map, deformed with the same fields (nearest neighbour).")
        self.input_info = QLabel("")
        self.input_info.setWordWrap(True)
        f.addRow("Image", self.image_combo)
        f.addRow("Labels", self.labels_combo)
        f.addRow(self.input_info)
        outer.addWidget(box_in)

        box_m = QGroupBox("Model")
        f = QFormLayout(box_m)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Bundled weights, or Browse... for a checkpoint file (.safetensors "
                                    "from this project, or a reference-implementation .pth state_dict).")
        from ..weights import list_weights
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
        import os
        self.threads_spin.setRange(1, max(1, os.cpu_count() or 1))
        from ._worker import default_threads
        self.threads_spin.setValue(default_threads())
        self.threads_spin.setToolTip("CPU threads for generation (torch's default; all cores but one when "
                                     "OpenMP threads spin-wait, see `drdm info`: openmp_wait).")
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        f.addRow("Model", self.model_combo)
        f.addRow("S (.pth)", self.size_spin)
        f.addRow("Device", self.device_combo)
        f.addRow("CPU threads", self.threads_spin)
        f.addRow(self.model_info)
        outer.addWidget(box_m)

        box_p = QGroupBox("Generation")
        f = QFormLayout(box_p)
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
        outer.addWidget(box_p)

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

        box_r = QGroupBox("Frame on screen")
        v = QVBoxLayout(box_r)
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
        outer.addWidget(box_r)
        outer.addStretch(1)

        self.run_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
        self.new_seed_btn.clicked.connect(self.new_seed)
        self.prev_btn.clicked.connect(lambda: self.step(-1))
        self.next_btn.clicked.connect(lambda: self.step(+1))
        self.model_combo.activated.connect(self._on_model_activated)
        self.model_combo.currentIndexChanged.connect(lambda _i: self._on_model_choice())
        self.device_combo.currentIndexChanged.connect(lambda _i: self._on_model_choice())
        self.size_spin.editingFinished.connect(self._on_model_choice)
        self.image_combo.currentIndexChanged.connect(lambda _i: (self._auto_labels(), self._auto_model(),
                                                                 self.validate()))
        self.labels_combo.activated.connect(self._on_labels_activated)
        for w in (self.labels_combo, self.schedule_combo):
            w.currentIndexChanged.connect(lambda _i: self.validate())
        for w in (self.tprime_spin, self.k_spin, self.budget_spin):
            w.valueChanged.connect(lambda _v: self.validate())

    def _connect_viewer(self):
        ev = self.viewer.layers.events
        on_active = self._on_active_layer
        conns = [(ev.inserted, self._on_layers_changed), (ev.removed, self._on_layers_changed),
                 (ev.moved, self._on_layers_changed), (self.viewer.dims.events.current_step, self._on_dims),
                 (self.viewer.layers.selection.events.active, on_active)]
        for emitter, cb in conns:
            emitter.connect(cb)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        runs = self._runs

        def _teardown(*_args, conns=conns, runs=runs):
            for emitter, cb in conns:
                try:
                    emitter.disconnect(cb)
                except Exception:  # noqa: BLE001 - the viewer may be gone already
                    pass
            for r in runs:
                if r.running and r.worker is not None:
                    r.worker.quit()
        self.destroyed.connect(_teardown)

    def _on_active_layer(self, event=None):
        self.update_readout()

    # ------------------------------------------------------------------ layer choices
    @_if_alive
    def _on_layers_changed(self, event=None):
        if event is not None and getattr(event, "type", "") == "inserted":
            try:
                event.value.events.name.connect(self._on_layers_changed)
            except Exception:
                pass
        self._refresh_layer_choices()

    def _image_layers(self):
        from napari.layers import Image
        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and not self._is_output(ly)]

    def _labels_candidates(self):
        from napari.layers import Image, Labels
        labs = [ly for ly in self.viewer.layers if isinstance(ly, Labels) and not self._is_output(ly)]
        imgs = [ly for ly in self.viewer.layers if isinstance(ly, Image) and not self._is_output(ly)
                and not ly.rgb]
        return labs + imgs

    @staticmethod
    def _is_output(layer) -> bool:
        return "drdm_run" in (getattr(layer, "metadata", None) or {})

    def _refresh_layer_choices(self):
        cur_img = self.image_combo.currentText()
        cur_lab = self.labels_combo.currentText()
        imgs = [ly.name for ly in self._image_layers()]
        labs = [ly.name if ly.__class__.__name__ == "Labels" else f"{ly.name} (image)"
                for ly in self._labels_candidates()]
        for combo, names, cur, extra in ((self.image_combo, imgs, cur_img, []),
                                         (self.labels_combo, labs, cur_lab, [NO_LABELS])):
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + names)
            if cur in extra + names:
                combo.setCurrentText(cur)
            combo.blockSignals(False)
        self._auto_labels()
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
        (a 3D volume gets the 3D model; a 2D image or a 2D+t stack the 2D one)."""
        if getattr(self, "_model_touched", False):
            return
        img = self._chosen_image()
        if img is None:
            return
        md = img.metadata or {}
        spatial = img.ndim - (1 if md.get("drdm_time_first") else 0) - (1 if getattr(img, "rgb", False) else 0)
        from ..weights import default_weights
        try:
            name = default_weights(3 if spatial >= 3 else 2)
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
        for ly in self._labels_candidates():
            shown = ly.name if ly.__class__.__name__ == "Labels" else f"{ly.name} (image)"
            if shown == text:
                return ly
        return None

    def set_image_layer(self, name: str):
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
        if self.model_combo.currentText() != BROWSE:
            self._last_model_index = self.model_combo.currentIndex()
        else:
            self._last_model_index = getattr(self, "_last_model_index", -1)
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

    @_if_alive
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
            if getattr(self, "_defaults_from", None) != src:   # a new model (not just a new device)
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
    def _read_inputs(self) -> _Inputs:
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
        nd = self._model.ndim
        name = img_layer.name
        if getattr(img_layer, "rgb", False):
            raise ValueError(f"Image '{name}' is RGB/RGBA: DRDM needs a single-channel grey-level image.")
        if getattr(img_layer, "multiscale", False):
            raise ValueError(f"Image '{name}' is multiscale: not supported, open a single-resolution image.")
        data = img_layer.data
        if data.ndim < nd:
            raise ValueError(f"Image '{name}' is {data.ndim}D but the model is {nd}D: choose a {nd}D image "
                             f"or a {data.ndim}D model.")
        if data.ndim > nd + 2:
            raise ValueError(f"Image '{name}' is {data.ndim}D: at most {nd + 2}D (a {nd}D image with up to two "
                             f"stack axes) for this {nd}D model.")
        dt = np.dtype(data.dtype)
        if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating) or dt == bool):
            raise ValueError(f"Image '{name}' has dtype {dt}: a real-valued image is needed.")
        lead = data.ndim - nd
        idx: Tuple[int, ...] = ()
        if lead:
            pos = img_layer.world_to_data(self.viewer.dims.point)
            idx = tuple(int(np.clip(np.round(pos[a]), 0, data.shape[a] - 1)) for a in range(lead))
        image = np.asarray(data[idx] if lead else data)
        if min(image.shape) < 2:
            raise ValueError(f"Image '{name}' is too small: shape {image.shape}.")
        spacing = tuple(float(s) for s in np.asarray(img_layer.scale)[lead:])
        if any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise ValueError(f"Image '{name}' has an unusable scale {tuple(img_layer.scale)}.")
        key = ("img", id(img_layer), id(data), idx)
        if key not in self._validation_cache:
            self._validation_cache[key] = None if np.all(np.isfinite(image)) else \
                f"Image '{name}' contains NaN or infinite values{' in this slice' if lead else ''}: replace them first."
        if self._validation_cache[key]:
            raise ValueError(self._validation_cache[key])
        labels = None
        lab_layer = self._chosen_labels()
        if lab_layer is not None:
            ldata = lab_layer.data
            lname = lab_layer.name
            if getattr(lab_layer, "multiscale", False):
                raise ValueError(f"Labels '{lname}' are multiscale: not supported.")
            if tuple(ldata.shape) == tuple(data.shape):
                labels = np.asarray(ldata[idx] if lead else ldata)
            elif tuple(ldata.shape) == tuple(image.shape):
                labels = np.asarray(ldata)
            else:
                raise ValueError(f"Labels '{lname}' have shape {tuple(ldata.shape)} but the image '{name}' has "
                                 f"{tuple(data.shape)}" + (f" (slice {tuple(image.shape)})" if lead else "")
                                 + ": they must match.")
            ldt = np.dtype(labels.dtype)
            if ldt == bool:
                labels = labels.astype(np.uint8)
            elif not np.issubdtype(ldt, np.integer):
                lkey = ("lab", id(lab_layer), id(ldata), idx)
                if lkey not in self._validation_cache:
                    ok = np.issubdtype(ldt, np.floating) and np.all(np.isfinite(labels)) \
                        and np.all(labels == np.round(labels))
                    self._validation_cache[lkey] = None if ok else \
                        (f"Labels '{lname}' hold non-integer float values (dtype {ldt}): a label map needs integer "
                         f"classes, not a probability map.")
                if self._validation_cache[lkey]:
                    raise ValueError(self._validation_cache[lkey])
                labels = labels.astype(np.int32)
        if len(self._validation_cache) > 64:
            self._validation_cache.clear()
        shape_txt = "x".join(str(n) for n in image.shape)
        sp_txt = "x".join(f"{s:g}" for s in spacing)
        if lead:
            where = ", ".join(f"axis {a} = {i}" for a, i in enumerate(idx))
            desc = f"{nd}D slice ({where}) of the {data.ndim}D '{name}': {shape_txt}, spacing {sp_txt}"
            other = [e["name"] for e in self._known_models if e.get("ndim") == data.ndim]
            if other and data.ndim in (2, 3):
                desc += f" (the {data.ndim}D model '{other[0]}' would deform the whole volume)"
        else:
            desc = f"{nd}D '{name}': {shape_txt}, spacing {sp_txt}"
        if labels is not None:
            desc += f"; labels '{lab_layer.name}'"
        return _Inputs(img_layer, lab_layer, image, labels, spacing, idx, desc)

    def _plan_for(self, inp: _Inputs):
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
        if not hasattr(self, "run_btn"):
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
        return any(r.running for r in self._runs)

    # ------------------------------------------------------------------ run
    def new_seed(self):
        self.seed_spin.setValue(random.randrange(0, 100000))

    def run(self):
        """Start a generation in a worker thread (no-op with the reason shown if inputs are invalid)."""
        if self.running or not self.validate():
            return None
        from napari.qt.threading import create_worker

        from ._worker import explore
        inp = self._read_inputs()
        plan = self._plan_for(inp)
        model = self._model
        params = {"t_prime": self.tprime_spin.value(), "seed": self.seed_spin.value(),
                  "schedule": self.schedule_combo.currentText(), "k": self.k_spin.value(),
                  "model": model.name, "device": str(model.device)}
        lead = len(inp.lead_index)
        store = FrameStore(plan, has_labels=inp.labels is not None, lead_ndim=lead)
        self._run_counter += 1
        base = f"{inp.image_layer.name} DRDM T'{params['t_prime']} s{params['seed']}"
        if params["schedule"] != model.config.schedule or params["k"] != model.config.k_recursions:
            base += f" {params['schedule']} K{params['k']}"
        if lead:
            base += " @" + ",".join(str(i) for i in inp.lead_index)
        layer = inp.image_layer
        scale = tuple(float(s) for s in layer.scale)
        translate = [float(t) for t in layer.translate]
        for a, i in enumerate(inp.lead_index):
            translate[a] += i * scale[a]
        aff = _layer_affine_meta(layer)
        if aff is not None:
            md = layer.metadata or {}
            if md.get("drdm_time_first") or layer.ndim > 3:
                aff = None                           # the affine does not describe the stack axes
            elif lead:
                aff = aff.copy()
                for a, i in enumerate(inp.lead_index):
                    aff[:3, 3] += aff[:3, a] * i
        run = _Run(self._run_counter, base, inp, params, store, scale, tuple(translate), aff)
        run.kinds = ("image",) + (("labels",) if "labels" in store.buffers else ()) + \
            ("folding", "grid", "jacobian", "vectors")
        self._runs.append(run)
        self.progress.setRange(0, max(1, plan.n_total))
        self.progress.setValue(0)
        self.plan_label.setText(plan.describe())
        self.status_label.setText(f"running {base} ...")
        worker = create_worker(explore, model, inp.image, inp.labels, inp.spacing, params["t_prime"],
                               params["seed"], params["schedule"], params["k"], store,
                               threads=self.threads_spin.value() if model.device.type == "cpu" else None,
                               _start_thread=False)
        worker.yielded.connect(lambda info, run=run: self._on_yield(run, info))
        worker.returned.connect(lambda res, run=run: self._on_returned(run, res))
        worker.errored.connect(lambda e, run=run: self._on_error(run, e))
        worker.aborted.connect(lambda run=run: self._on_aborted(run))
        worker.finished.connect(lambda run=run: self._on_finished(run))
        run.worker = worker
        run.t_start = time.perf_counter()
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self._timer.start()
        worker.start()
        return worker

    def cancel(self):
        """Stop the running generation after the current step; computed frames stay."""
        for r in self._runs:
            if r.running and r.worker is not None:
                r.cancelled = True
                r.worker.quit()
                self.status_label.setText("cancelling after the current step ...")

    @_if_alive
    def _on_yield(self, run: _Run, info: dict):
        """Per frame: only bookkeeping; the widgets and layers are refreshed by the timer (5 per second)."""
        if run.t_first is None:
            run.t_first = time.perf_counter() - run.t_start
        run.last_info = info
        if run.shown == 0 and run.store.n > 0:
            self._flush()                 # the first frame shows at once

    def _show_progress(self, run: _Run):
        info = run.last_info
        if info is None or not run.running or run.cancelled:
            return
        self.progress.setValue(info["done"])
        what = f"forward t'={info['t']}" if info["forward"] else \
            f"recovery step {info['index']}/{info['phase_total']} (t={info['t']})"
        self.status_label.setText(f"running {run.base}: frame {info['done']}/{info['total']}, {what}")

    @_if_alive
    def _on_returned(self, run: _Run, result):
        run.result = result
        self._flush(complete=True)
        self._add_final_layers(run, result)
        m = result.metrics
        took = time.perf_counter() - run.t_start
        first = f", first frame after {run.t_first:.2f} s" if run.t_first is not None else ""
        self.status_label.setText(
            f"done in {took:.1f} s{first}. Recovered field (model grid, paper protocol): max {m['max_disp_pct']:.2f} %, "
            f"mean {m['mean_disp_pct']:.2f} % of side, folding {m['folding_pct']:.3f} %.")

    @_if_alive
    def _on_error(self, run: _Run, error):
        run.running = False
        self.status_label.setText(f"error: {type(error).__name__}: {error}")

    @_if_alive
    def _on_aborted(self, run: _Run):
        run.cancelled = True
        self._flush(complete=True)
        self.status_label.setText(f"cancelled after {run.store.n_seen} of {run.store.plan.n_total} frames; "
                                  f"the {run.store.n} computed frames are kept (no final layers).")

    @_if_alive
    def _on_finished(self, run: _Run):
        run.running = False
        self._flush(complete=True)
        if run.last_info is not None:
            self.progress.setValue(run.last_info["done"])
        if not self.running:
            self._timer.stop()
        self.cancel_btn.setEnabled(False)
        self.validate()
        self.update_readout()

    def _readout_run(self) -> Optional[_Run]:
        active = self.viewer.layers.selection.active
        rid = (getattr(active, "metadata", None) or {}).get("drdm_run") if active is not None else None
        for r in reversed(self._runs):
            if r.layers and (rid is None or r.id == rid):
                return r
        return None

    def step(self, delta: int):
        """Move the frame slider by ``delta`` frames (the ◀ ▶ buttons)."""
        run = self._readout_run()
        if run is None:
            return
        j = self._current_frame(run)
        if j is not None:
            if run.running:
                self.follow_check.setChecked(False)   # the user takes over the slider
            self._set_frame(run, j + delta)

    @_if_alive
    def _on_dims(self, event=None):
        self.update_readout()
        img = self._chosen_image()
        if not self.running and img is not None and self._model is not None and img.ndim > self._model.ndim:
            self.validate()                      # the slice a 2D model would use has changed

    def readout_metrics(self) -> Optional[dict]:
        run = self._readout_run()
        if run is None:
            return None
        j = self._current_frame(run)
        return None if j is None else run.store.metrics[j]

    @_if_alive
    def update_readout(self):
        run = self._readout_run()
        if run is None:
            return
        j = self._current_frame(run)
        if j is None:
            return
        m = run.store.metrics[j]
        if m["phase"] == "forward":
            what = f"forward t'={m['t']} of {m['total']}"
        else:
            what = f"recovery step {m['index']}/{m['total']} (t={m['t']})"
        self.readout.setText(
            f"<b>{run.base}</b><br>frame {j + 1}/{run.store.n} shown (#{m['frame'] + 1} of {m['n_total']}): {what}<br>"
            f"max displacement {m['max_disp_pct']:.2f} % of side, mean {m['mean_disp_pct']:.2f} %<br>"
            f"folding {m['folding_pct']:.3f} % (min det J {m['min_jacobian']:.3f})")

    def closeEvent(self, event):  # stop work when the dock closes
        self.cancel()
        self._timer.stop()
        super().closeEvent(event)
