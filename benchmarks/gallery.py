"""What a model does to the unseen evaluation images, as a picture: the held-out gallery.

The weights table (benchmarks/weights_table.py) says how much a model folds and how far it moves;
this draws the same generations so that one can see whether a deformation is plausible.  For
every model and every unseen set of its dimensionality it runs ``drdm evaluate``'s generations
(generation ``i`` on image ``i mod n`` with seed ``i``, the model's own reverse loop and inference
settings unless overridden, so a panel is the same generation as the table's row with that image
and seed) and draws, per generation, three panels: the input, the deformed image (folded pixels in
red) and the displacement magnitude in % of the side with the field's arrows and the input's
foreground outline.  3D generations are drawn on the middle plane across the last axis (the
held-out volumes' axial plane; the field's two in-plane components).

    python benchmarks/gallery.py --models cmr2d --t-prime 45 --generations 0 2 5 7 --threads 1 \\
        --out docs/gallery_cmr2d_t45.png --json benchmarks/results/gallery_cmr2d_t45.json

One PNG per model (``--out`` names the first; with several models each gets its name appended);
the JSON lists every panel's image, seed and figures.  Needs matplotlib.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*
from weights_table import SETS_2D, SETS_3D, _models, add_source_args, save_record  # noqa: E402

from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402


def _middle(a: np.ndarray, nd: int) -> np.ndarray:
    """A 2D array: ``a`` itself in 2D, its middle plane across the last spatial axis in 3D (the
    axial plane of the held-out volumes); extra trailing axes of ``a`` (field components) kept."""
    if nd == 2:
        return a
    k = a.shape[2]
    return a[:, :, k // 2]


def generations(model, images, t_prime, indices, **options):
    """Generations ``indices`` of :func:`napari_drdm.commands.evaluate.evaluate` (generation ``i``:
    image ``i mod n``, seed ``i``), each run alone; per generation, the input on the model grid, the
    deformed image, the field (pixels), its folded pixels and the figures."""
    from napari_drdm.commands.evaluate import evaluate
    from napari_drdm.core.metrics import jacobian_determinant
    from napari_drdm.core.spatial import warp

    out, fields = [], []

    def keep(tp, phi, seeds, secs):
        fields.append(np.asarray(phi[0]))

    for i in indices:
        image = images[i % len(images)]
        res = evaluate(model, [image], [t_prime], 1, seed_offset=i, on_batch=keep, **options)
        gen, u = res[0]["generations"][0], fields[-1]
        x = model.prepare(image[1], image[2])[1].float().cpu()
        moved = warp(x, torch.from_numpy(np.ascontiguousarray(u))[None].float(), mode="linear")[0, 0].numpy()
        out.append({"figures": gen, "input": x[0, 0].numpy(), "deformed": moved, "field": u,
                    "folded": jacobian_determinant(u) <= 0})
    return out


def draw(model_name, rows, t_prime, size, path, per_row: int = 2) -> None:
    """One figure: three panels per generation, ``per_row`` generations to a row, each set on rows
    of its own."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = []                                            # (figure row, column, set name, generation)
    for set_name, gens in rows:
        first = (placed[-1][0] + 1) if placed else 0
        placed += [(first + j // per_row, j % per_row, set_name, g) for j, g in enumerate(gens)]
    nrows, ncols = placed[-1][0] + 1, 3 * per_row
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, j, set_name, g in placed:
        u, nd = g["field"], g["field"].shape[0]
        img, moved = _middle(g["input"], nd), _middle(g["deformed"], nd)
        folded = _middle(g["folded"], nd)
        comp = _middle(np.moveaxis(u, 0, -1), nd)[..., -2:]            # the two in-plane components
        mag = 100.0 * np.sqrt(np.sum(comp ** 2, -1)) / size
        f = g["figures"]
        a0, a1, a2 = axes[r, 3 * j], axes[r, 3 * j + 1], axes[r, 3 * j + 2]
        a0.imshow(img, cmap="gray", vmin=0, vmax=1)
        a0.set_title(f"{set_name}: {Path(str(f['image'])).name}\nseed {f['seed']}", fontsize=7)
        a1.imshow(moved, cmap="gray", vmin=0, vmax=1)
        if folded.any():
            a1.imshow(np.ma.masked_where(~folded, folded), cmap="autumn", alpha=0.9, interpolation="nearest")
        a1.set_title(f"deformed, T' = {t_prime}\nfolding {f['folding_pct']:.2f} %", fontsize=7)
        im = a2.imshow(mag, cmap="viridis", vmin=0, vmax=max(20.0, float(mag.max())))
        a2.contour(img > 0.08, [0.5], colors="w", linewidths=0.4)
        h, w = mag.shape
        step = max(1, h // 10)
        yy, xx = np.mgrid[0:h:step, 0:w:step]
        a2.quiver(xx, yy, comp[::step, ::step, 1], comp[::step, ::step, 0], color="r", angles="xy",
                  scale_units="xy", scale=1, width=0.006)
        a2.set_title(f"|u| % of side (max {f['max_disp_pct']:.1f})\nzoom {f.get('affine_zoom', float('nan')):.3f}",
                     fontsize=7)
        fig.colorbar(im, ax=a2, fraction=0.046, pad=0.02).ax.tick_params(labelsize=5)
    fig.suptitle(f"{model_name}: unseen images, T' = {t_prime} (input | deformed, folds red | displacement)",
                 fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    import io

    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    buf.seek(0)
    with Image.open(buf) as im:                  # 256 colours: a quarter of the size, no visible change
        im.convert("RGB").quantize(256).save(path, optimize=True)


def _out_path(out: str, name: str, several: bool) -> Path:
    p = Path(out)
    return p.with_name(f"{p.stem}_{name}{p.suffix}") if several else p


def main(argv=None) -> int:
    from napari_drdm.validate import arg_type, check_keep_size_option

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap)
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--generations", type=int, nargs="+", default=[0, 1, 2, 3], metavar="I",
                    help="which of the table's generations to draw per set (image I mod n, seed I; default 0-3)")
    ap.add_argument("--per-row", type=int, default=2, help="generations drawn side by side (default 2)")
    ap.add_argument("--sets", nargs="*", default=None, help="which sets (default: every set of the model's kind)")
    ap.add_argument("--input-padding", type=int, default=None, metavar="PX", help="default: each model's own")
    ap.add_argument("--background-margin", default=None, metavar="PX|off", help="default: each model's own")
    ap.add_argument("--anatomy-fit", default=None, metavar="PX|off", help="default: each model's own")
    ap.add_argument("--keep-size", default=None, metavar="on|inflation|off", type=arg_type(check_keep_size_option, "--keep-size"),
                    help="default: each model's own")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="the PNG (one per model: the model's name is appended)")
    ap.add_argument("--json", default=None, help="save every panel's figures here")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    if a.per_row < 1:
        raise SystemExit(f"--per-row must be at least 1, got {a.per_row}")
    if min(a.generations) < 0:
        raise SystemExit(f"--generations must be 0 or more, got {min(a.generations)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    np.seterr(all="ignore")
    from napari_drdm.commands.evaluate import collect_images
    from napari_drdm.model import load_model

    models = _models(a.models, a.extra)
    check_outputs(ap, a.force, a.json, *(_out_path(a.out, name, len(models) > 1) for name, _ in models))
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "t_prime": a.t_prime, "generations": a.generations,
              "command": " ".join(["python"] + sys.argv), "models": []}
    for name, src in models:
        model = load_model(src)
        sets = SETS_2D if model.ndim == 2 else SETS_3D
        base = Path(a.eval_dir) if model.ndim == 2 else Path(a.kit)
        rows, panels = [], []
        for set_name, rel in sets.items():
            if a.sets and set_name not in a.sets:
                continue
            path = base / rel
            if not path.exists():
                print(f"skip {name} on {set_name}: {path} not found (benchmarks/make_eval_sets.py / the kit)",
                      file=sys.stderr)
                continue
            t0 = time.perf_counter()
            gens = generations(model, collect_images([str(path)], model.ndim), a.t_prime, a.generations,
                               input_padding=a.input_padding, background_margin=a.background_margin,
                               anatomy_fit=a.anatomy_fit, keep_size=a.keep_size)
            print(f"{name} on {set_name}: {len(gens)} generations, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            rows.append((set_name, gens))
            panels += [dict(g["figures"], set=set_name) for g in gens]
        if not rows:
            continue
        out = _out_path(a.out, name, len(models) > 1)
        draw(name, rows, a.t_prime, model.size, out, per_row=a.per_row)
        record["models"].append({"model": name, "source": str(src), "sha256": model.sha256, "png": str(out),
                                 "panels": panels})
        for p in panels:
            print(f"{name} {p['set']:8s} {Path(str(p['image'])).name:28s} seed {p['seed']}: "
                  f"folding {p['folding_pct']:.2f} %, max disp {p['max_disp_pct']:.1f} %, "
                  f"zoom {p['affine_zoom']:.3f}")
        print(f"wrote {out}")
    save_record(a.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
