"""``python -m training {kit,prepare,train,plot,convert-upstream,export,compact,bundle,set-inference,soup,validate,select}``:
the DRDM training command line.

    python -m training kit --out cache/kit
    python -m training prepare --config training/configs/brain2d.yaml
    python -m training train   --config training/configs/brain2d.yaml --run runs/brain2d
    python -m training train   --run runs/brain2d --resume [--set budget.max_minutes=100]
    torchrun --nproc-per-node 4 -m training train --config training/configs/brain2d.yaml --run-dir runs/b2d
    python -m training export  --run runs/brain2d --out src/napari_drdm/weights/brain2d_s128.safetensors
    python -m training validate --run runs/general2d --weights-file cmr2d --append     # a step-0 reference
    python -m training select  --run runs/general2d --steps 1050 1350 --by T45/reference/max_disp_pct
    python -m training compact --checkpoint runs/b/checkpoints/step_00001000.pt --out training/checkpoints/b/step_00001000.pt
    python -m training set-inference --weights cache/g.safetensors --out cache/g8.safetensors --background-margin 8 \
        --measured "..."
    python -m training soup    --weights a.safetensors b.safetensors --out soup.safetensors
    python -m training bundle  --weights general3d.safetensors --name general3d --description "..." --default
    python -m training plot    --run runs/brain2d

See training/README.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def _add_kit(sub) -> None:
    try:
        from .kit import add_kit_parser
    except ImportError as e:
        err = str(e)
        p = sub.add_parser("kit", help="build the training data kit (unavailable: see --help)")
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def _missing(_args):
            print(f"error: the data kit module training/kit.py cannot be imported ({err})", file=sys.stderr)
            return 2
        p.set_defaults(func=_missing)
        return
    add_kit_parser(sub)


def _config_args(p, required: bool):
    p.add_argument("--config", required=required, help="YAML training configuration (training/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key, e.g. --set train.steps=2000 (repeatable)")


def _cmd_prepare(args) -> int:
    from .data import prepare
    from .settings import load_config
    cfg = load_config(args.config, args.set)
    out = args.out or cfg["data"].get("prepared")
    if not out:
        print("error: give --out or set data.prepared in the configuration", file=sys.stderr)
        return 2
    prepare(cfg, out)
    return 0


def _cmd_train(args) -> int:
    from .settings import load_config
    from .train import latest_checkpoint, train
    run = Path(args.run)
    if args.resume and (run / "config.yaml").exists():
        if args.config:
            print(f"note: --resume uses {run / 'config.yaml'}; --config {args.config} is ignored "
                  f"(use --set to change keys)", file=sys.stderr)
        import yaml
        cfg = load_config(base=yaml.safe_load((run / "config.yaml").read_text()), sets=args.set)
    elif args.config:
        cfg = load_config(args.config, args.set)
    else:
        print("error: --config is required for a new run", file=sys.stderr)
        return 2
    if args.init:
        cfg["init"] = args.init
    if args.resume and latest_checkpoint(run) is None:
        print(f"note: no checkpoint in {run}; starting from scratch", file=sys.stderr)
    import os
    launcher = ["python", "-m", "training"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        launcher = ["torchrun", f"--nnodes={os.environ.get('GROUP_WORLD_SIZE', '?')}",
                    f"--nproc-per-node={os.environ.get('LOCAL_WORLD_SIZE', '?')}", "-m", "training"]
    from .init_weights import InitError
    try:
        train(cfg, run, resume=args.resume, argv=launcher + list(args.argv))
    except InitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args) -> int:
    from .export import main_export
    try:
        return main_export(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _cmd_compact(args) -> int:
    from .checkpointing import compact_checkpoint
    try:
        info = compact_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    avg = (f"weight average ({info['ema_updates']} updates) stored in float16" if info["ema_updates"] is not None
           else "no weight average in it: the copy equals the source")
    print(f"wrote {args.out}: {info['src_bytes'] / 1e6:.1f} MB -> {info['dst_bytes'] / 1e6:.1f} MB; {avg}")
    return 0


def _cmd_validate(args) -> int:
    from .export import validate_run
    from .init_weights import InitError
    if args.weights_file and args.checkpoint:
        print("error: give --weights-file or --checkpoint, not both", file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        validate_run(args.run, args.weights_file, args.checkpoint, args.weights, args.append, args.step, args.device,
                     sets=args.set)
    except (FileNotFoundError, ValueError, InitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _add_kit(sub)
    p = sub.add_parser("prepare", help="preprocess the kit into one compact .npz for training")
    _config_args(p, True)
    p.add_argument("--out", default=None, help="output file (default: data.prepared of the config)")
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("train", help="train (or --resume) a DRDM network")
    _config_args(p, False)
    p.add_argument("--run-dir", "--run", dest="run", required=True,
                   help="run directory (checkpoints, log, config); spell it --run-dir under torchrun, "
                        "whose own parser takes --run for its --run-path")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start a new run from these weights (file or bundled name; same as --set init=...)")
    p.set_defaults(func=_cmd_train)
    from . import plot as _plot
    p = sub.add_parser("plot", help="learning curves of a run as a PNG")
    _plot.add_arguments(p)
    p.set_defaults(func=_plot.run)
    from .convert_upstream import add_arguments
    from .convert_upstream import run as _convert
    p = sub.add_parser("convert-upstream", help="convert the authors' published 2D checkpoint (cmr2d)")
    add_arguments(p)
    p.set_defaults(func=_convert)
    p = sub.add_parser("export", help="write a run's weights as a bundled .safetensors checkpoint")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint (default: the latest)")
    p.add_argument("--name", default=None, help="model name stored in the config (default: the run's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--validate", action="store_true",
                   help="run the configured validation on these weights now and record it")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="the weight average (ema) or the trained weights (raw); auto: the average when "
                        "the checkpoint holds one (train.ema_decay > 0)")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("compact", help="a copy of a training checkpoint with its weight average in float16 "
                                       "(to commit a resumable run under a file-size limit)")
    p.add_argument("--checkpoint", required=True, help="a step_*.pt of a run")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_compact)
    from . import bundle as _bundle
    p = sub.add_parser("bundle", help="register an exported model as bundled weights of the plugin")
    _bundle.add_arguments(p)
    p.set_defaults(func=_bundle.run)
    from . import set_inference as _set_inference
    p = sub.add_parser("set-inference", help="change a weights file's inference settings (background margin, "
                                             "input or composition padding), keeping its network")
    _set_inference.add_arguments(p)
    p.set_defaults(func=_set_inference.run)
    from . import soup as _soup
    p = sub.add_parser("soup", help="the average of several weights files of one network (a weight soup)")
    _soup.add_arguments(p)
    p.set_defaults(func=_soup.run)
    p = sub.add_parser("validate", help="run a run's validation on its checkpoint or on other weights")
    p.add_argument("--run", required=True, help="run directory (its config.yaml gives the images and settings)")
    p.add_argument("--checkpoint", default=None, help="a specific checkpoint of the run (default: the latest)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="for a checkpoint: the weight average (ema), the trained weights (raw), auto: ema if saved")
    p.add_argument("--weights-file", default=None, metavar="WEIGHTS",
                   help="validate these weights instead (a file or a bundled name, loaded like init), "
                        "e.g. the starting weights of a fine-tuning run")
    p.add_argument("--append", action="store_true", help="add the result to the run's train_log.jsonl")
    p.add_argument("--step", type=int, default=None, help="step to record (default: the checkpoint's; 0 for --weights-file)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change how this validation judges the weights, e.g. validation.schedules=[paper] "
                        "or validation.t_primes=[30,45,70] (keys under validation., model.compose_padding, "
                        "model.image_interp, model.input_padding, model.k_recursions); repeatable")
    p.set_defaults(func=_cmd_validate)
    from . import select as _select
    p = sub.add_parser("select", help="rank a run's checkpoints on its validation, lowest figure first")
    _select.add_arguments(p)
    p.set_defaults(func=_select.run)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # bad input (a configuration value, a missing or existing file): one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
