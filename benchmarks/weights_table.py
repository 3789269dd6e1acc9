"""The README's weights tables: every bundled model on the unseen evaluation sets.

For each model of the registry (plus any ``--extra NAME=PATH`` checkpoint, e.g. a run's export
before it is bundled) and each unseen set of its dimensionality, ``drdm evaluate``'s statistics
(mean +- SD over generations, the model's default reverse loop) at each T': recovered and forward
folding, the share of the forward folding removed, maximum and mean displacement (% of the side),
and the plausibility figures (share of the field explained by one global affine map, its zoom and
rotation, the non-affine residual, foreground pushed out of view), the folding and maximum
displacement inside the anatomy (the pixels that show the foreground after warping; the whole-grid
figures also count the empty background), and the seconds per generation.  A last table splits
each set's figures by the source volume of the images behind them (the brain set mixes slices of
two heads; records saved before evaluate kept its generations have no split).

    python benchmarks/make_eval_sets.py --kit cache/kit --out cache/eval     # once
    python benchmarks/weights_table.py --t-prime 30 45 70 --samples 8 \\
        --json benchmarks/results/weights_table.json

2D sets: ``cache/eval/unseen2d_{brain,ct,cardiac}.npz`` (make_eval_sets.py).  3D sets: the kit's
held-out volumes (ITK KmeansTest head, test split; lung1 CT, test split).  The table is printed
as Markdown; the JSON holds every figure it was printed from.  ``--from-json FILE`` reprints a
saved table without computing anything.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402

SETS_2D = {"brain": "unseen2d_brain.npz", "ct": "unseen2d_ct.npz", "cardiac": "unseen2d_cardiac.npz"}
SETS_3D = {"brain": "itk_kmeans_head/itk_kmeans_t1.nii.gz", "ct": "lung1/lung1_ct.nii.gz"}


def _models(names, extra):
    from napari_drdm.weights import registry
    out = [(n, n) for n in (names if names is not None else list(registry()))]   # `--models` alone: none
    for item in extra or []:
        if "=" not in item:
            raise SystemExit(f"--extra expects NAME=PATH, got {item!r}")
        name, path = item.split("=", 1)
        out.append((name, path))
    return out


def add_source_args(ap, default_models=None, help_models="bundled names (default: every bundled model)"):
    """The options that say which weights a benchmark measures and where its held-out images are:
    ``--models``, ``--extra NAME=PATH``, ``--eval-dir`` (2D sets), ``--kit`` (3D volumes)."""
    ap.add_argument("--models", nargs="*", default=default_models, help=help_models)
    ap.add_argument("--extra", nargs="*", default=[], metavar="NAME=PATH", help="checkpoints not (yet) bundled")
    ap.add_argument("--eval-dir", default="cache/eval", help="2D sets from benchmarks/make_eval_sets.py")
    ap.add_argument("--kit", default="cache/kit", help="the data kit (3D held-out volumes)")


def save_record(path, rec) -> None:
    """Write a benchmark's JSON record (``--json``), creating its folder."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rec, indent=1))


def run_table(models, eval_dir, kit_dir, t_primes, samples, batch=1, device="cpu", log=print, input_padding=None,
              background_margin=None, anatomy_fit=None, keep_size=None, schedule=None):
    """Evaluate every model on every unseen set of its dimensionality; returns the JSON record."""
    from napari_drdm.commands.evaluate import collect_images, evaluate
    from napari_drdm.model import load_model, resolve_anatomy_fit, resolve_background_margin, resolve_keep_size
    rows = []
    for name, src in models:
        model = load_model(src, device=device)
        sets = SETS_2D if model.ndim == 2 else SETS_3D
        base = Path(eval_dir) if model.ndim == 2 else Path(kit_dir)
        for set_name, rel in sets.items():
            path = base / rel
            if not path.exists():
                log(f"  skip {name} on {set_name}: {path} not found (run benchmarks/make_eval_sets.py / the kit)")
                continue
            images = collect_images([str(path)], model.ndim)
            t0 = time.perf_counter()
            res = evaluate(model, images, t_primes, samples, schedule=schedule, batch=batch, input_padding=input_padding,
                           background_margin=background_margin, anatomy_fit=anatomy_fit, keep_size=keep_size)
            log(f"  {name} on {set_name}: {len(images)} images, {time.perf_counter() - t0:.0f} s")
            rows.append({"model": name, "source": str(src), "ndim": model.ndim, "size": model.size,
                         "sha256": model.sha256, "set": set_name, "set_file": str(path),
                         "input_padding": model.config.input_padding if input_padding is None else input_padding,
                         "background_margin": resolve_background_margin(background_margin, model.config),
                         "anatomy_fit": resolve_anatomy_fit(anatomy_fit, model.config),
                         "keep_size": resolve_keep_size(keep_size, model.config),
                         "schedule": str(schedule or model.config.schedule),
                         "loop_extra": model.config.loop_extra_for(schedule),
                         "n_images": len(images), "results": res})
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "t_primes": list(t_primes), "samples": samples,
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "device": device},
            "command": " ".join(["python"] + sys.argv), "rows": rows}


def _sources(eval_dir) -> dict:
    """Image name -> its source volume for the 2D sets (``unseen2d.json`` of make_eval_sets.py)."""
    path = Path(eval_dir) / "unseen2d.json"
    if not path.is_file():
        return {}
    out = {}
    for set_name, rel in SETS_2D.items():
        for i, (src, _) in enumerate(json.loads(path.read_text()).get(set_name, {}).get("slices", [])):
            out[f"{Path(eval_dir) / rel}[{i}]"] = src
    return out


def by_source(record, sources=None) -> str:
    """Markdown: the T' rows split by the source volume of each generation's image (records written
    since evaluate keeps its generations), so that a set's mean can be traced to what it mixes."""
    lines = ["| model | set | T' | source | generations | folding % | max disp % | zoom | "
             "folding in the anatomy % | max disp in the anatomy % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    sources = sources or {}
    for row in record["rows"]:
        for r in row["results"]:
            groups = {}
            for g in r.get("generations") or []:
                src = sources.get(g["image"], Path(g["image"].split("[")[0]).name)
                groups.setdefault(src, []).append(g)
            if len(groups) < 2:
                continue
            for src, gs in sorted(groups.items()):
                mean = {k: float(np.mean([g[k] for g in gs])) for k in gs[0] if k not in ("image", "seed")}
                lines.append(f"| {row['model']} | {row['set']} | {r['t_prime']} | {src} | {len(gs)} | "
                             f"{mean['folding_pct']:.2f} | {mean['max_disp_pct']:.1f} | {mean['affine_zoom']:.3f} | "
                             f"{mean['anatomy_folding_pct']:.2f} | {mean['anatomy_max_disp_pct']:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _pm(s, digits=2):
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def markdown(record) -> str:
    """Markdown tables: Table-1 figures, plausibility, then (records that have them) folding and
    maximum displacement inside the anatomy."""
    head1 = ("| model | set | T' | folding % | forward folding % | removed % | max disp % | mean disp % | s/gen |\n"
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    head2 = ("| model | set | T' | affine share % | zoom | rotation ° | non-affine max % | non-affine mean % "
             "| foreground out of view % |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    head3 = ("| model | set | T' | folding in the anatomy % | folding, whole grid % | max disp in the anatomy % "
             "| max disp, whole grid % | anatomy share of the grid % |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    l1, l2, l3 = [head1], [head2], [head3]
    for row in record["rows"]:
        pad = f", input padding {row['input_padding']}" if row.get("input_padding") else ""
        pad += f", background margin {row['background_margin']}" if row.get("background_margin") is not None else ""
        pad += f", anatomy fit {row['anatomy_fit']}" if row.get("anatomy_fit") is not None else ""
        keep = row.get("keep_size")
        pad += (", size kept where enlarged" if keep == "inflation" else ", size kept") if keep else ""
        loop = row.get("schedule")
        if loop and loop != "reference":
            extra = row.get("loop_extra") or row.get("loop_extra_steps")   # the latter: records before session 25
            pad += f", {loop} loop" + (f" from T'+{extra}" if extra else "")
        tag = f"{row['model']} ({row['ndim']}D, S={row['size']}{pad})"
        for r in row["results"]:
            fwd = r["forward"]["folding_pct"]["mean"]
            removed = 100.0 * (1.0 - r["folding_pct"]["mean"] / fwd) if fwd > 0 else float("nan")
            l1.append(f"| {tag} | {row['set']} | {r['t_prime']} | {_pm(r['folding_pct'])} | "
                      f"{_pm(r['forward']['folding_pct'])} | {removed:.0f} | {_pm(r['max_disp_pct'], 1)} | "
                      f"{_pm(r['mean_disp_pct'], 1)} | {r['seconds_per_image']:.1f} |")
            p = r.get("plausibility")
            if p:
                l2.append(f"| {tag} | {row['set']} | {r['t_prime']} | {_pm(p['affine_share_pct'], 0)} | "
                          f"{_pm(p['affine_zoom'], 3)} | {_pm(p['affine_rotation_deg'], 1)} | "
                          f"{_pm(p['affine_residual_max_pct'], 1)} | {_pm(p['affine_residual_mean_pct'], 1)} | "
                          f"{_pm(p['fg_out_of_view_pct'], 2)} |")
            if p and "anatomy_folding_pct" in p:
                l3.append(f"| {tag} | {row['set']} | {r['t_prime']} | {_pm(p['anatomy_folding_pct'])} | "
                          f"{_pm(r['folding_pct'])} | {_pm(p['anatomy_max_disp_pct'], 1)} | "
                          f"{_pm(r['max_disp_pct'], 1)} | {_pm(p['anatomy_share_pct'], 0)} |")
    out = "\n".join(l1) + "\n\n" + "\n".join(l2)
    return out + ("\n\n" + "\n".join(l3) if len(l3) > 1 else "")


def main(argv=None) -> int:
    from napari_drdm.core.config import SCHEDULE_NAMES
    from napari_drdm.validate import arg_type, check_keep_size_option
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap)
    ap.add_argument("--t-prime", type=int, nargs="+", default=[30, 45, 70])
    ap.add_argument("--samples", type=int, default=8, help="generations per set and T' (default 8)")
    ap.add_argument("--input-padding", type=int, default=None, metavar="PX",
                    help="pixels of mirrored image around the network's input (default: each model's own)")
    ap.add_argument("--background-margin", default=None, metavar="PX|off",
                    help="pixels kept around the anatomy before the field is extended, or off "
                         "(default: each model's own)")
    ap.add_argument("--anatomy-fit", default=None, metavar="PX|off",
                    help="fit the model's view to the anatomy with this margin (pixels of the view), or off "
                         "(default: each model's own)")
    ap.add_argument("--keep-size", default=None, metavar="on|inflation|off", type=arg_type(check_keep_size_option, "--keep-size"),
                    help="take the generated field's global zoom over the anatomy out, or not "
                         "(default: each model's own)")
    ap.add_argument("--schedule", default=None, choices=SCHEDULE_NAMES,
                    help="the reverse loop (default: each model's own)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="save the record here")
    ap.add_argument("--from-json", default=None, help="print the tables of a saved record and exit")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    if not a.from_json:
        check_outputs(ap, a.force, a.json)
    if a.from_json:
        rec = json.loads(Path(a.from_json).read_text())
        split = by_source(rec, _sources(a.eval_dir))
        print(markdown(rec) + ("\n\n" + split if split else ""))
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    np.seterr(all="ignore")
    rec = run_table(_models(a.models, a.extra), a.eval_dir, a.kit, a.t_prime, a.samples, a.batch, a.device,
                    log=lambda m: print(m, file=sys.stderr, flush=True), input_padding=a.input_padding,
                    background_margin=a.background_margin, anatomy_fit=a.anatomy_fit, keep_size=a.keep_size,
                    schedule=a.schedule)
    save_record(a.json, rec)
    split = by_source(rec, _sources(a.eval_dir))
    print(markdown(rec) + ("\n\n" + split if split else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
