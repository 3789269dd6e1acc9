"""The export dock's controls: every widget of it, laid out, and nothing else.

:class:`ExportForm` makes and arranges the controls; it knows no viewer and starts nothing (the
dock, :mod:`._export`, wires them).  The export's options are a magicgui ``Container``
(:attr:`ExportForm.opts`) whose values are :class:`~napari_drdm.export.ExportOptions`' keyword
arguments (:meth:`ExportForm.option_values`) and the dock's own settings (existing outputs, CPU
threads, preview layers).  The input, weights and output folder rows stay plain Qt because
magicgui's layer lists cannot leave out this plugin's own output layers, and its file field turns
an empty entry into the current folder '.', where empty means "not chosen yet" or "the bundled
default model".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional

from magicgui.widgets import CheckBox, ComboBox, Container, LineEdit, SpinBox
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..core.config import COMPOSE_PADDINGS, SCHEDULE_NAMES
from ._form import (
    ANATOMY_FIT_TIP,
    BACKGROUND_MARGIN_TIP,
    INPUT_PADDING_TIP,
    INPUT_PADDINGS,
    KEEP_SIZE_TIP,
    MODEL_DEFAULT,
    anatomy_choices,
    background_choices,
    keep_size_choices,
)

__all__ = ["ExportForm", "CONTROLS", "MODES", "NO_LABELS", "OPTION_NAMES", "WEIGHT_FILES"]

NO_LABELS = "(none)"
MODES = {"Segmentation set (Algorithm 3)": "augment", "Registration pairs (Algorithm 4)": "pairs"}
EXISTING = {"refuse if not empty": "refuse", "resume": "resume", "overwrite": "overwrite"}
#: the options in :attr:`ExportForm.opts` that are ExportOptions fields, under the same names
OPTION_NAMES = ("mode", "per_image", "t_prime", "t_prime_syn", "seed", "schedule", "compose_padding", "input_padding",
                "background_margin", "anatomy_fit", "keep_size", "batch", "inverse", "fold_guard")
WEIGHT_FILES = "DRDM checkpoints (*.safetensors *.pth *.pt);;All files (*)"

#: the controls, by attribute name (the export dock exposes them as its own attributes)
CONTROLS = ("source", "image_combo", "labels_combo", "folder_edit", "weights_edit", "out_edit", "opts", "mode",
            "n_spin", "tprime_edit", "tprime_syn_edit", "seed_spin", "schedule", "padding", "input_padding",
            "background_margin", "anatomy_fit", "keep_size", "batch_spin", "threads_spin",
            "inverse_check", "guard_check", "existing", "preview_spin", "run_btn", "cancel_btn", "progress",
            "status")


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


class ExportForm(QWidget):
    """The export's controls, top to bottom: data (input, weights, output folder), the options,
    Export/Cancel, the progress bar and the status line.

    Args:
        threads: the CPU threads to start with.
    """

    def __init__(self, threads: int):
        super().__init__()
        outer = QVBoxLayout(self)
        outer.addWidget(self._data_box())
        outer.addWidget(self._options_box(threads))
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

    def _data_box(self) -> QGroupBox:
        """Where the images come from, the weights and the output folder (plain Qt rows)."""
        box = QGroupBox("Data", self)
        form = QFormLayout(box)
        self.source = QComboBox(box)
        self.source.addItems(["Layers", "Folder"])
        form.addRow("Input", self.source)
        self.image_combo = QComboBox(box)
        form.addRow("Image layer", self.image_combo)
        self.labels_combo = QComboBox(box)
        form.addRow("Labels layer", self.labels_combo)
        self.folder_edit = QLineEdit(box)
        self.folder_edit.setPlaceholderText("images (+ case_label.* / images/ + labels/)")
        form.addRow("Input folder", _browse_row(self.folder_edit, box, "Input folder"))
        self.weights_edit = QLineEdit(box)
        self.weights_edit.setPlaceholderText("auto: bundled model of the image's dimension")
        self.weights_edit.setToolTip("A bundled model's name (see drdm weights) or a checkpoint file; "
                                     "empty: the bundled default for the image's dimensionality.")
        form.addRow("Weights", _browse_row(self.weights_edit, box, "DRDM checkpoint", WEIGHT_FILES))
        self.out_edit = QLineEdit(box)
        form.addRow("Output folder", _browse_row(self.out_edit, box, "Output folder"))
        return box

    def _options_box(self, threads: int) -> QGroupBox:
        """The options as a magicgui container: a new export option is one more widget."""
        box = QGroupBox("Export", self)
        self.opts = Container(widgets=[
            ComboBox(name="mode", label="Export", choices=list(MODES.items())),
            SpinBox(name="per_image", label="Outputs per image", min=1, max=100000, value=4),
            LineEdit(name="t_prime", label="T'", value="reference",
                     tooltip="45 | 40,45,50 | 40:52:2 (stop included) | reference (48, 50, 50, 52, ...)"),
            LineEdit(name="t_prime_syn", label="T' syn", value="45"),
            SpinBox(name="seed", label="Seed", min=0, max=2 ** 31 - 1, value=0),
            ComboBox(name="schedule", label="Reverse loop",
                     choices=[("model default", None), *((name, name) for name in SCHEDULE_NAMES)]),
            ComboBox(name="compose_padding", label="Composition padding",
                     choices=[("model default", None), *((name, name) for name in COMPOSE_PADDINGS)],
                     tooltip="How each reverse step is composed into the field where it samples outside the "
                             "image: border repeats the edge displacement, zeros takes none there (the authors' "
                             "2D code). model default: the model's own (the bundled cmr2d: border)."),
            ComboBox(name="input_padding", label="Input padding (px)", value=None,
                     choices=[(MODEL_DEFAULT, None), *((str(v), v) for v in INPUT_PADDINGS)],
                     tooltip=INPUT_PADDING_TIP),
            ComboBox(name="background_margin", label="Background margin (px)", value=None,
                     choices=background_choices(), tooltip=BACKGROUND_MARGIN_TIP),
            ComboBox(name="anatomy_fit", label="Anatomy fit (px)", value=None,
                     choices=anatomy_choices(), tooltip=ANATOMY_FIT_TIP),
            ComboBox(name="keep_size", label="Keep anatomy size", value=None,
                     choices=keep_size_choices(), tooltip=KEEP_SIZE_TIP),
            SpinBox(name="batch", label="Batch", min=1, max=256, value=4),
            SpinBox(name="threads", label="CPU threads", min=1, max=max(1, os.cpu_count() or 1), value=threads,
                    tooltip="CPU threads for generation (the explorer's default: the cores not busy now)."),
            CheckBox(name="inverse", text="also write the inverse field", value=False),
            CheckBox(name="fold_guard", text="fold guard: every written field fold-free", value=True,
                     tooltip="det(I + grad phi) > 0 at every pixel/voxel of each written field (central and "
                             "strict Jacobian checks), by a local correction around the folds; "
                             "README 'Fold-free deformations'"),
            ComboBox(name="existing", label="Existing outputs", choices=list(EXISTING.items())),
            SpinBox(name="preview", label="Preview layers", min=0, max=32, value=3),
        ])
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.opts.native)
        # the Qt widgets under the magicgui ones, for code and tests that drive them as a user would
        o = self.opts
        self.mode, self.n_spin, self.tprime_edit = o.mode.native, o.per_image.native, o.t_prime.native
        self.tprime_syn_edit, self.seed_spin, self.schedule = o.t_prime_syn.native, o.seed.native, o.schedule.native
        self.padding, self.input_padding = o.compose_padding.native, o.input_padding.native
        self.background_margin, self.anatomy_fit = o.background_margin.native, o.anatomy_fit.native
        self.keep_size = o.keep_size.native
        self.batch_spin, self.threads_spin, self.inverse_check = o.batch.native, o.threads.native, o.inverse.native
        self.guard_check, self.existing, self.preview_spin = o.fold_guard.native, o.existing.native, o.preview.native
        return box

    def option_values(self) -> Dict[str, Any]:
        """The :class:`~napari_drdm.export.ExportOptions` keyword arguments the form sets."""
        kw = {name: getattr(self.opts, name).value for name in OPTION_NAMES}
        kw["t_prime"], kw["t_prime_syn"] = kw["t_prime"].strip(), kw["t_prime_syn"].strip()
        existing = self.opts.existing.value
        kw["weights"] = self.weights_edit.text().strip() or None
        kw["resume"], kw["overwrite"] = existing == "resume", existing == "overwrite"
        return kw
