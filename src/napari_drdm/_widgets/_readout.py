"""What the explorer says about the frame on screen: which frame of which run is drawn, the
readout text and the metric plot, and the frame buttons that move the slider.

:class:`FrameReadout` asks the layers (:class:`~._run_layers.RunLayers`) where the viewer's slider
is in the current run's frames layer and lets the Qt-free state (:class:`~._controller.ExplorerState`)
decide whether that frame is drawn and what to say about it.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ._controller import ExplorerState, Run
from ._form import ExplorerForm
from ._run_layers import RunLayers

__all__ = ["FrameReadout"]


class FrameReadout:
    """The readout label, the plot and the ◀ ▶ buttons of the form.

    Args:
        state: the runs.
        layers: their layers.
        form: the controls (``readout``, ``plot``, ``follow_check``, ``prev_btn``, ``next_btn``).
    """

    def __init__(self, state: ExplorerState, layers: RunLayers, form: ExplorerForm):
        self.state = state
        self.layers = layers
        self.form = form
        form.prev_btn.clicked.connect(lambda: self.step(-1))
        form.next_btn.clicked.connect(lambda: self.step(+1))

    def frame_on_screen(self, run: Run) -> Tuple[Optional[int], str]:
        """(frame index, '') when a frame of ``run`` is drawn, else (None, why not)."""
        layer = self.layers.frames_layer(run)
        return self.state.frame_on_screen(run, self.layers.data_position(run),
                                          bool(layer is not None and layer.visible))

    def _take_over(self, run: Run):
        if run.running:
            self.form.follow_check.setChecked(False)   # the user takes over the slider

    def step(self, delta: int):
        """Move the frame slider by ``delta`` frames (the ◀ ▶ buttons)."""
        run = self.state.current
        if run is None:
            return
        j, _why = self.frame_on_screen(run)
        self._take_over(run)
        self.layers.set_frame(run, (j if j is not None else 0) + delta)

    def set_frame(self, j: int):
        """Show frame ``j`` (0-based) of the current run."""
        run = self.state.current
        if run is not None:
            self._take_over(run)
            self.layers.set_frame(run, j)

    def metrics(self) -> Optional[dict]:
        """The metrics of the frame on screen, None when no frame of the current run is drawn."""
        run = self.state.current
        if run is None:
            return None
        j, _ = self.frame_on_screen(run)
        return None if j is None else run.store.metrics[j]

    def update(self):
        """Describe the frame on screen (or why none of the current run is drawn) and mark it on the plot."""
        run = self.state.current
        if run is None:
            return
        j, why = self.frame_on_screen(run)
        self.form.readout.setText(self.state.readout(run, j, why))
        self.form.plot.set_data(run.series(), j, run.title)

    def clear(self):
        self.form.readout.setText("no run yet")
        self.form.plot.clear()
