"""Which run the explorer shows: the runs list of the form, and runs added and removed.

:class:`RunChoice` keeps the form's run list in step with the Qt-free state
(:class:`~._controller.ExplorerState`): one run on screen at a time (its layers visible, every
other run's hidden), a finished run removable with its layers, a run forgotten when the user
deletes its frames layer, and the run of the layer the user selects made the current one.
"""
from __future__ import annotations

from typing import Optional

from ._controller import ExplorerState, Run
from ._form import ExplorerForm
from ._input_choice import InputChoice
from ._readout import FrameReadout
from ._run_layers import RunLayers

__all__ = ["RunChoice"]


class RunChoice:
    """The runs row: ``run_combo`` and ``remove_btn``.

    Args:
        viewer: the napari viewer holding the runs' layers.
        state: the runs.
        layers: their layers.
        form: the controls.
        inputs: the chosen input layers (shown again when the last run is removed).
        readout: the frame readout, refreshed when the run shown changes.
    """

    def __init__(self, viewer, state: ExplorerState, layers: RunLayers, form: ExplorerForm,
                 inputs: InputChoice, readout: FrameReadout):
        self.viewer = viewer
        self.state = state
        self.layers = layers
        self.form = form
        self.inputs = inputs
        self.readout = readout
        form.run_combo.activated.connect(lambda i: self.show(form.run_combo.itemData(i)))
        form.remove_btn.clicked.connect(lambda: self.remove())

    def add(self, run: Run, previous: Optional[Run]):
        """A run starts: hide the previous one and list the new one, chosen (not removable while it runs)."""
        f = self.form
        if previous is not None:
            self.layers.set_run_visible(previous, False)     # one run on screen at a time
        f.run_combo.addItem(run.title, run.id)
        f.run_combo.setCurrentIndex(f.run_combo.count() - 1)
        f.remove_btn.setEnabled(False)

    def _choose_item(self, run_id: int):
        idx = self.form.run_combo.findData(run_id)
        if idx >= 0:
            self.form.run_combo.setCurrentIndex(idx)

    def show(self, run_id: Optional[int]):
        """Make ``run_id`` the current run: its layers visible, every other run's hidden."""
        run = self.state.select(run_id)
        if run is None:
            return
        for r in self.state.runs:
            if r is not run:
                self.layers.set_run_visible(r, False)
        self.layers.set_run_visible(run, True)
        self._choose_item(run.id)
        self.form.remove_btn.setEnabled(not run.running)
        self.readout.update()

    def remove(self, run_id: Optional[int] = None):
        """Delete a finished run's layers and frames (default: the current run)."""
        run_id = self.state.current_id if run_id is None else run_id
        run = self.state.remove(run_id)
        if run is None:
            return
        self.layers.remove(run)
        self._drop_item(run.id)

    def _drop_item(self, run_id: int):
        idx = self.form.run_combo.findData(run_id)
        if idx >= 0:
            self.form.run_combo.removeItem(idx)
        if self.state.current is not None:
            self.show(self.state.current_id)
        else:
            for ly in self.inputs.image_layers() + self.inputs.labels_candidates():
                ly.visible = True
            self.form.remove_btn.setEnabled(False)
            self.readout.clear()

    def forget_removed(self):
        """The user deleted a run's frames layer from the layer list: forget that run."""
        for run in list(self.state.runs):
            layer = run.layers.get("frames")
            if not run.running and layer is not None and layer not in self.viewer.layers:
                self.layers.remove(run)
                self.state.remove(run.id)
                self._drop_item(run.id)

    def follow_active_layer(self):
        """The user selected a run's layer: that run becomes the current one."""
        run = self.state.run_of_layer(self.viewer.layers.selection.active)
        if run is not None and run.id != self.state.current_id:
            self.state.select(run.id)
            self._choose_item(run.id)
