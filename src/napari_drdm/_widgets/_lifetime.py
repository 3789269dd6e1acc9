"""Ending a dock widget's work when the widget or its viewer goes away.

A thread worker that is still running when napari closes emits ``finished`` into a signals
object Python has already deleted, and the process aborts (SIGABRT).  :class:`Lifetime` calls
the widget's teardown once, on whichever comes first: the viewer's window closing, or the
widget being destroyed; :func:`stop_workers` then asks the workers to stop and waits for them.
"""
from __future__ import annotations

import atexit
import functools
import weakref
from typing import Callable, Iterable, List, Tuple

from qtpy.QtCore import QEvent, QObject, QThreadPool, QTimer

__all__ = ["Lifetime", "if_alive", "stop_workers", "Connections"]


def if_alive(method):
    """Skip a callback once the Qt side of the widget is gone (a model load or a run may outlive it)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if getattr(self, "_closed", False):
            return None
        try:
            self.objectName()
        except RuntimeError:
            return None
        return method(self, *args, **kwargs)
    return wrapper


class Connections:
    """Callbacks connected to napari events, all disconnected at once."""

    def __init__(self):
        self._pairs: List[Tuple[object, Callable]] = []

    def connect(self, emitter, callback) -> None:
        emitter.connect(callback)
        self._pairs.append((emitter, callback))

    def disconnect_all(self) -> None:
        for emitter, cb in self._pairs:
            try:
                emitter.disconnect(cb)
            except Exception:  # noqa: BLE001 - the emitter may be gone already
                pass
        self._pairs.clear()


def stop_workers(workers: Iterable, timeout_ms: int = 60000) -> None:
    """Ask thread workers to stop (generators stop after their current step) and wait for them."""
    alive = [w for w in workers if w is not None]
    for w in alive:
        try:
            w.quit()
        except RuntimeError:
            pass
    if alive:
        QThreadPool.globalInstance().waitForDone(int(timeout_ms))


class Lifetime(QObject):
    """Calls ``on_end`` once: when the widget's top-level window (the viewer, once docked) gets a
    Close event, when the widget is destroyed, or at interpreter exit, whichever comes first.

    Args:
        widget: the dock widget.
        on_end: the teardown (disconnect, stop workers).
    """

    _live: "weakref.WeakSet[Lifetime]" = weakref.WeakSet()
    _atexit_registered = False

    def __init__(self, widget, on_end: Callable[[], None]):
        super().__init__()                    # no parent, weak references: never keeps the widget alive
        self._on_end = weakref.WeakMethod(on_end)
        self._done = False
        self._widget = weakref.ref(widget)
        self._window = None
        widget.destroyed.connect(self.end)
        Lifetime._live.add(self)
        if not Lifetime._atexit_registered:
            atexit.register(Lifetime._end_all)
            Lifetime._atexit_registered = True
        QTimer.singleShot(0, self.watch_window)          # napari docks the widget after constructing it

    def watch_window(self) -> None:
        """Watch the widget's current top-level window for Close (call again after re-parenting)."""
        widget = self._widget()
        try:
            win = widget.window() if widget is not None else None
        except RuntimeError:
            return
        if win is not None and win is not widget and win is not self._window:
            self._window = win
            win.installEventFilter(self)

    def eventFilter(self, obj, event):  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Close and obj is self._window:
            self.end()
        return False

    def end(self, *_args) -> None:
        if self._done:
            return
        self._done = True
        if self._window is not None:
            try:
                self._window.removeEventFilter(self)
            except RuntimeError:
                pass
            self._window = None
        on_end = self._on_end()
        if on_end is not None:
            on_end()

    @classmethod
    def _end_all(cls) -> None:
        for lt in list(cls._live):
            try:
                lt.end()
            except RuntimeError:
                pass
