"""What the recovered field's empty background contributes: every figure before and after
``core/background.extend_into_background`` (the field there replaced by the harmonic extension of
the field around it).

For each model and unseen set of its dimensionality (2D: ``benchmarks/make_eval_sets.py``; 3D: the
kit's held-out brain and CT volumes, as ``benchmarks/weights_table.py``), generation i uses image i and
seed i at T' (as ``drdm evaluate`` and ``benchmarks/weights_table.py``, so the "before" figures are
the weights table's with ``--background-margin off``), the model's default loop; "before" is the
loop's own field whatever margin the model stores, "after" that field extended with ``--margin``.
Printed per model, set and (brain) source volume, mean over the generations: folding (whole grid
and inside the anatomy), maximum displacement (% of the side), the share of the grid replaced, and
the largest change of the deformed image (intensity, images min-max normalised to [0, 1]).

    python benchmarks/background_extension.py --models cmr2d --margin 8 --threads 1 \\
        --json benchmarks/results/background_extension_cmr2d.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "src"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402
from benchmarks.weights_table import SETS_2D, SETS_3D, _models, _sources, add_source_args, save_record  # noqa: E402

KEYS = ("folding_pct", "anatomy_folding_pct", "max_disp_pct", "fg_out_of_view_pct")


def _figures(image, phi):
    """The figures of :data:`KEYS` for one generation, the Jacobian computed once (as evaluate does)."""
    from napari_drdm.core.metrics import anatomy_metrics, field_metrics, foreground_out_of_view_pct, jacobian_determinant
    u, img = phi[0].cpu().numpy(), image[0, 0].cpu().numpy()
    det = jacobian_determinant(u)
    fm, am = field_metrics(u, det=det), anatomy_metrics(img, u, det=det)
    return {"folding_pct": fm["folding_pct"], "anatomy_folding_pct": am["anatomy_folding_pct"],
            "max_disp_pct": fm["max_disp_pct"], "fg_out_of_view_pct": foreground_out_of_view_pct(img, u, det=det)}


def run(models, eval_dir, kit_dir, samples, t_prime, margin, log=print):
    from napari_drdm.commands.evaluate import collect_images
    from napari_drdm.core.background import extend_into_background
    from napari_drdm.core.spatial import warp
    from napari_drdm.model import load_model
    sources = _sources(eval_dir)
    rows = []
    for name, src in models:
        model = load_model(src, device="cpu")
        sets = SETS_2D if model.ndim == 2 else SETS_3D
        base = Path(eval_dir) if model.ndim == 2 else Path(kit_dir)
        for set_name, rel in sets.items():
            path = base / rel
            if not path.exists():
                raise SystemExit(f"{path}: not found; run benchmarks/make_eval_sets.py --kit cache/kit "
                                 f"--out {eval_dir} (2D) or pass --kit (3D)")
            images = collect_images([str(path)], model.ndim)
            for i in range(samples):
                img_name, arr, spacing = images[i % len(images)]
                x = model.prepare(arr, spacing)[1]
                t0 = time.perf_counter()
                # "before": the loop's own field, whatever margin the model stores
                phi, _ = model.generate_model_grid(x, t_prime, seeds=[i], background_margin="off")
                phi = phi.cpu()
                new, free = extend_into_background(phi, x, margin, image_interp=model.config.image_interp)
                interp = model.config.image_interp
                change = float((warp(x, phi, interp, "zeros") - warp(x, new, interp, "zeros")).abs().max())
                rows.append({"model": name, "set": set_name, "image": img_name, "seed": i,
                             "source": Path(sources.get(img_name, set_name)).parts[0],
                             "before": _figures(x, phi), "after": _figures(x, new),
                             "replaced_pct": 100.0 * float(free.float().mean()), "image_change_max": change,
                             "seconds": time.perf_counter() - t0})
                log(f"  {name} {set_name} {i}: folding {rows[-1]['before']['folding_pct']:.2f} -> "
                    f"{rows[-1]['after']['folding_pct']:.2f} %")
    return rows


def table(rows) -> str:
    out = ["| model | set | generations | folding % before -> after | in the anatomy % | max disp % | "
           "foreground out of view % | grid replaced % | image change (max) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["set"]), []).append(r)
        if r["set"] == "brain" and r["source"] != "brain":
            groups.setdefault((r["model"], f"brain: {r['source']}"), []).append(r)
    for (model, group), rs in groups.items():
        def m(when, key, rs=rs):
            return statistics.fmean(r[when][key] for r in rs)
        cells = [f"{m('before', k):.2f} -> {m('after', k):.2f}" if k != "max_disp_pct"
                 else f"{m('before', k):.1f} -> {m('after', k):.1f}" for k in KEYS]
        out.append(f"| {model} | {group} | {len(rs)} | " + " | ".join(cells)
                   + f" | {statistics.fmean(r['replaced_pct'] for r in rs):.0f} | "
                   f"{max(r['image_change_max'] for r in rs):.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_args(ap, ["cmr2d"], "bundled names (default: cmr2d)")
    ap.add_argument("--samples", type=int, default=8, help="generations per set (default 8)")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--margin", type=int, default=8, help="pixels kept around the anatomy (default 8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="save every generation's figures here")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    if a.samples < 1:
        raise SystemExit(f"--samples must be at least 1, got {a.samples}")
    if a.margin < 0:
        raise SystemExit(f"--margin must be >= 0 pixels, got {a.margin}")
    torch.set_num_threads(a.threads)
    rows = run(_models(a.models, a.extra), a.eval_dir, a.kit, a.samples, a.t_prime, a.margin)
    print(table(rows))
    save_record(a.json, {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "t_prime": a.t_prime,
                         "margin": a.margin, "samples": a.samples, "torch": torch.__version__,
                         "machine": platform.machine(),
                         "command": " ".join(["python", "benchmarks/background_extension.py"]
                                             + list(argv if argv is not None else sys.argv[1:])),
                         "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
