"""When a frame is really on screen: a one-shot callback on the viewer canvas's next paint.

Adding a layer only schedules drawing; the explorer times "first frame on screen" from Run to
the paint that follows, which :func:`on_next_paint` reports.
"""
from __future__ import annotations

from typing import Callable, Optional

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import QWidget

__all__ = ["on_next_paint"]


class _PaintWatcher(QObject):
    """Calls ``callback()`` once, when ``canvas`` next paints, then stops watching."""

    def __init__(self, canvas: QWidget, callback: Callable[[], None]):
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


def on_next_paint(widget: QWidget, callback: Callable[[], None]) -> bool:
    """Call ``callback()`` when the canvas of the viewer ``widget`` is docked in next paints.

    Returns whether it will (False: not docked in a viewer, or its canvas is not shown).

    Args:
        widget: a dock widget of the viewer.
        callback: called once, from the UI thread.
    """
    canvas = _canvas_of(widget)
    if canvas is None or not canvas.isVisible():
        return False
    _PaintWatcher(canvas, callback)
    return True
