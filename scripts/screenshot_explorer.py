"""Screenshot of the DRDM explorer after a run on the 2D brain sample (docs/screenshot_explorer.png).

Needs a display with OpenGL; on a headless machine run it under Xvfb:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_explorer.py

Model: the plugin's default bundled 2D model (``napari_drdm.weights.default_weights(2)``, since
session 24 ``general2d``), or another bundled one with ``--weights NAME``; ``--checkpoint PATH`` uses a checkpoint
file instead.  Without ``--checkpoint``, when no bundled 2D model is installed, the reference
checkpoint ``../shared/reference/upstream_cmr2d.pth`` (S=256) is used if present; otherwise (and
for a ``--checkpoint`` that does not exist) a randomly initialised tiny model (only to show the
interface).  The run uses the model's own default loop (its T, schedule and K) unless
``--schedule`` names one.  The model used is printed and written, with the run's settings and
result, next to the PNG as ``<png>.txt``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REF = ROOT.parent / "shared" / "reference" / "upstream_cmr2d.pth"


def _pick_model(args):
    """(bundled, source, size, description): a bundled model's name, or a checkpoint file (a random model's)."""
    from napari_drdm.weights import WeightsNotFoundError, default_weights, resolve_weights
    if args.checkpoint is None:
        try:
            default = default_weights(2)
        except WeightsNotFoundError:
            default = None
        name = args.weights or default
        if name is not None:
            _path, name = resolve_weights(name)      # an alias -> its bundled name; unknown: an error
            tag = " (the default 2D model)" if name == default else ""
            return True, name, None, f"bundled {name} weights{tag}"
    ck = Path(args.checkpoint) if args.checkpoint else DEFAULT_REF
    if ck.exists():
        size = args.size if ck.suffix in (".pth", ".pt") else None
        return False, str(ck), size, f"checkpoint {ck.name}" + (f" (S={size})" if size else "")
    import tempfile

    from napari_drdm.checkpoint import write_checkpoint
    from napari_drdm.core.config import DRDMConfig
    from napari_drdm.core.network import DRDMNet
    path = Path(tempfile.mkdtemp()) / "random2d.safetensors"
    write_checkpoint(path, DRDMNet(2).state_dict(), DRDMConfig.default(2, size=64), {"note": "random"})
    return False, str(path), None, "a randomly initialised model (S=64): interface only"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshot_explorer.png"))
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--weights", default=None, metavar="NAME",
                       help="a bundled 2D model (name or alias; default: the plugin's default 2D model)")
    which.add_argument("--checkpoint", default=None, metavar="PATH", help="a checkpoint file instead")
    ap.add_argument("--size", type=int, default=256, help="S for a reference .pth checkpoint")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--schedule", default="model", choices=["model", "reference", "paper"],
                    help="the reverse loop; 'model' (default) keeps the model's own")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--keep-size", default="model", choices=["model", "on", "off"],
                    help="the explorer's Keep anatomy size menu (default: the model's own)")
    ap.add_argument("--frame", default="folds",
                    help="'folds' (the last frame with folding >= --min-folding %%), 'last', 'last-forward' "
                         "or a frame number (0-based)")
    ap.add_argument("--min-folding", type=float, default=0.2)
    ap.add_argument("--dock-width", type=int, default=440,
                    help="the explorer dock's width in pixels (wide enough for its menus and a shorter readout)")
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-drdm: DRDM explorer")
    viewer.window.resize(1600, 1000)
    viewer.open_sample("napari-drdm", "brain2d")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM explorer")
    app = QApplication.instance()

    def wait(cond, timeout):
        t0 = time.time()
        while not cond():
            app.processEvents()
            time.sleep(0.01)
            if time.time() - t0 > timeout:
                raise TimeoutError("timed out")

    bundled, source, size, what = _pick_model(args)
    print(f"model: {what}")
    if bundled:
        widget.set_model(source)
    else:
        widget.set_checkpoint(source, size=size)
    wait(lambda: widget.model_ready() or bool(widget._model_error), 120)
    if not widget.model_ready():
        print(widget.reason, file=sys.stderr)
        return 1
    widget.tprime_spin.setValue(args.t_prime)
    widget.seed_spin.setValue(args.seed)
    if args.schedule != "model":
        widget.schedule_combo.setCurrentText(args.schedule)
    if args.keep_size != "model":
        widget.keep_size_combo.setCurrentText(args.keep_size)
    if not widget.run_btn.isEnabled():
        print(f"cannot run: {widget.reason}", file=sys.stderr)
        return 1
    t0 = time.time()
    widget.run()
    wait(lambda: not widget.running, 1200)
    print(f"run: {time.time() - t0:.1f} s; {widget.status_label.text()}")
    run = widget.state.current
    folding = [m["folding_pct"] for m in run.store.metrics]
    if args.frame == "last":
        j = run.store.n - 1
    elif args.frame == "folds":        # the last frame still folded enough to see the folds
        j = max([i for i, f in enumerate(folding) if f >= args.min_folding] or [run.store.n - 1])
    elif args.frame == "last-forward":
        j = max(i for i, m in enumerate(run.store.metrics) if m["phase"] == "forward")
    else:
        j = int(args.frame)
    widget.set_frame(j)
    viewer.layers.selection.active = run.layers["frames"]
    viewer.reset_view()
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtWidgets import QGroupBox, QScrollArea
    viewer.window._qt_window.resizeDocks([dock], [args.dock_width], Qt.Horizontal)
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    for area in widget.findChildren(QScrollArea):   # the readout and the plot are at the dock's bottom
        area.ensureWidgetVisible(widget.plot, 0, 0)
        app.processEvents()
        # then down to the nearest section or model row (as far as the scroll range allows: the top row uncut)
        bar, inner = area.verticalScrollBar(), area.widget()
        tops = [w.mapTo(inner, QPoint(0, 0)).y() for w in inner.findChildren(QGroupBox)]
        tops += [w.mapTo(inner, QPoint(0, 0)).y() - 1 for w in (widget.model_combo, widget.size_spin,
                 widget.device_combo, widget.threads_spin, widget.model_info)]
        below = [t for t in tops if t >= bar.value()]
        if below:
            bar.setValue(min(below))
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.window.screenshot(str(out), canvas_only=False)
    out.with_suffix(".png.txt").write_text(
        f"DRDM explorer screenshot: 2D brain sample, T'={args.t_prime}, seed {args.seed}, "
        f"schedule {widget.schedule_combo.currentText()}, frame {j} of 0-{run.store.n - 1}\n"
        f"model: {what}\n{widget.status_label.text()}\n")
    print(f"wrote {out}")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
