"""The fold guard (issue 13) measured on unseen images: folding, displacement, inverse residual, time.

For each model and T', every selected image is generated once without the guard and once with it
(same seed; see ``napari_drdm.fold_report``): 2D on the held-out sets of
``benchmarks/make_eval_sets.py`` (cardiac, brain, CT slices), 3D on the kit's val/test volumes
(ITK KmeansTest head, brainbrowser head, lung1 CT), resampled to the model grid.  Prints one
summary line per (model, T', method) and writes everything to JSON.

    PYTHONPATH=src python benchmarks/fold_guard.py --eval cache/eval --kit cache/kit \\
        --json benchmarks/results/fold_guard.json

``--save-fields DIR`` keeps each unguarded final field (with the reverse loop's time) and
``--fields DIR`` reuses them for the "final" method instead of running the loop again, so the
guard alone can be re-measured on the same fields in seconds (3D loops take minutes).

Timing: the ratio with/without the guard is taken inside one run, generation by generation
("final": the guard's own time over the loop's time; other methods: a second loop, interleaved).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from napari_drdm import load_model
from napari_drdm.fold_report import compare_guard, guard_rows, summarise_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

SETS_2D = ("cardiac", "brain", "ct")
VOLUMES_3D = ("itk_kmeans_head/itk_kmeans_t1.nii.gz", "brainbrowser_head/brainbrowser_structural1.nii.gz",
              "lung1/lung1_ct.nii.gz")


def _images_2d(eval_dir: Path, per_set: int, sets=SETS_2D):
    out = []
    for name in sets:
        imgs = np.load(eval_dir / f"unseen2d_{name}.npz")["images"]
        pick = np.linspace(0, len(imgs) - 1, per_set).round().astype(int) if per_set < len(imgs) else range(len(imgs))
        out += [(f"{name}[{i}]", imgs[i], None) for i in pick]
    return out


def _volumes_3d(kit: Path, n: int):
    import nibabel as nib
    out = []
    for rel in VOLUMES_3D[:n]:
        im = nib.load(str(kit / rel))
        a = np.asanyarray(im.dataobj).astype(np.float32)
        while a.ndim > 3:
            a = a[..., 0]
        out.append((rel, a, tuple(float(z) for z in im.header.get_zooms()[:3])))
    return out


def _line(tag, s):
    off, on = s["off"], s["on"]
    return (f"{tag}: n={s['n']}  folding % off {off['folding_pct_mean']:.3f} "
            f"(strict {off['strict_folding_pct_mean']:.3f}, "
            f"any fold in {100 * off['share_with_any_strict_fold']:.0f} %) -> on {on['folding_pct_mean']:.3f} "
            f"(strict {on['strict_folding_pct_mean']:.3f}, "
            f"any fold in {100 * on['share_with_any_strict_fold']:.0f} %)  "
            f"mean disp {off['mean_disp_pct_mean']:.3f} -> {on['mean_disp_pct_mean']:.3f} % "
            f"(paired {s['mean_disp_change_pct']:+.2f} %, worst {s['max_abs_mean_disp_change_pct']:.2f} %)  "
            f"max disp {off['max_disp_pct_mean']:.2f} -> {on['max_disp_pct_mean']:.2f} %  "
            f"inverse residual {off['inverse_residual_mean_px']:.4f} -> {on['inverse_residual_mean_px']:.4f} px "
            f"(max {off['inverse_residual_max_px_mean']:.3f} -> {on['inverse_residual_max_px_mean']:.3f})  "
            f"time {off['seconds_per_generation']:.2f} -> {on['seconds_per_generation']:.2f} s "
            f"(x{s['time_ratio']:.3f})")


def frame_timing(model, image, t_prime: int, schedule: str, repeats: int) -> dict:
    """Explorer-like runs (every frame rendered) with the guard off and on, interleaved: seconds per
    recovery frame, and the share of recovery frames shown fold-free.

    Args:
        model: a loaded DRDM; image: one 2D image; t_prime, schedule: the loop; repeats: off/on pairs.
    """
    from napari_drdm.core.metrics import folding_pct, strict_folding_pct
    per = {False: [], True: []}
    clean = []
    for _ in range(repeats):
        for guard in (False, True):
            t_last, times = time.perf_counter(), []
            for fr in model.iter_generate(image, None, t_prime=t_prime, seed=0, schedule=schedule,
                                          frames=True, render=True, fold_guard=guard):
                now = time.perf_counter()
                if fr.phase == "recovery":
                    times.append(now - t_last)
                    if guard:
                        clean.append(folding_pct(fr.ddf) == 0 and strict_folding_pct(fr.ddf) == 0)
                t_last = time.perf_counter()      # the checks above are not counted
            per[guard].append(float(np.mean(times)))
    off, on = float(np.median(per[False])), float(np.median(per[True]))
    return {"t_prime": t_prime, "schedule": schedule, "repeats": repeats, "seconds_per_recovery_frame_off": off,
            "seconds_per_recovery_frame_on": on, "ratio": on / off, "runs_off": per[False], "runs_on": per[True],
            "share_of_recovery_frames_fold_free": float(np.mean(clean))}


def table(paths) -> str:
    """Markdown rows (README) from result files of this script.

    Args:
        paths: JSON files written with --json.
    """
    out = ["| model | T' | method | n | folding % off -> on (strict) | generations with any fold off -> on "
           "(central / strict) | mean disp % off -> on (paired change, worst) | max disp % | inverse residual "
           "mean px | time / generation | ratio |", "|" + " --- |" * 11]
    for p in paths:
        for r in json.loads(Path(p).read_text()).get("runs", []):
            s, off, on = r["summary"], r["summary"]["off"], r["summary"]["on"]
            out.append(
                f"| {r['model']} ({r['ndim']}D, S={r['size']}) | {r['t_prime']} | {r['method']} | {s['n']} | "
                f"{off['folding_pct_mean']:.3f} ({off['strict_folding_pct_mean']:.3f}) -> {on['folding_pct_mean']:.3f} "
                f"({on['strict_folding_pct_mean']:.3f}) | {100 * off['share_with_any_fold']:.0f} / "
                f"{100 * off['share_with_any_strict_fold']:.0f} % -> {100 * on['share_with_any_fold']:.0f} / "
                f"{100 * on['share_with_any_strict_fold']:.0f} % | {off['mean_disp_pct_mean']:.3f} -> "
                f"{on['mean_disp_pct_mean']:.3f} ({s['mean_disp_change_pct']:+.2f} %, "
                f"{s['max_abs_mean_disp_change_pct']:.2f} %) | "
                f"{off['max_disp_pct_mean']:.2f} -> {on['max_disp_pct_mean']:.2f} | "
                f"{off['inverse_residual_mean_px']:.3f} -> "
                f"{on['inverse_residual_mean_px']:.3f} | {off['seconds_per_generation']:.1f} -> "
                f"{on['seconds_per_generation']:.1f} s | x{s['time_ratio']:.3f} |")
    return "\n".join(out)


def _field_file(folder, name: str, tag: str, t_prime: int, seed: int) -> Path:
    def safe(text):
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
    return Path(folder) / f"{safe(Path(name).name)}_t{t_prime}_s{seed}_{safe(tag)}.pt"


def _final_or_compare(a, model, name, tag, x, t_prime, seed, method) -> dict:
    """One generation's row; with --fields / --save-fields the unguarded final field is loaded / kept."""
    if method != "final" or not (a.fields or a.save_fields):
        return compare_guard(model, x, t_prime, [seed], method=method)[0]
    src = _field_file(a.fields, name, tag, t_prime, seed) if a.fields else None
    if src is not None and src.is_file():
        saved = torch.load(src, weights_only=True)
        phi, seconds = saved["phi"], float(saved["seconds"])
    else:
        t0 = time.perf_counter()
        phi, _ = model.generate_model_grid(x, t_prime, [seed])
        seconds = time.perf_counter() - t0
    if a.save_fields:
        dst = _field_file(a.save_fields, name, tag, t_prime, seed)
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"phi": phi.detach().cpu(), "seconds": seconds}, dst)
    return guard_rows(phi, model.size, [seed], seconds)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval", default="cache/eval", help="folder of make_eval_sets.py (unseen2d_*.npz)")
    ap.add_argument("--kit", default="cache/kit", help="data kit folder (3D volumes)")
    ap.add_argument("--models", default="cmr2d,brain2d,brain3d")
    ap.add_argument("--t-prime", default="30,45,70", help="2D T' values")
    ap.add_argument("--t-prime-3d", default="45", help="3D T' values")
    ap.add_argument("--per-set", type=int, default=1, help="2D images per set (cardiac, brain, CT)")
    ap.add_argument("--sets", default=",".join(SETS_2D), help="2D sets to use")
    ap.add_argument("--volumes", type=int, default=2, help="3D volumes (of %d)" % len(VOLUMES_3D))
    ap.add_argument("--methods", default="final", help="guard methods to compare with no guard, e.g. final,step")
    ap.add_argument("--other-methods-at", default="45",
                    help="T' values at which methods other than 'final' run (they need a second reverse loop)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--save-fields", default=None, metavar="DIR",
                    help="keep each unguarded final field here (one .pt file per model, T', image and seed)")
    ap.add_argument("--fields", default=None, metavar="DIR",
                    help="method 'final': reuse the fields of --save-fields found here instead of generating")
    ap.add_argument("--frames", action="store_true",
                    help="instead: explorer-like frame timing (first model, first image, first 2D T', paper loop)")
    ap.add_argument("--repeats", type=int, default=2, help="--frames: interleaved off/on runs")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON",
                    help="instead: print the README table of these result files")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    if not a.table:
        check_outputs(ap, a.force, a.json)
    if a.table:
        print(table(a.table))
        return 0
    torch.set_num_threads(a.threads)
    methods = [m for m in a.methods.split(",") if m]
    other_at = {int(v) for v in a.other_methods_at.split(",") if v}
    results = {"command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "torch": torch.__version__, "threads": a.threads, "machine": platform.processor() or platform.machine(),
               "runs": []}
    if a.frames:
        name = a.models.split(",")[0]
        model = load_model(name, device="cpu")
        tag, img, _ = _images_2d(Path(a.eval), 1, [s for s in a.sets.split(",") if s][:1])[0]
        r = frame_timing(model, img, int(a.t_prime.split(",")[0]), "paper", a.repeats)
        results["frames"] = dict(r, model=name, image=tag)
        print(f"{name} {tag} T'={r['t_prime']} paper loop, every frame rendered: "
              f"{r['seconds_per_recovery_frame_off']:.3f} "
              f"-> {r['seconds_per_recovery_frame_on']:.3f} s per recovery frame (x{r['ratio']:.2f}); recovery frames "
              f"fold-free with the guard: {100 * r['share_of_recovery_frames_fold_free']:.0f} %")
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
        return 0
    for name in [m for m in a.models.split(",") if m]:
        model = load_model(name, device="cpu")
        if model.ndim == 2:
            images = _images_2d(Path(a.eval), a.per_set, [s for s in a.sets.split(",") if s])
            tps = [int(v) for v in a.t_prime.split(",")]
        else:
            images, tps = _volumes_3d(Path(a.kit), a.volumes), [int(v) for v in a.t_prime_3d.split(",")]
        prepared = [(tag, model.prepare(img, sp)[1]) for tag, img, sp in images]
        for tp in tps:
            for method in methods:
                if method != "final" and tp not in other_at:
                    continue
                rows = []
                for i, (tag, x) in enumerate(prepared):
                    row = _final_or_compare(a, model, name, tag, x, tp, a.seed + i, method)
                    row["image"] = tag
                    rows.append(row)
                    print(f"  {name} T'={tp} {method} {tag}: folding {row['off']['folding_pct']:.3f} -> "
                          f"{row['on']['folding_pct']:.3f} %, strict {row['off']['strict_folding_pct']:.3f} -> "
                          f"{row['on']['strict_folding_pct']:.3f} %, {row['seconds_off']:.1f} -> "
                          f"{row['seconds_on']:.1f} s", flush=True)
                s = summarise_rows(rows)
                print(_line(f"{name} (S={model.size}) T'={tp} {method}", s), flush=True)
                results["runs"].append({"model": name, "size": model.size, "ndim": model.ndim, "t_prime": tp,
                                        "method": method, "schedule": model.config.schedule, "summary": s,
                                        "rows": rows})
                if a.json:
                    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
