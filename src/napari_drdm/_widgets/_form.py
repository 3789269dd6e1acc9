"""The explorer's controls: every widget of the dock, laid out, and nothing else.

:class:`ExplorerForm` makes and arranges the controls; it knows no viewer, model or run (the
dock, :mod:`._explorer`, wires them).  The generation options are a magicgui ``Container``
(:meth:`ExplorerForm.generation`, whose values are the generation's keyword arguments); the
input and model rows stay plain Qt widgets because magicgui's layer and file pickers do not
fit them: the layer lists must leave out the explorer's own output layers and follow the
user's choice differently from a programmatic one, and the model list mixes bundled names with
a "Browse..." entry that opens a file dialog and adds the chosen checkpoint to the list.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Union

from magicgui.widgets import CheckBox, ComboBox, Container, PushButton, SpinBox
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
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

from ..core.config import BACKGROUND_OFF, COMPOSE_PADDINGS, DEFAULT_SCHEDULE, KEEP_SIZE_INFLATION, SCHEDULE_NAMES, keep_size_name
from ._layers import DEFAULT_BUDGET_MIB
from ._plot import MetricPlot

__all__ = ["ExplorerForm", "scrolled", "BROWSE", "NO_LABELS", "SCHEDULES", "CONTROLS", "MODEL_DEFAULT",
           "INPUT_PADDINGS", "INPUT_PADDING_TIP", "BACKGROUND_MARGINS", "BACKGROUND_MARGIN_TIP", "background_choices",
           "ANATOMY_FITS", "ANATOMY_FIT_TIP", "anatomy_choices", "KEEP_SIZE_TIP", "keep_size_choices"]

BROWSE = "Browse..."
NO_LABELS = "(none)"
#: the schedule menu: the default first
SCHEDULES = tuple(sorted(SCHEDULE_NAMES, key=lambda name: name != DEFAULT_SCHEDULE))

#: the first entry of the composition and input padding menus (value None: the model's own padding)
MODEL_DEFAULT = "model default"
#: the input padding menu's values after "model default" (pixels; a model takes those below S/2)
INPUT_PADDINGS = (0, 4, 8, 16, 32)
#: the input padding menu's tooltip (the explorer's and the export dock's)
INPUT_PADDING_TIP = ("Pixels of mirrored image around the network's input at every reverse step (the estimate is "
                     "cropped back); 0 = the authors' behaviour. A multiple of 4 below S/2. model default: the "
                     "model's own (the bundled cmr2d: 8).")

#: the background margin menu's values after "model default" ("off", then pixels below S/2)
BACKGROUND_MARGINS = (BACKGROUND_OFF, 0, 2, 4, 8, 16)
#: the background margin menu's tooltip (the explorer's and the export dock's)
BACKGROUND_MARGIN_TIP = ("Pixels kept around the anatomy. Farther out, where the image shows nothing the network "
                         "could recover, the field is replaced by the smooth (harmonic) extension of the field "
                         "around it: fewer folds in empty background, the anatomy unchanged. off = the authors' "
                         "behaviour. model default: the model's own (drdm weights lists it).")


def background_choices():
    """The background margin menu: (text, value) pairs, "model default" (None) first."""
    return [(MODEL_DEFAULT, None), *((str(v), v) for v in BACKGROUND_MARGINS)]


#: the anatomy fit menu's values after "model default" ("off", then pixels below S/2)
ANATOMY_FITS = (BACKGROUND_OFF, 0, 4, 8, 16)
#: the anatomy fit menu's tooltip (the explorer's and the export dock's)
ANATOMY_FIT_TIP = ("Fit the model's view to the anatomy: the network works on a square (cube) around everything "
                   "bright, with this many of its pixels free around it, enlarged at most 2x, so a small anatomy in "
                   "a wide field of view is deformed at its own scale. The field is returned on the whole image. "
                   "off = the whole image, the authors' behaviour. model default: the model's own (drdm weights "
                   "lists it).")


def anatomy_choices():
    """The anatomy fit menu: (text, value) pairs, "model default" (None) first."""
    return [(MODEL_DEFAULT, None), *((str(v), v) for v in ANATOMY_FITS)]


#: the keep-size menu's tooltip (the explorer's and the export dock's)
KEEP_SIZE_TIP = ("Keep the anatomy's size: after the reverse loop the generated deformation's global zoom over the "
                 "anatomy is taken out (one similarity: it folds nothing and leaves the anatomy where the generation "
                 "put it). inflation only = taken out only where the anatomy came out enlarged (an anatomy the "
                 "network shrank is not enlarged back past the image's edges). off = the deformation as generated, the authors' "
                 "behaviour. model default: the model's "
                 "own (drdm weights lists it).")


def keep_size_choices():
    """The keep-size menu: (text, value) pairs, "model default" (None) first."""
    return [(MODEL_DEFAULT, None), ("on", True), ("inflation only", KEEP_SIZE_INFLATION), ("off", False)]


#: the controls, by attribute name (the explorer dock exposes them as its own attributes)
CONTROLS = ("image_combo", "labels_combo", "slice_check", "input_info", "model_combo", "size_spin", "device_combo",
            "threads_spin", "model_info", "tprime_spin", "seed_spin", "new_seed_btn", "schedule_combo",
            "padding_combo", "input_padding_combo", "background_combo", "anatomy_combo", "keep_size_combo", "k_spin", "budget_spin",
            "guard_check", "reason_label", "plan_label", "run_btn", "cancel_btn", "progress", "status_label",
            "run_combo", "remove_btn", "prev_btn", "next_btn", "follow_check", "readout", "plot")


def scrolled(inner: QWidget) -> QScrollArea:
    """``inner`` in a frameless vertical scroll area: the dock can be shorter than its content."""
    area = QScrollArea()
    area.setWidget(inner)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    # never narrower than the content (with the vertical scroll bar): no row is cut at the right edge
    area.setMinimumWidth(inner.minimumSizeHint().width() + area.verticalScrollBar().sizeHint().width())
    return area


def _label(word_wrap: bool = True, style: str = "") -> QLabel:
    lab = QLabel("")
    lab.setWordWrap(word_wrap)
    if style:
        lab.setStyleSheet(style)
    return lab


class ExplorerForm(QWidget):
    """The explorer's controls, top to bottom: input, model, generation, Run/Cancel, progress and
    status, then the runs, the frame buttons, the readout and the metric plot.

    Args:
        models: bundled weights as ``weights.list_weights()`` gives them (name, ndim, size, ...).
        threads: the CPU threads to start with.
        on_pick: called with a frame index when the user clicks on the metric plot.
    """

    def __init__(self, models: List[Dict[str, Any]], threads: int,
                 on_pick: Optional[Callable[[int], None]] = None):
        super().__init__()
        self._on_pick = on_pick
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self._input_box())
        outer.addWidget(self._model_box(models, threads))
        outer.addWidget(self._generation_box())
        self.reason_label = _label(style="color: #e0a040;")
        self.plan_label = _label()
        outer.addWidget(self.reason_label)
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
        self.status_label = _label()
        outer.addWidget(self.status_label)
        outer.addWidget(self._runs_box())
        outer.addStretch(1)

    # ------------------------------------------------------------------ boxes
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
        self.input_info = _label()
        f.addRow("Image", self.image_combo)
        f.addRow("Labels", self.labels_combo)
        f.addRow(self.slice_check)
        f.addRow(self.input_info)
        return box

    def _model_box(self, models: List[Dict[str, Any]], threads: int) -> QGroupBox:
        box = QGroupBox("Model")
        f = QFormLayout(box)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Bundled weights, or Browse... for a checkpoint file (.safetensors "
                                    "from this project, or a reference-implementation .pth state_dict).")
        for e in models:
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
        self.threads_spin.setValue(threads)
        self.threads_spin.setToolTip("CPU threads for generation. Default: torch's when OpenMP threads sleep while "
                                     "waiting (`drdm info`: openmp_wait); else the cores not busy now (load "
                                     "average), keeping one for the viewer on machines with more than two cores.")
        self.model_info = _label()
        f.addRow("Model", self.model_combo)
        f.addRow("S (.pth)", self.size_spin)
        f.addRow("Device", self.device_combo)
        f.addRow("CPU threads", self.threads_spin)
        f.addRow(self.model_info)
        return box

    def _generation_box(self) -> QGroupBox:
        """T', seed, schedule, composition and input padding, K, frame memory and the fold guard, as a
        magicgui container whose values (:meth:`generation`) are the generation's options: a new option
        is one more widget."""
        box = QGroupBox("Generation")
        self.new_seed_btn = PushButton(text="new seed", name="new_seed")
        seed = SpinBox(name="seed", label="Seed", min=0, max=2 ** 31 - 1, value=0)
        self.gen = Container(widgets=[
            SpinBox(name="t_prime", label="T'", min=0, max=80, value=45,
                    tooltip="T': number of forward diffusion steps (0..T); larger = stronger deformation."),
            Container(name="seed_row", label="Seed", layout="horizontal", labels=False,
                      widgets=[seed, self.new_seed_btn]),
            ComboBox(name="schedule", label="Schedule", choices=SCHEDULES, value=DEFAULT_SCHEDULE.value,
                     tooltip="reference: all T reverse steps (the authors' code); "
                             "paper: T' reverse steps (Algorithm 2 as printed)."),
            ComboBox(name="compose_padding", label="Composition padding", value=None,
                     choices=[(MODEL_DEFAULT, None), *((name, name) for name in COMPOSE_PADDINGS)],
                     tooltip="How each reverse step is composed into the field where it samples outside the image: "
                             "border repeats the edge displacement, zeros takes none there (the authors' 2D code). "
                             "model default: the model's own (the bundled cmr2d: border)."),
            ComboBox(name="input_padding", label="Input padding (px)", value=None,
                     choices=[(MODEL_DEFAULT, None), *((str(v), v) for v in INPUT_PADDINGS)],
                     tooltip=INPUT_PADDING_TIP),
            ComboBox(name="background_margin", label="Background margin (px)", value=None,
                     choices=background_choices(), tooltip=BACKGROUND_MARGIN_TIP),
            ComboBox(name="anatomy_fit", label="Anatomy fit (px)", value=None,
                     choices=anatomy_choices(), tooltip=ANATOMY_FIT_TIP),
            ComboBox(name="keep_size", label="Keep anatomy size", value=None,
                     choices=keep_size_choices(), tooltip=KEEP_SIZE_TIP),
            SpinBox(name="k", label="K", min=1, max=10, value=2,
                    tooltip="K: internal recursions of the network per reverse step."),
            SpinBox(name="budget_mib", label="Frame memory (MiB)", min=16, max=1 << 20, step=256,
                    value=DEFAULT_BUDGET_MIB, tooltip="Memory for the stored frames. Over it, frames are stored "
                                                      "compactly (float16) and then only every k-th frame is kept."),
            CheckBox(name="fold_guard", text="fold guard", value=False,
                     tooltip="Make every recovery frame and the result fold-free (det(I + grad phi) > 0 "
                             "everywhere, central and strict checks) by a local correction; the readout "
                             "shows how many pixels folded before it. Off: the model's own fields."),
        ])
        self.gen.seed_row.margins = (0, 0, 0, 0)
        self._seed = seed
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.gen.native)
        # the Qt widgets under the magicgui ones, for code and tests that drive them as a user would
        self.tprime_spin = self.gen.t_prime.native
        self.seed_spin = seed.native
        self.schedule_combo = self.gen.schedule.native
        self.padding_combo = self.gen.compose_padding.native
        self.input_padding_combo = self.gen.input_padding.native
        self.background_combo = self.gen.background_margin.native
        self.anatomy_combo = self.gen.anatomy_fit.native
        self.keep_size_combo = self.gen.keep_size.native
        self.k_spin = self.gen.k.native
        self.budget_spin = self.gen.budget_mib.native
        self.guard_check = self.gen.fold_guard.native
        return box

    def set_model_padding(self, model_padding: Optional[str], input_padding: Optional[int] = None,
                          background_margin: Union[None, int, str] = None,
                          anatomy_fit: Union[None, int, str] = None, keep_size: Optional[bool] = None) -> None:
        """Name the loaded model's own composition padding, input padding, background margin and
        anatomy fit in the menus' first entries ("model default (border)", "model default (8)",
        "model default (off)"); the choices made stay.

        Args:
            model_padding: the loaded model's ``config.compose_padding``, or None (no model).
            input_padding: the loaded model's ``config.input_padding`` (pixels), or None (no model).
            background_margin: the loaded model's ``config.background_margin`` (pixels) or "off"; None:
                no model.
            anatomy_fit: the loaded model's ``config.anatomy_fit`` (pixels) or "off"; None: no model.
            keep_size: the loaded model's ``config.keep_size``; None: no model.
        """
        self.padding_combo.setItemText(0, MODEL_DEFAULT + (f" ({model_padding})" if model_padding else ""))
        self.input_padding_combo.setItemText(0, MODEL_DEFAULT + (f" ({input_padding})" if input_padding is not None
                                                                  else ""))
        self.background_combo.setItemText(0, MODEL_DEFAULT + (f" ({background_margin})" if background_margin is not None
                                                               else ""))
        self.anatomy_combo.setItemText(0, MODEL_DEFAULT + (f" ({anatomy_fit})" if anatomy_fit is not None else ""))
        self.keep_size_combo.setItemText(0, MODEL_DEFAULT + (f" ({keep_size_name(keep_size)})"
                                                              if keep_size is not None else ""))

    def generation(self) -> Dict[str, Any]:
        """t_prime, seed, schedule, compose_padding, input_padding, background_margin, anatomy_fit and
        keep_size (None: the model's), k, budget_mib and fold_guard as set in the form."""
        vals = {w.name: w.value for w in self.gen if w.name != "seed_row"}
        vals["seed"] = self._seed.value
        return vals

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
        self.plot = MetricPlot(on_pick=self._on_pick)
        v.addWidget(self.plot)
        return box
