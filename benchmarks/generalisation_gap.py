"""Does a run's model fold less on the images it was trained on than on held-out ones?

A model that recovers its training images far better than the held-out ones has memorised them
(more images or stronger augmentation would help); one that does as badly on both is still
under-fitting (more steps, a better learning rate or a larger network would).  This script runs
``drdm evaluate``'s statistics (the model's default reverse loop, mean +- SD over generations,
generation ``i`` on image ``i mod n`` with seed ``i``) on some training images and on the
validation images of a run's prepared file (``python -m training prepare``), and prints both.

    python benchmarks/generalisation_gap.py --weights cache/variants/general3d_s2540_ema.safetensors \\
        --prepared cache/prepared/brain3d_s64.npz --train-images 0 2 4 6 --samples 4 --threads 1 \\
        --json benchmarks/results/generalisation_gap_general3d_s2540.json

The prepared file stores the images on the model grid already (uint8); they are read as they are.
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


def _split(data, split: str, picks):
    key = f"{split}_images"
    if key not in data.files:
        raise SystemExit(f"--prepared: no {key!r} array in the file (expected a `python -m training prepare` output)")
    imgs = data[key]
    idx = list(range(len(imgs))) if picks is None else list(picks)
    bad = [i for i in idx if not 0 <= i < len(imgs)]
    if bad:
        raise SystemExit(f"--{split}-images: index {bad[0]} out of range; the file has {len(imgs)} {split} images")
    return [(f"{split}[{i}]", imgs[i].astype(np.float32), (1.0,) * (imgs.ndim - 1)) for i in idx], idx


def run(weights, prepared, train_picks, samples, t_prime, log=print, val_picks=None, splits=("train", "val"),
        input_padding=None):
    from napari_drdm.commands.evaluate import evaluate
    from napari_drdm.model import load_model
    model = load_model(weights, device="cpu")
    data = np.load(prepared, allow_pickle=False)
    rows = {}
    for split, picks in (("train", train_picks), ("val", val_picks)):
        if split not in splits:
            continue
        images, idx = _split(data, split, picks)
        if images[0][1].ndim != model.ndim or images[0][1].shape[0] != model.size:
            raise SystemExit(f"--prepared: {split} images of shape {images[0][1].shape} do not match the "
                             f"model ({model.ndim}D, S = {model.size})")
        t0 = time.perf_counter()
        res = evaluate(model, images, [t_prime], samples, input_padding=input_padding)[0]
        rows[split] = {"indices": idx, "sources": data[f"{split}_source"][idx].tolist()
                       if f"{split}_source" in data.files else None,
                       "seconds": time.perf_counter() - t0, "results": res}
        log(f"  {split}: {len(images)} images, {samples} generations, {rows[split]['seconds']:.0f} s")
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "weights": str(weights), "sha256": model.sha256,
            "prepared": str(prepared), "t_prime": t_prime, "samples": samples,
            "input_padding": model.config.input_padding if input_padding is None else input_padding,
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "command": " ".join(["python"] + sys.argv), "splits": rows}


def table(rec) -> str:
    def pm(s, d=2):
        return f"{s['mean']:.{d}f} ± {s['sd']:.{d}f}"
    out = ["| split | images | folding % | in the anatomy % | forward folding % | max disp % |",
           "| --- | --- | --- | --- | --- | --- |"]
    for split, row in rec["splits"].items():
        r = row["results"]
        out.append(f"| {split} | {len(row['indices'])} | {pm(r['folding_pct'])} | "
                   f"{pm(r['plausibility']['anatomy_folding_pct'])} | {pm(r['forward']['folding_pct'])} | "
                   f"{pm(r['max_disp_pct'], 1)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, help="a bundled name or a .safetensors file")
    ap.add_argument("--prepared", required=True, help="the run's prepared .npz (python -m training prepare)")
    ap.add_argument("--train-images", type=int, nargs="*", default=None,
                    help="indices of the training images to use (default: all)")
    ap.add_argument("--val-images", type=int, nargs="*", default=None,
                    help="indices of the validation images to use (default: all)")
    ap.add_argument("--splits", nargs="+", choices=["train", "val"], default=["train", "val"])
    ap.add_argument("--input-padding", type=int, default=None, metavar="PX",
                    help="pixels of mirrored image around the network's input (default: the model's own)")
    ap.add_argument("--samples", type=int, default=4, help="generations per split (default 4)")
    ap.add_argument("--t-prime", type=int, default=45)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="save the record here")
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    if not Path(a.prepared).is_file():
        raise SystemExit(f"--prepared: {a.prepared} not found (run `python -m training prepare --config ...`)")
    if a.samples < 1:
        raise SystemExit(f"--samples: expected a positive count, got {a.samples}")
    if a.threads:
        torch.set_num_threads(a.threads)
    np.seterr(all="ignore")
    rec = run(a.weights, a.prepared, a.train_images, a.samples, a.t_prime,
              log=lambda m: print(m, file=sys.stderr, flush=True), val_picks=a.val_images, splits=a.splits,
              input_padding=a.input_padding)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rec, indent=1))
    print(table(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
