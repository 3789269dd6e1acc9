"""A small live plot (QPainter, no plotting library): displacement and folding against the frame.

Left axis: max and mean displacement (% of side); right axis: folding (% of pixels), both on the
image grid.  The forward part of the run is shaded, the frame on screen is a vertical line, and
a click (or drag) on the plot asks for that frame.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

__all__ = ["MetricPlot", "SERIES_COLORS"]

SERIES_COLORS = {"max": "#ff8c42", "mean": "#4cc9f0", "folding": "#39ff14"}
_LABELS = {"max": "max |u| %", "mean": "mean |u| %", "folding": "folding %"}


def _nice_top(v: float) -> float:
    """A round axis maximum >= v."""
    if not np.isfinite(v) or v <= 0:
        return 1.0
    e = 10 ** np.floor(np.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * e >= v:
            return float(m * e)
    return float(10 * e)


class MetricPlot(QWidget):
    """Displacement (left axis) and folding (right axis) per frame, with the current frame marked.

    Args:
        on_pick: called with a frame index when the user clicks on the plot.
    """

    def __init__(self, on_pick: Optional[Callable[[int], None]] = None, parent=None):
        super().__init__(parent)
        self.series: Dict[str, np.ndarray] = {}
        self.marker: Optional[int] = None
        self.title = ""
        self._on_pick = on_pick
        self.setMinimumHeight(150)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setToolTip("Displacement (left axis, % of side) and folding (right axis, % of pixels) of the total "
                        "field on the image grid, per frame; shaded: forward; line: the frame on screen. "
                        "Click to go to a frame.")

    def set_data(self, series: Dict[str, np.ndarray], marker: Optional[int], title: str = "") -> None:
        """New curves (from :meth:`Run.series`) and the frame to mark (None: no frame on screen)."""
        self.series = series
        self.marker = marker
        self.title = title
        self.update()

    def clear(self) -> None:
        self.set_data({}, None, "")

    @property
    def n(self) -> int:
        return len(self.series.get("max", ()))

    def _plot_rect(self) -> QRectF:
        return QRectF(34, 16, max(10, self.width() - 34 - 38), max(10, self.height() - 16 - 20))

    def _x(self, r: QRectF, j: float) -> float:
        return r.left() + (j / max(1, self.n - 1)) * r.width()

    def frame_at(self, x: float) -> Optional[int]:
        """The frame under a widget x coordinate."""
        if self.n == 0:
            return None
        r = self._plot_rect()
        return int(np.clip(round((x - r.left()) / max(1.0, r.width()) * max(1, self.n - 1)), 0, self.n - 1))

    def mousePressEvent(self, event):  # noqa: N802 - Qt API
        j = self.frame_at(event.position().x() if hasattr(event, "position") else event.x())
        if j is not None and self._on_pick is not None:
            self._on_pick(j)

    mouseMoveEvent = mousePressEvent

    def paintEvent(self, _event):  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), QColor("#1e1e24"))
        font = QFont(p.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() - 1))
        p.setFont(font)
        r = self._plot_rect()
        fg = QColor("#d0d0d0")
        if self.n == 0:
            p.setPen(fg)
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "displacement and folding per frame\n(after a run)")
            p.end()
            return
        fwd = self.series.get("forward")
        if fwd is not None and fwd.any():
            last_fwd = int(np.nonzero(fwd)[0].max())
            p.fillRect(QRectF(r.left(), r.top(), self._x(r, last_fwd) - r.left(), r.height()), QColor(255, 255, 255, 22))
        p.setPen(QPen(QColor("#808080"), 1))
        p.drawRect(r)
        top_d = _nice_top(float(max(np.max(self.series["max"]), 1e-6)))
        top_f = _nice_top(float(max(np.max(self.series["folding"]), 1e-3)))
        for key, top in (("max", top_d), ("mean", top_d), ("folding", top_f)):
            ys = self.series[key]
            pts = QPolygonF([QPointF(self._x(r, j), r.bottom() - min(1.0, y / top) * r.height())
                             for j, y in enumerate(ys)])
            p.setPen(QPen(QColor(SERIES_COLORS[key]), 1.6))
            p.drawPolyline(pts)
        if self.marker is not None and 0 <= self.marker < self.n:
            x = self._x(r, self.marker)
            p.setPen(QPen(QColor("#ffffff"), 1.2, Qt.PenStyle.DashLine))
            p.drawLine(QPointF(x, r.top()), QPointF(x, r.bottom()))
        p.setPen(fg)
        p.drawText(QRectF(0, r.top() - 2, r.left() - 3, 14), Qt.AlignmentFlag.AlignRight, f"{top_d:g}")
        p.drawText(QRectF(0, r.bottom() - 12, r.left() - 3, 14), Qt.AlignmentFlag.AlignRight, "0")
        p.setPen(QColor(SERIES_COLORS["folding"]))
        p.drawText(QRectF(r.right() + 3, r.top() - 2, 40, 14), Qt.AlignmentFlag.AlignLeft, f"{top_f:g}")
        p.setPen(fg)
        p.drawText(QRectF(r.left(), r.bottom() + 2, r.width(), 16), Qt.AlignmentFlag.AlignCenter,
                   f"frame 0-{self.n - 1}" + (f" (on screen: {self.marker})" if self.marker is not None else ""))
        x = r.left()
        for key in ("max", "mean", "folding"):
            p.setPen(QColor(SERIES_COLORS[key]))
            txt = _LABELS[key]
            p.drawText(QPointF(x, 12), txt)
            x += p.fontMetrics().horizontalAdvance(txt) + 10
        p.end()
