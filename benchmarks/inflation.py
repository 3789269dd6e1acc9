"""Which 2D -> 3D inflation starts a 3D model closer: centre, spread, or a fresh network?

Builds the configured 3D network three ways (``init_inflate: centre``, ``spread``, and a fresh
initialisation with the config's ``head_init_scale``), and evaluates each, without training, on
the same fixed validation volumes and forward draws with training/evaluate_hook.py's Validator:
the loss terms at fixed t (``ang`` is the cosine between predicted and true step fields: -1 is
perfect, 0 is uninformed) and, with ``--table1``, the recovered folding at T' (reference loop).

    python -m training prepare --config training/configs/general3d.yaml
    python benchmarks/inflation.py --config training/configs/general3d.yaml --json benchmarks/results/inflation.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._outputs import add_force_arg, check_outputs  # noqa: E402
from napari_drdm.core.network import DRDMNet  # noqa: E402
from training.data import dataset  # noqa: E402
from training.evaluate_hook import Validator  # noqa: E402
from training.init_weights import load_init, scale_head  # noqa: E402
from training.settings import load_config, model_config  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "training" / "configs" / "general3d.yaml"))
    ap.add_argument("--init", default=None, help="2D weights (default: the config's init)")
    ap.add_argument("--n-images", type=int, default=4)
    ap.add_argument("--loss-t", type=int, nargs="+", default=[5, 15, 30, 45, 60, 75])
    ap.add_argument("--table1", type=int, nargs="*", default=[], metavar="T'",
                    help="also recovered folding at these T'")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    add_force_arg(ap)
    a = ap.parse_args(argv)
    check_outputs(ap, a.force, a.json)
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    mcfg = model_config(cfg)
    src = a.init or cfg.get("init")
    val = dict(cfg["validation"], n_images=a.n_images, loss_t=a.loss_t, t_primes=a.table1, schedules=["reference"])
    validator = Validator(mcfg, dataset(cfg)["val"], val, cfg["loss"], torch.device("cpu"))
    rows = {}
    for how in ("fresh", "centre", "spread"):
        torch.manual_seed(0)
        net = DRDMNet.from_config(mcfg)
        if how == "fresh":
            scale_head(net, float(cfg["optim"].get("head_init_scale", 1.0)))
        else:
            load_init(net, src, how)
        t0 = time.perf_counter()
        res = validator.run(net)
        rows[how] = {k[4:]: v for k, v in res.items()}
        rows[how]["seconds"] = time.perf_counter() - t0
        print(f"{how:>6}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[how].items()
                                       if k.startswith("loss/") and k.split("/")[1] in ("ang", "dist", "total")
                                       or k.endswith("folding_pct")), flush=True)
    rec = {"config": a.config, "init": src, "model": mcfg.to_dict(), "n_images": validator.images.shape[0],
           "loss_t": a.loss_t, "table1": a.table1, "results": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
