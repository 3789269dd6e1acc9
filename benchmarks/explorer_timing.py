"""Time the DRDM explorer and the export widget the way a new user meets them (issues 4 and 16).

For each sample (``brain2d`` and/or ``brain3d``): opens napari (a shown window), the sample, the
explorer dock, picks the bundled default model of the sample's dimensionality on the CPU, runs T' with the
model's default schedule, and prints:

* time from Run to the frames layer added to the viewer and to the canvas's next paint after it
  (the first frame on screen), next to the worker's first step;
* how responsive the UI stayed: a 50 ms QTimer ticks in the UI thread during the run; the
  longest gap between ticks (and the 99th percentile) is the longest the UI was unresponsive;
* the frames stored, their memory and the budget the widget stated;
* with ``--export N``: seconds per output of the export dock (N outputs of the sample at
  ``--export-t-prime``, same model, threads and schedule; timed from Export to its last event)
  next to ``drdm augment`` on the same image (the sample saved as NIfTI, run as a subprocess,
  timed around the command: includes Python start-up and model loading, reported separately
  from a 1-output run so that per-output time = (t(N) - t(1)) / (N - 1)).

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402


def _wait(app, cond, timeout, what):
    t0 = time.perf_counter()
    while not cond():
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")


def _r(x, nd=3):
    return None if x is None else round(float(x), nd)


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
    t_run = time.perf_counter()
    w.run()
    _wait(app, lambda: not w.running, 3600, "the run")
    t_end = time.perf_counter()
    timer.stop()
    run = w.state.current
    gaps = sorted(b - a for a, b in zip(ticks, ticks[1:]))
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else None
    store = run.store
    out = {
        "sample": sample, "model": model, "t_prime": t_prime, "seed": seed, "threads": threads,
        "schedule": w.schedule_combo.currentText(), "k": w.k_spin.value(),
        "model_load_s": round(load_s, 3),
        "first_step_worker_s": _r(run.t_first_step),
        "first_frames_layer_s": _r(run.t_first_layer),
        "first_frame_on_screen_s": _r(run.t_first_drawn),
        "run_s": round(t_end - t_run, 2),
        "frames": store.n,
        "ui_max_gap_s": round(gaps[-1], 3) if gaps else None,
        "ui_p99_gap_s": None if p99 is None else round(p99, 3),
        "ui_ticks": len(ticks),
        "plan": w.plan_label.text(),
        "status": w.status_label.text(),
    }
    return out


def export_one(viewer, app, sample: str, model: str, n: int, t_prime: int, threads: int, workdir: str) -> dict:
    """Seconds per output of the export dock and of ``drdm augment`` on the same image."""
    import subprocess
    from pathlib import Path

    import numpy as np

    from napari_drdm._sample_data import load_sample
    from napari_drdm.io import write_nifti

    _dock, w = viewer.window.add_plugin_dock_widget("napari-drdm", "DRDM dataset export")
    w.image_combo.setCurrentIndex(0)
    w.weights_edit.setText(model)
    w.n_spin.setValue(n)
    w.tprime_edit.setText(str(t_prime))
    w.threads_spin.setValue(threads)
    w.preview_spin.setValue(0)
    w.out_edit.setText(str(Path(workdir) / f"widget_{sample}"))
    if not w.run_btn.isEnabled():
        raise RuntimeError(f"Export is disabled: {w.status.text()}")
    t0 = time.perf_counter()
    w.start()
    _wait(app, lambda: not w.running, 3600, "the export")
    widget_s = time.perf_counter() - t0
    if (w.summary or {}).get("status") != "complete":
        raise RuntimeError(f"export did not complete: {w.summary}")

    s = load_sample(sample)
    src = Path(workdir) / f"{sample}.nii.gz"
    write_nifti(src, np.asarray(s["image"]), np.asarray(s["affine"]), overwrite=True)
    cli = {}
    for k in (1, n):
        out = Path(workdir) / f"cli_{sample}_{k}"
        cmd = [sys.executable, "-m", "napari_drdm.cli", "augment", str(src), str(out), "-n", str(k),
               "--t-prime", str(t_prime), "--weights", model, "--threads", str(threads), "--device", "cpu",
               "--no-progress"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cli[k] = time.perf_counter() - t0
    per_cli = (cli[n] - cli[1]) / (n - 1) if n > 1 else cli[1]
    return {"sample": sample, "model": model, "outputs": n, "t_prime": t_prime, "threads": threads,
            "widget_total_s": round(widget_s, 2), "widget_s_per_output": round(widget_s / n, 2),
            "cli_total_s": {str(k): round(v, 2) for k, v in cli.items()},
            "cli_s_per_output": round(per_cli, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="brain2d,brain3d", help="comma-separated sample names")
    ap.add_argument("--model-2d", default=None, help="model for 2D samples (default: the bundled 2D default)")
    ap.add_argument("--model-3d", default=None, help="model for 3D samples (default: the bundled 3D default)")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="default: the explorer's default")
    ap.add_argument("--export", type=int, default=0, help="also time N outputs of the export dock and drdm augment")
    ap.add_argument("--export-t-prime", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results here")
    add_force_arg(ap)
    args = ap.parse_args(argv)
    check_outputs(ap, args.force, args.json)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_drdm._widgets._worker import default_threads
    if args.threads is None:
        args.threads = default_threads()
    from napari_drdm.weights import default_weights
    results = []
    for sample in [s.strip() for s in args.samples.split(",") if s.strip()]:
        # the model a new user gets: the default of the sample's dimensionality, unless --model-2d/3d
        ndim = 3 if "3d" in sample else 2
        model = (args.model_3d if ndim == 3 else args.model_2d) or default_weights(ndim)
        viewer = napari.Viewer(show=True, title="napari-drdm explorer timing")   # a fresh one per sample
        app = QApplication.instance()
        r = run_one(viewer, app, sample, model, args.t_prime, args.seed, args.threads)
        if args.export:
            import tempfile
            with tempfile.TemporaryDirectory() as tmp:
                r["export"] = export_one(viewer, app, sample, model, args.export, args.export_t_prime,
                                         args.threads, tmp)
            e = r["export"]
            print(f"{sample}: export dock {e['widget_s_per_output']} s/output, drdm augment "
                  f"{e['cli_s_per_output']} s/output ({e['outputs']} outputs, T'={e['t_prime']}, "
                  f"{e['threads']} threads)", flush=True)
        viewer.close()
        del viewer
        gc.collect()
        results.append(r)
        print(f"{sample}: model {model}, T'={r['t_prime']} {r['schedule']} K={r['k']}, {r['frames']} frames: "
              f"Run -> frames layer {r['first_frames_layer_s']} s, -> painted {r['first_frame_on_screen_s']} s "
              f"(worker's first step {r['first_step_worker_s']} s), run {r['run_s']} s, "
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
