"""DRDM dataset export: Algorithm 3 (segmentation sets) and 4 (registration pairs) from napari.

A thin Qt view (qtpy only) over :mod:`napari_drdm.export`, the engine the ``drdm augment`` and
``drdm synthesize-pairs`` commands use: the export runs in a napari thread worker, one event per
written output drives the progress bar, Cancel stops after the current batch (finished outputs
stay valid and the folder can be resumed), and the first few results are added as layers.
Layer inputs are saved to ``OUT/sources/`` first, so every manifest row stays reproducible.

The controls are :class:`~._export_form.ExportForm` (the options a magicgui container); the
chosen layers are checked by :func:`~._inputs.check_export_layers`.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from ..errors import DRDMError, InputError, one_line
from ._export_form import CONTROLS, NO_LABELS, ExportForm
from ._inputs import check_export_layers, is_output_layer
from ._lifetime import Lifetime, if_alive, stop_workers

if TYPE_CHECKING:
    import napari

__all__ = ["ExportWidget"]


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
        from ._worker import default_threads
        self.form = ExportForm(default_threads())
        for name in CONTROLS:                 # the controls are attributes of the dock too (scripts, tests)
            setattr(self, name, getattr(self.form, name))
        area = QScrollArea(self)              # the dock can be shorter than the form (small screens)
        area.setWidget(self.form)
        area.setWidgetResizable(True)
        area.setFrameShape(QScrollArea.Shape.NoFrame)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(area)

        self.run_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.cancel)
        for w in (self.source, self.image_combo, self.labels_combo):
            w.currentIndexChanged.connect(self._validate)
        for e in (self.folder_edit, self.out_edit):
            e.textChanged.connect(self._validate)
        for name in ("mode", "per_image", "t_prime", "t_prime_syn"):
            getattr(self.opts, name).changed.connect(self._validate)
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
        return self.opts.per_image.value if self.source.currentText() == "Layers" else None

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
        o = self.opts
        layers = self.source.currentText() == "Layers"
        pairs = o.mode.value == "pairs"
        for w in (self.image_combo, self.labels_combo):
            w.setEnabled(layers)
        self.folder_edit.setEnabled(not layers)
        o.t_prime_syn.enabled = pairs
        o.t_prime.label = "T' aug" if pairs else "T'"
        reason = ""
        try:
            if layers:
                check_export_layers(self._layer(self.image_combo.currentText()),
                                    self._layer(self.labels_combo.currentText()))
            elif not self.folder_edit.text().strip() or not Path(self.folder_edit.text().strip()).exists():
                raise InputError("choose an existing input folder")
            if not self.out_edit.text().strip():
                raise InputError("choose an output folder")
            parse_t_prime(o.t_prime.value, o.per_image.value)
            if pairs:
                parse_t_prime(o.t_prime_syn.value, o.per_image.value)
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
        """The :class:`~napari_drdm.export.ExportOptions` the form describes."""
        from ..export import ExportOptions
        return ExportOptions(**self.form.option_values())

    # ------------------------------------------------------------------ run
    def start(self):
        if self._validate() or self.running:
            return
        from napari.qt.threading import create_worker

        from ..export import iter_export
        inputs, opts, out = self._inputs(), self.options(), self.out_edit.text().strip()
        n_prev, threads = self.opts.preview.value, self.opts.threads.value
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
