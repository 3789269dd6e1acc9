"""DRDM dataset export: Algorithm 3 (segmentation sets) and 4 (registration pairs) from napari.

A thin Qt view (qtpy only) over :mod:`napari_drdm.export`, the engine the ``drdm augment`` and
``drdm synthesize-pairs`` commands use: the export runs in a napari thread worker, one event per
written output drives the progress bar, Cancel stops after the current batch (finished outputs
stay valid and the folder can be resumed), and the first few results are added as layers.
Layer inputs are saved to ``OUT/sources/`` first, so every manifest row stays reproducible.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..core.config import SCHEDULE_NAMES
from ..errors import DRDMError, one_line
from ._inputs import is_output_layer
from ._lifetime import Lifetime, if_alive, stop_workers

if TYPE_CHECKING:
    import napari

__all__ = ["ExportWidget"]

NO_LABELS = "(none)"
MODES = {"Segmentation set (Algorithm 3)": "augment", "Registration pairs (Algorithm 4)": "pairs"}
EXISTING = {"refuse if not empty": (False, False), "resume": (True, False), "overwrite": (False, True)}


WEIGHT_FILES = "DRDM checkpoints (*.safetensors *.pth *.pt);;All files (*)"


def _browse_row(edit: QLineEdit, parent: QWidget, title: str, file_filter: Optional[str] = None) -> QWidget:
    """A line edit with a Browse... button: a folder, or a file when ``file_filter`` is given."""
    box = QWidget(parent)
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(edit)
    btn = QPushButton("Browse...", box)

    def pick():
        start = edit.text() or str(Path.home())
        if file_filter is None:
            chosen = QFileDialog.getExistingDirectory(parent, title, start)
        else:
            chosen, _ = QFileDialog.getOpenFileName(parent, title, start, file_filter)
        if chosen:
            edit.setText(chosen)
    btn.clicked.connect(pick)
    lay.addWidget(btn)
    return box


class ExportWidget(QWidget):
    """Pick layers or a folder, N, T', the output folder and options; run, watch, cancel, preview."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer"):
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.summary: Optional[dict] = None
        self._stop = threading.Event()
        self._t0 = 0.0
        self._closed = False
        self._labels_touched = False          # the user chose labels (or none): stop choosing for them
        inner = QWidget(self)
        outer = QVBoxLayout(inner)
        form = QFormLayout()
        outer.addLayout(form)

        self.source = QComboBox(self)
        self.source.addItems(["Layers", "Folder"])
        form.addRow("Input", self.source)
        self.image_combo = QComboBox(self)
        form.addRow("Image layer", self.image_combo)
        self.labels_combo = QComboBox(self)
        form.addRow("Labels layer", self.labels_combo)
        self.folder_edit = QLineEdit(self)
        self.folder_edit.setPlaceholderText("images (+ case_label.* / images/ + labels/)")
        form.addRow("Input folder", _browse_row(self.folder_edit, self, "Input folder"))

        self.mode = QComboBox(self)
        self.mode.addItems(list(MODES))
        form.addRow("Export", self.mode)
        self.n_spin = QSpinBox(self)
        self.n_spin.setRange(1, 100000)
        self.n_spin.setValue(4)
        form.addRow("Outputs per image", self.n_spin)
        self.tprime_edit = QLineEdit("reference", self)
        self.tprime_edit.setToolTip("45 | 40,45,50 | 40:52:2 (stop included) | reference (48, 50, 50, 52, ...)")
        self.tprime_label = QLabel("T'", self)
        form.addRow(self.tprime_label, self.tprime_edit)
        self.tprime_syn_edit = QLineEdit("45", self)
        form.addRow("T' syn", self.tprime_syn_edit)
        self.weights_edit = QLineEdit(self)
        self.weights_edit.setPlaceholderText("auto: bundled model of the image's dimension")
        self.weights_edit.setToolTip("A bundled model's name (see drdm weights) or a checkpoint file; "
                                     "empty: the bundled default for the image's dimensionality.")
        form.addRow("Weights", _browse_row(self.weights_edit, self, "DRDM checkpoint", WEIGHT_FILES))
        self.seed_spin = QSpinBox(self)
        self.seed_spin.setRange(0, 2 ** 31 - 1)
        form.addRow("Seed", self.seed_spin)
        self.schedule = QComboBox(self)
        self.schedule.addItems(["model default", *SCHEDULE_NAMES])
        form.addRow("Reverse loop", self.schedule)
        self.batch_spin = QSpinBox(self)
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(4)
        form.addRow("Batch", self.batch_spin)
        import os

        from ._worker import default_threads
        self.threads_spin = QSpinBox(self)
        self.threads_spin.setRange(1, max(1, os.cpu_count() or 1))
        self.threads_spin.setValue(default_threads())
        self.threads_spin.setToolTip("CPU threads for generation (the explorer's default: the cores not busy now).")
        form.addRow("CPU threads", self.threads_spin)
        self.inverse_check = QCheckBox("also write the inverse field", self)
        form.addRow("", self.inverse_check)
        self.guard_check = QCheckBox("fold guard: every written field fold-free", self)
        self.guard_check.setChecked(True)
        self.guard_check.setToolTip("det(I + grad phi) > 0 at every pixel/voxel of each written field (central and "
                                    "strict Jacobian checks), by a local correction around the folds; "
                                    "README 'Fold-free deformations'")
        form.addRow("", self.guard_check)
        self.existing = QComboBox(self)
        self.existing.addItems(list(EXISTING))
        form.addRow("Existing outputs", self.existing)
        self.out_edit = QLineEdit(self)
        form.addRow("Output folder", _browse_row(self.out_edit, self, "Output folder"))
        self.preview_spin = QSpinBox(self)
        self.preview_spin.setRange(0, 32)
        self.preview_spin.setValue(3)
        form.addRow("Preview layers", self.preview_spin)

        buttons = QHBoxLayout()
        self.run_btn = QPushButton("Export", self)
        self.cancel_btn = QPushButton("Cancel", self)
        self.cancel_btn.setEnabled(False)
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        outer.addLayout(buttons)
        self.progress = QProgressBar(self)
        self.progress.setFormat("%v / %m outputs")
        self.progress.setValue(0)
        outer.addWidget(self.progress)
        self.status = QLabel("", self)
        self.status.setWordWrap(True)
        outer.addWidget(self.status)
        outer.addStretch(1)
        area = QScrollArea(self)              # the dock can be shorter than the form (small screens)
        area.setWidget(inner)
        area.setWidgetResizable(True)
        area.setFrameShape(QScrollArea.Shape.NoFrame)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(area)

        self.run_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        for w in (self.source, self.mode, self.image_combo, self.labels_combo):
            w.currentIndexChanged.connect(self._validate)
        for e in (self.folder_edit, self.out_edit, self.tprime_edit, self.tprime_syn_edit):
            e.textChanged.connect(self._validate)
        self.n_spin.valueChanged.connect(self._validate)
        self.labels_combo.activated.connect(self._on_labels_activated)
        self.image_combo.currentIndexChanged.connect(lambda _i: (self._auto_labels(), self._validate()))
        ev = self.viewer.layers.events
        self._events = [getattr(ev, name) for name in ("inserted", "removed", "reordered")]
        for e in self._events:
            e.connect(self._refresh_layers)
        self._lifetime = Lifetime(self, self._teardown)
        self._refresh_layers()

    def _teardown(self):
        """The widget or the viewer is going away: stop listening, stop and wait for the export."""
        self._closed = True
        for e in self._events:
            try:
                e.disconnect(self._refresh_layers)
            except Exception:  # noqa: BLE001 - the viewer may be gone already
                pass
        self._stop.set()
        stop_workers([self.worker])

    # ------------------------------------------------------------------ inputs
    def _layers(self, kind: str) -> List:
        """Input candidates: image or labels layers, not the outputs of this plugin's widgets."""
        from napari.layers import Image, Labels
        cls = Image if kind == "image" else Labels
        return [ly for ly in self.viewer.layers if isinstance(ly, cls) and not is_output_layer(ly)]

    def _on_labels_activated(self, _index: int):
        self._labels_touched = True

    def _auto_labels(self):
        """Until the user picks labels, choose a labels layer with the image's shape (or none)."""
        if self._labels_touched:
            return
        img = self._layer(self.image_combo.currentText())
        pick = next((ly.name for ly in self._layers("labels")
                     if img is not None and tuple(ly.data.shape) == tuple(img.data.shape)), NO_LABELS)
        self.labels_combo.blockSignals(True)
        self.labels_combo.setCurrentText(pick)
        self.labels_combo.blockSignals(False)

    def expected_outputs(self) -> Optional[int]:
        """Outputs an export would write now (None for a folder: known once it is read)."""
        return self.n_spin.value() if self.source.currentText() == "Layers" else None

    @if_alive
    def _refresh_layers(self, *_):
        for combo, kind, extra in ((self.image_combo, "image", []), (self.labels_combo, "labels", [NO_LABELS])):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(extra + [ly.name for ly in self._layers(kind)])
            if cur and combo.findText(cur) >= 0:
                combo.setCurrentIndex(combo.findText(cur))
            combo.blockSignals(False)
        self._auto_labels()
        self._validate()

    def _layer(self, name: str):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _validate(self, *_) -> str:
        from ..export import parse_t_prime
        layers = self.source.currentText() == "Layers"
        pairs = MODES[self.mode.currentText()] == "pairs"
        for w in (self.image_combo, self.labels_combo):
            w.setEnabled(layers)
        self.folder_edit.setEnabled(not layers)
        self.tprime_syn_edit.setEnabled(pairs)
        self.tprime_label.setText("T' aug" if pairs else "T'")
        reason = ""
        if layers:
            img = self._layer(self.image_combo.currentText())
            lab = self._layer(self.labels_combo.currentText())
            if img is None:
                reason = "add or pick an image layer"
            elif getattr(img, "rgb", False) or getattr(img, "multiscale", False):
                reason = f"layer {img.name!r} is RGB or multiscale; pick a single-channel image"
            elif img.data.ndim not in (2, 3):
                reason = f"layer {img.name!r} is {img.data.ndim}D; pick a 2D or 3D image"
            elif lab is not None and tuple(lab.data.shape) != tuple(img.data.shape):
                reason = f"labels {lab.name!r} shape {tuple(lab.data.shape)} differs from image {tuple(img.data.shape)}"
        elif not self.folder_edit.text().strip() or not Path(self.folder_edit.text().strip()).exists():
            reason = "choose an existing input folder"
        if not reason and not self.out_edit.text().strip():
            reason = "choose an output folder"
        if not reason:
            try:
                parse_t_prime(self.tprime_edit.text(), self.n_spin.value())
                if pairs:
                    parse_t_prime(self.tprime_syn_edit.text(), self.n_spin.value())
            except ValueError as e:
                reason = str(e)
        self.run_btn.setEnabled(not reason and not self.running)
        if not self.running:
            self.status.setText(reason)
            self._idle_progress()
        return reason

    def _idle_progress(self):
        """Before an export the bar shows what it will write, never a default 0 / 100."""
        n = self.expected_outputs()
        self.progress.setRange(0, max(1, n or 1))
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m outputs" if n else "outputs: counted when the folder is read")

    def _inputs(self):
        from ..export import ArrayInput
        if self.source.currentText() == "Folder":
            return [self.folder_edit.text().strip()]
        from .._writer import affine_for_layer
        img = self._layer(self.image_combo.currentText())
        lab = self._layer(self.labels_combo.currentText())
        data = np.asarray(img.data)
        meta = {"scale": img.scale, "translate": img.translate, "metadata": img.metadata}
        md = img.metadata or {}
        return [ArrayInput(img.name, data.copy(), np.asarray(lab.data).copy() if lab is not None else None,
                           affine_for_layer(meta, data.ndim), md.get("nifti_header"))]

    def options(self):
        from ..export import ExportOptions
        resume, overwrite = EXISTING[self.existing.currentText()]
        sched = self.schedule.currentText()
        return ExportOptions(mode=MODES[self.mode.currentText()], per_image=self.n_spin.value(),
                             t_prime=self.tprime_edit.text().strip(), t_prime_syn=self.tprime_syn_edit.text().strip(),
                             seed=self.seed_spin.value(), schedule=None if sched == "model default" else sched,
                             batch=self.batch_spin.value(), inverse=self.inverse_check.isChecked(),
                             weights=self.weights_edit.text().strip() or None, resume=resume, overwrite=overwrite,
                             fold_guard=self.guard_check.isChecked())

    # ------------------------------------------------------------------ run
    def start(self):
        if self._validate() or self.running:
            return
        from napari.qt.threading import create_worker

        from ..export import iter_export
        inputs, opts, out = self._inputs(), self.options(), self.out_edit.text().strip()
        n_prev = self.preview_spin.value()
        threads = self.threads_spin.value()
        self._stop.clear()
        stop = self._stop

        def job():
            import torch
            torch.set_num_threads(threads)
            try:
                return (yield from iter_export(inputs, out, opts, preview=n_prev, should_stop=stop.is_set))
            except (DRDMError, OSError, ValueError) as e:   # expected: say why in the widget
                return {"status": "error", "error": one_line(e)}

        self.summary = None
        self._t0 = time.perf_counter()
        self.worker = create_worker(job, _start_thread=False)
        self.worker.yielded.connect(self._on_event)
        self.worker.returned.connect(self._on_done)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        n = self.expected_outputs()
        self.progress.setRange(0, n if n else 0)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m outputs")
        self.status.setText("starting...")
        self.worker.start()

    def cancel(self):
        if self.running:
            self._stop.set()
            self.status.setText("cancelling after the current batch...")

    @if_alive
    def _on_event(self, ev):
        self.progress.setRange(0, max(1, ev.total))
        self.progress.setValue(ev.done)
        if ev.kind == "row":
            rate = ev.done / max(1e-9, time.perf_counter() - self._t0)
            eta = (ev.total - ev.done) / rate if rate > 0 else 0
            self.status.setText(f"{ev.row['row_id']} ({ev.done}/{ev.total}, ETA {eta:.0f} s)")
        elif ev.message:
            self.status.setText(ev.message)
        if ev.preview:
            self._add_preview(ev.preview)

    def _add_preview(self, pv: dict):
        scale = tuple(pv["spacing"])
        md = {"drdm_export_preview": pv["row_id"]}
        for key in ("image", "moving", "fixed"):
            if key in pv:
                name = pv["row_id"] if key == "image" else f"{pv['row_id']} {key}"
                self.viewer.add_image(pv[key], name=name, scale=scale, metadata=dict(md))
        for key in ("labels", "moving_labels", "fixed_labels"):
            if key in pv:
                self.viewer.add_labels(np.asarray(pv[key]).astype(np.int32, copy=False),
                                       name=f"{pv['row_id']} {key.replace('_', ' ')}", scale=scale,
                                       metadata=dict(md), opacity=0.5)

    @if_alive
    def _on_done(self, summary):
        self.summary = summary or {}
        s = self.summary
        if s.get("status") == "error":
            self.status.setText(f"export stopped: {s.get('error')}")
            return
        state = "complete" if s.get("complete") else f"{s.get('n_missing', '?')} missing"
        self.status.setText(f"{s.get('status')}: {s.get('written', 0)} written ({s.get('previously_done', 0)} "
                            f"already done), {state}. Manifest: {s.get('manifest')}")

    @if_alive
    def _on_error(self, exc):
        self.summary = {"status": "error", "error": str(exc)}
        self.status.setText(f"export stopped: {exc}")

    def _on_finished(self):
        self.worker = None
        if self._closed:
            return
        self.cancel_btn.setEnabled(False)
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
        msg, bar = self.status.text(), (self.progress.maximum(), self.progress.value())
        self._validate()
        if self.summary is not None:
            self.status.setText(msg)
            self.progress.setRange(0, bar[0])         # keep what the export reached on the bar
            self.progress.setValue(bar[1])
