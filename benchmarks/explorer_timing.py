"""Time the DRDM explorer the way a new user meets it (issue 4's "done when").

Opens napari, a sample (``brain2d`` and/or ``brain3d``), the explorer dock widget, picks the
bundled model of the sample's dimensionality on the CPU, runs T'=45 with the model's default
schedule, and prints for each sample:

* time from Run to the first frame on screen and to the end of the run;
* how responsive the UI stayed: a 50 ms QTimer ticks in the UI thread during the run; the
  longest gap between ticks (and the 99th percentile) is the longest the UI was unresponsive;
* the frames stored, their memory and the budget the widget stated.

Needs a display with OpenGL; headless:

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/explorer_timing.py --json out.json

Timings depend on the machine's load; run it on an otherwise idle machine and quote the command.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time


def _wait(app, cond, timeout, what):
    t0 = time.perf_counter()
    while not cond():
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")


def run_one(viewer, app, sample: str, model: str, t_prime: int, seed: int, threads: int) -> dict:
    from qtpy.QtCore import QTimer

    viewer.open_sample("napari-drdm", sample)
    _dock, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM explorer")
    w.device_combo.setCurrentText("cpu")
    w.model_combo.setCurrentIndex(w.model_combo.findData(model))
    t0 = time.perf_counter()
    _wait(app, lambda: w.model_ready() or bool(w._model_error), 300, "the model")
    load_s = time.perf_counter() - t0
    if not w.model_ready():
        raise RuntimeError(f"model {model!r} did not load: {w.reason}")
    w.threads_spin.setValue(threads)
    w.tprime_spin.setValue(t_prime)
    w.seed_spin.setValue(seed)
    if not w.run_btn.isEnabled():
        raise RuntimeError(f"Run is disabled: {w.reason}")

    ticks = []
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    first_shown = {}

    def frames_on_screen():
        run = w._runs[-1] if w._runs else None
        if run is not None and run.shown > 0 and "t" not in first_shown:
            first_shown["t"] = time.perf_counter()
        return run

    t_run = time.perf_counter()
    w.run()
    _wait(app, lambda: (frames_on_screen() is not None) and not w.running, 3600, "the run")
    t_end = time.perf_counter()
    timer.stop()
    run = w._runs[-1]
    gaps = sorted(b - a for a, b in zip(ticks, ticks[1:]))
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None
    store = run.store
    out = {
        "sample": sample, "model": model, "t_prime": t_prime, "seed": seed, "threads": threads,
        "schedule": w.schedule_combo.currentText(), "k": w.k_spin.value(),
        "model_load_s": round(load_s, 3),
        "first_frame_worker_s": None if run.t_first is None else round(run.t_first, 3),
        "first_frame_on_screen_s": round(first_shown["t"] - t_run, 3) if "t" in first_shown else None,
        "run_s": round(t_end - t_run, 2),
        "frames": store.n,
        "ui_max_gap_s": round(gaps[-1], 3) if gaps else None,
        "ui_p99_gap_s": None if p99 is None else round(p99, 3),
        "ui_ticks": len(ticks),
        "plan": w.plan_label.text(),
        "status": w.status_label.text(),
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="brain2d,brain3d", help="comma-separated sample names")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    models = {"brain2d": "brain2d", "brain3d": "brain3d"}
    results = []
    for sample in [s.strip() for s in args.samples.split(",") if s.strip()]:
        model = models.get(sample, "brain3d" if "3d" in sample else "brain2d")
        viewer = napari.Viewer(show=True, title="napari-drdm explorer timing")   # a fresh one per sample
        app = QApplication.instance()
        r = run_one(viewer, app, sample, model, args.t_prime, args.seed, args.threads)
        viewer.close()
        del viewer
        gc.collect()
        results.append(r)
        print(f"{sample}: model {model}, T'={r['t_prime']} {r['schedule']} K={r['k']}, {r['frames']} frames: "
              f"first frame {r['first_frame_on_screen_s']} s on screen, run {r['run_s']} s, "
              f"UI longest gap {r['ui_max_gap_s']} s (p99 {r['ui_p99_gap_s']} s)\n  {r['plan']}\n  {r['status']}",
              flush=True)
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "napari": napari.__version__, "load_avg_at_end": os.getloadavg(), "results": results}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
