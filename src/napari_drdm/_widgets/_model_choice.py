"""Which model the explorer uses: the model row's choice, loading it off the UI thread, and
following the image's dimensionality until the user picks a model.

:class:`ModelChoice` drives the model row of an :class:`~._form.ExplorerForm` (model list with
"Browse...", S for reference checkpoints, device) and loads the chosen weights in a napari thread
worker (cached, :func:`~._worker.try_load_model`).  It reports every change of its state
(loading, loaded, failed) to one callback; the dock reads :attr:`model` and :meth:`reason` then.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Tuple

from qtpy.QtWidgets import QFileDialog

from ._form import BROWSE, ExplorerForm

__all__ = ["ModelChoice", "REFERENCE_SUFFIXES", "bundled_models"]

REFERENCE_SUFFIXES = (".pth", ".pt")


def bundled_models():
    """The bundled weights the model list offers (``weights.list_weights()``; none if the registry fails)."""
    from ..weights import list_weights
    try:
        return list_weights()
    except Exception:  # noqa: BLE001 - a broken registry must not break the widget
        return []


class ModelChoice:
    """The model row's state machine.

    Args:
        form: the controls (``model_combo``, ``size_spin``, ``device_combo``, ``model_info``).
        on_change: called with ``(model, new_source)`` after every change: ``model`` is the loaded
            model or None (loading, failed, none chosen); ``new_source`` is True when a model
            other than the previous one was loaded (not just the same one on another device).
    """

    def __init__(self, form: ExplorerForm, on_change: Callable[[Any, bool], None]):
        self.form = form
        self._on_change = on_change
        self.model = None
        self.error: Optional[str] = None
        self.loading = False
        self.worker = None
        self.touched = False                 # the user chose a model: stop following the image
        self.closed = False
        self._request = 0
        self._last_index = -1
        self._defaults_from: Optional[tuple] = None
        f = form
        f.model_combo.activated.connect(self._on_activated)
        f.model_combo.currentIndexChanged.connect(lambda _i: self.load())
        f.device_combo.currentIndexChanged.connect(lambda _i: self.load())
        f.size_spin.editingFinished.connect(self.load)

    # ------------------------------------------------------------------ the user's choice
    def _on_activated(self, index: int):
        self.touched = True            # the user chose: stop following the image's dimensionality
        combo = self.form.model_combo
        if combo.itemText(index) == BROWSE:
            path, _ = QFileDialog.getOpenFileName(self.form, "DRDM checkpoint", "",
                                                  "DRDM checkpoints (*.safetensors *.pth *.pt);;All files (*)")
            if path:
                self.set_checkpoint(path)
            else:
                combo.setCurrentIndex(max(0, self._last_index))

    def follow(self, ndim: int):
        """Until the user picks a model, choose the default bundled model for ``ndim`` (2 or 3)."""
        if self.touched:
            return
        from ..weights import default_weights
        try:
            name = default_weights(ndim)
        except (LookupError, ValueError, OSError):
            return
        combo = self.form.model_combo
        idx = combo.findData(name)
        if idx >= 0 and idx != combo.currentIndex():
            combo.setCurrentIndex(idx)

    def set_model(self, name: str):
        """Choose a bundled model by name, as the user would (it no longer follows the image)."""
        idx = self.form.model_combo.findData(name)
        if idx < 0:
            raise ValueError(f"no bundled model {name!r}")
        self.touched = True
        self.form.model_combo.setCurrentIndex(idx)

    def set_checkpoint(self, path: str, size: Optional[int] = None):
        """Add a checkpoint file to the model list and select it (what Browse... does)."""
        self.touched = True
        combo = self.form.model_combo
        path = str(path)
        if size is not None:
            self.form.size_spin.setValue(int(size))
        idx = combo.findData(path)
        if idx < 0:
            combo.insertItem(combo.count() - 1, Path(path).name, path)
            idx = combo.findData(path)
        if combo.currentIndex() == idx:
            self.load()
        else:
            combo.setCurrentIndex(idx)

    def source(self) -> Tuple[Optional[str], Optional[int], str]:
        """(weights name or path, S for a reference checkpoint or None, device)."""
        f = self.form
        src = f.model_combo.currentData()
        is_ref = src is not None and str(src).lower().endswith(REFERENCE_SUFFIXES)
        f.size_spin.setEnabled(bool(is_ref))
        return src, (f.size_spin.value() if is_ref else None), f.device_combo.currentText()

    # ------------------------------------------------------------------ loading
    def load(self):
        """Load the chosen model in a worker; the previous one is dropped at once."""
        if self.closed:
            return
        f = self.form
        if f.model_combo.currentText() != BROWSE:
            self._last_index = f.model_combo.currentIndex()
        src, size, device = self.source()
        self.model = None
        self.error = None
        if src is None:
            self.loading = False
            f.model_info.setText("")
            self._on_change(None, False)
            return
        self._request += 1
        req = self._request
        self.loading = True
        f.model_info.setText(f"loading {Path(str(src)).name} ...")
        self._on_change(None, False)
        from napari.qt.threading import create_worker

        from ._worker import try_load_model
        worker = create_worker(try_load_model, str(src), size, device, _start_thread=False)
        worker.returned.connect(lambda res, req=req: self._on_loaded(req, *res))
        self.worker = worker
        worker.start()

    def _on_loaded(self, req: int, model, error):
        if req != self._request or self.closed:
            return                          # a later choice supersedes this one, or the dock is gone
        try:
            self.form.objectName()
        except RuntimeError:                # the Qt side was deleted while the model loaded
            return
        self.loading = False
        f = self.form
        if error is not None:
            self.model = None
            self.error = (f"Model {Path(str(self.source()[0])).name} on {f.device_combo.currentText()} "
                          f"cannot be used: {error}")
            f.model_info.setText("")
            self._on_change(None, False)
            return
        self.model = model
        src = self.source()[:2]
        new_source = self._defaults_from != src
        self._defaults_from = src
        extra = model.config.loop_extra_for()
        loop = f", its paper loop from T'+{extra}" if extra else ""
        f.model_info.setText(f"{model.name}: {model.ndim}D, S={model.size}, T={model.config.n_steps}{loop}, "
                             f"on {model.device}")
        self._on_change(model, new_source)

    def ready(self) -> bool:
        return self.model is not None and not self.loading

    def reason(self) -> str:
        """Why there is no model to run with ('' when there is one)."""
        if self.model is not None:
            return ""
        if self.loading:
            return "Loading the model ..."
        if self.error:
            return self.error
        return "Choose a model: a bundled one or Browse... for a checkpoint file."
