"""Screenshot of the DRDM explorer after a run on the 2D brain sample (docs/screenshot_explorer.png).

Needs a display with OpenGL; on a headless machine run it under Xvfb:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_explorer.py

Model: the bundled ``brain2d`` weights when installed; otherwise ``--checkpoint`` (default: the
reference checkpoint ``../shared/reference/upstream_cmr2d.pth`` with S=256 if present); otherwise a
randomly initialised tiny model (only to show the interface).  The model used is printed and
written next to the PNG as ``<png>.txt``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REF = ROOT.parent / "shared" / "reference" / "upstream_cmr2d.pth"


def _pick_model(args):
    from napari_drdm.weights import list_weights
    names = [e["name"] for e in list_weights()]
    if args.checkpoint is None and "brain2d" in names:
        return "brain2d", None, "bundled brain2d weights"
    ck = Path(args.checkpoint) if args.checkpoint else DEFAULT_REF
    if ck.exists():
        size = args.size if ck.suffix in (".pth", ".pt") else None
        return str(ck), size, f"checkpoint {ck.name}" + (f" (S={size})" if size else "")
    import tempfile

    from napari_drdm.checkpoint import write_checkpoint
    from napari_drdm.core.config import DRDMConfig
    from napari_drdm.core.network import DRDMNet
    path = Path(tempfile.mkdtemp()) / "random2d.safetensors"
    write_checkpoint(path, DRDMNet(2).state_dict(), DRDMConfig.default(2, size=64), {"note": "random"})
    return str(path), None, "a randomly initialised model (S=64): interface only"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshot_explorer.png"))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--size", type=int, default=256, help="S for a reference .pth checkpoint")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--schedule", default="paper", choices=["paper", "reference", "model"],
                    help="'model' keeps the model's own default")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--frame", default="folds",
                    help="'folds' (the last frame with folding >= --min-folding %%), 'last', 'last-forward' "
                         "or a frame number (0-based)")
    ap.add_argument("--min-folding", type=float, default=0.2)
    args = ap.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True, title="napari-drdm: DRDM explorer")
    viewer.window.resize(1600, 1000)
    viewer.open_sample("napari-drdm", "brain2d")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM explorer")
    app = QApplication.instance()

    def wait(cond, timeout):
        t0 = time.time()
        while not cond():
            app.processEvents()
            time.sleep(0.01)
            if time.time() - t0 > timeout:
                raise TimeoutError("timed out")

    source, size, what = _pick_model(args)
    print(f"model: {what}")
    if source == "brain2d":
        widget.set_model("brain2d")
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
    from qtpy.QtWidgets import QScrollArea
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    for area in widget.findChildren(QScrollArea):   # the readout and the plot are at the dock's bottom
        area.ensureWidgetVisible(widget.plot, 0, 0)
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
