"""``drdm augment``: Algorithm 3, a segmentation training set of DRDM-deformed images + labels + fields.

    drdm augment IN [IN ...] OUT --per-image N --t-prime SPEC [--weights NAME_OR_PATH] [--seed N]
    drdm augment --reproduce MANIFEST ROW_ID OUTDIR
    drdm augment --merge OUT

The engine is :mod:`napari_drdm.export`; ``synthesize-pairs`` shares this module's options.
See docs/export.md for the naming rule, the outputs and the manifest.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from ..errors import InputError
from ..validate import arg_type, check_int, check_positive
from . import (
    add_fold_guard_arg,
    add_model_args,
    anatomy_fit_arg,
    background_margin_arg,
    compose_padding_arg,
    input_padding_arg,
    k_arg,
    keep_size_arg,
    label_interp_arg,
    schedule_arg,
    seed_arg,
)

EPILOG = ("T' SPEC: a value (45), a list (40,45,50), a range start:stop[:step] with stop included (40:52:2), "
          "or 'reference' (48, 50, 50, 52, 52, ...: the authors' schedule); lists and ranges are cycled over the "
          "N outputs of each image.  Labels are paired by name: case01.nii.gz + case01_label/_labels/_seg.*, "
          "or IN/images/ + IN/labels/ with matching names.")


def add_common(p):
    """The options ``drdm augment`` and ``drdm synthesize-pairs`` share (all but their T' options).

    Args:
        p: the sub-command's argument parser.
    """
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="IN [IN ...] OUT: input folders/files (NIfTI, NRRD, PNG, DICOM series...), output folder")
    p.add_argument("--per-image", "-n", type=arg_type(check_int, "--per-image", lo=1), default=1,
                   help="outputs per input image (default 1)")
    add_model_args(p, required=False)
    seed_arg(p, help="run seed (0 .. 2**63-1); each output's seed is derived from it, the input's name and the "
             "output index (default 0)")
    schedule_arg(p)
    compose_padding_arg(p)
    input_padding_arg(p)
    background_margin_arg(p)
    anatomy_fit_arg(p)
    keep_size_arg(p)
    k_arg(p)
    p.add_argument("--batch", type=arg_type(check_int, "--batch", lo=1), default=4,
                   help="samples per network pass (default 4)")
    p.add_argument("--inverse", action="store_true", help="also write the inverse field (fixed-point inversion; "
                   "its residual goes to the manifest)")
    p.add_argument("--inverse-iterations", type=arg_type(check_int, "--inverse-iterations", lo=0), default=50)
    label_interp_arg(p)
    add_fold_guard_arg(p, default=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help="complete an interrupted run in OUT (finished outputs are verified by sha256 and kept)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty OUT, replacing same-named files")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="process only inputs j with j %% n == i (0-based); under torchrun RANK/WORLD_SIZE are used")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable input instead of skipping it")
    p.add_argument("--retry-skipped", action="store_true",
                   help="with --resume: retry the inputs the earlier run skipped (by default they stay skipped)")
    p.add_argument("--max-memory", type=arg_type(check_positive, "--max-memory"), default=None, metavar="GB",
                   help="memory budget for the estimate made before each input (default: the memory available)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="if another drdm process is writing into OUT, wait this long for it (default: refuse at once)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reproduce", nargs=3, metavar=("MANIFEST", "ROW_ID", "OUTDIR"),
                   help="regenerate one manifest row into OUTDIR and compare with the recorded sha256 "
                   "(existing files are replaced only with --overwrite)")
    p.add_argument("--merge", action="store_true", help="only rebuild OUT/manifest.json and .csv from the journals")
    return p


def add_parser(sub):
    p = sub.add_parser("augment", help="Algorithm 3: augmented segmentation set (images, labels, fields, manifest)",
                       description=__doc__.split("\n\n")[0], epilog=EPILOG)
    add_common(p)
    p.add_argument("--t-prime", default="reference", help="T' SPEC (default 'reference')")
    return p


def _shard(args):
    env_n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.shard:
        try:
            i, n = (int(v) for v in str(args.shard).split("/"))
        except ValueError:
            raise InputError(f"--shard must look like i/n (e.g. 0/4), got {args.shard!r}") from None
        if not 0 <= i < n:
            raise InputError(f"--shard {args.shard}: expected 0 <= i < n")
        return i, n, False
    if env_n > 1:
        return int(os.environ.get("RANK", "0")), env_n, True
    return 0, 1, False


def _init_dist():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available() or "MASTER_ADDR" not in os.environ:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist


def run_mode(args, opts_kw: dict) -> int:
    import torch

    from ..export import ExportOptions, reproduce_row, run_export, write_manifest

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.reproduce:
        manifest, row_id, out = args.reproduce
        res = reproduce_row(manifest, row_id, out, device=args.device, overwrite=args.overwrite)
        for k, p in res["paths"].items():
            print(f"  {k}: {p}  {'identical' if res['identical'][k] else 'DIFFERS from the manifest'}")
        if not all(res["identical"].values()) and res["environment"]:
            print("  written with " + ", ".join(f"{k} {was}" for k, (was, _) in res["environment"].items())
                  + "; reproduced with " + ", ".join(f"{k} {now}" for k, (_, now) in res["environment"].items())
                  + ": float rounding differs between these, and the reverse loop amplifies it")
        return 0 if all(res["identical"].values()) else 1
    if args.merge:
        if len(args.paths) != 1:
            raise InputError("--merge takes the output folder only")
        from ..export.manifest import RUN_FILE
        from ..export.outdir import clean_partials
        from ..output_lock import OutputLock
        folder = Path(args.paths[0])
        if not folder.is_dir() or not ((folder / RUN_FILE).exists() or list(folder.glob("journal-*-of-*.jsonl"))):
            raise FileNotFoundError(f"--merge {folder}: not the output folder of a drdm run (no run.json or "
                                    f"journal-*.jsonl there); nothing was created")
        with OutputLock(folder, what="drdm augment --merge"):
            clean_partials(folder)
            m = write_manifest(folder)
        print(f"{args.paths[0]}/manifest.json: {m['n_rows']} rows, {m['n_missing']} missing")
        return 0
    if len(args.paths) < 2:
        raise InputError("give at least one input and the output folder: IN [IN ...] OUT")
    if args.per_image < 1:
        raise InputError("--per-image must be >= 1")
    inputs, out = args.paths[:-1], args.paths[-1]
    i, n, from_env = _shard(args)
    device = args.device
    if from_env and device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', i)) % torch.cuda.device_count()}"
    dist = _init_dist() if from_env else None
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    opts = ExportOptions(per_image=args.per_image, seed=args.seed, schedule=args.schedule,
                         compose_padding=args.compose_padding, input_padding=args.input_padding,
                         background_margin=args.background_margin, anatomy_fit=args.anatomy_fit,
                         keep_size=args.keep_size, k=args.k,
                         batch=args.batch, inverse=args.inverse, inverse_iterations=args.inverse_iterations,
                         label_interp=args.label_interp, weights=args.weights, device=device, size=args.size,
                         resume=args.resume, overwrite=args.overwrite, shard=(i, n), strict=args.strict,
                         retry_skipped=args.retry_skipped, max_memory=args.max_memory, lock_wait=args.wait,
                         fold_guard=args.fold_guard, **opts_kw).validate()
    if args.retry_skipped and not args.resume:
        raise InputError("--retry-skipped only applies with --resume")
    bar = None

    def new_bar():       # created at the first event, so that a refusal before work is one line
        from tqdm import tqdm
        return tqdm(total=0, unit="out", desc=f"{args.command} {i}/{n}" if n > 1 else args.command,
                    position=i if n > 1 else 0, dynamic_ncols=True)

    def say(msg):
        (bar.write if bar is not None else print)(msg, file=sys.stderr)

    def progress(ev):
        nonlocal bar
        if bar is None and not args.no_progress:
            bar = new_bar()
        if bar is not None:
            if bar.total != ev.total:
                bar.total = ev.total
                bar.refresh()
            if ev.kind == "row":
                bar.update(ev.done - bar.n)
        if ev.message:
            say(f"drdm {args.command}: {ev.message}")

    from ..cli import stop_requested

    def stopped(how: str, s: dict) -> int:
        """The message and exit status of a run that Ctrl-C or SIGTERM ended."""
        if bar is not None:
            bar.close()
        how = "terminated (SIGTERM)" if how == "terminated" else "interrupted"
        where = (f"every finished output is in {out}/manifest.json ({s.get('n_rows', '?')} rows)"
                 if s.get("manifest_written", True) else s["manifest_error"])
        print(f"drdm {args.command}: {how} after {s['written']} new outputs; {where}. Rerun the same command with "
              f"--resume to complete the set.", file=sys.stderr)
        return 143 if how.startswith("terminated") else 130

    try:
        # the signal also stops the loop at its next batch where its exception was swallowed
        summary = run_export(inputs, out, opts, progress=progress, should_stop=lambda: stop_requested() is not None)
    except KeyboardInterrupt as e:      # Ctrl-C, or SIGTERM (cli.Terminated)
        s = getattr(e, "export_summary", None)
        if s is None:                   # stopped before the run began: nothing was written
            raise
        return stopped("terminated" if type(e).__name__ == "Terminated" else "interrupted", s)
    except OSError as e:
        if bar is not None:
            bar.close()
        s = getattr(e, "export_summary", None)
        if e.errno == errno.ENOSPC and s is not None:
            where = (f"Finished outputs are listed in {out}/manifest.json" if s.get("manifest_written", True)
                     else "The manifest could not be written either (disk full); the journal is intact: "
                     f"`drdm augment --merge {out}` rebuilds it")
            raise OSError(e.errno, f"{e.strerror}. {where}; free some space and rerun with --resume") from None
        raise
    finally:
        if bar is not None:
            bar.close()
    if stop_requested() is not None and summary.get("status") == "cancelled":
        return stopped(stop_requested(), summary)
    if dist is not None:
        dist.barrier()                       # every rank has finished its shard: rank 0 merges
        rank = dist.get_rank()
        if rank == 0:
            m = write_manifest(out)
            summary.update(complete=m["complete"], n_rows=m["n_rows"], n_missing=m["n_missing"])
        dist.destroy_process_group()
        if rank != 0:
            print(f"rank {rank}: {summary['written']} outputs written "
                  f"({summary.get('previously_done', 0)} already done)")
            return 0
    state = "complete" if summary.get("complete") else f"incomplete ({summary.get('n_missing', '?')} missing)"
    n_skip = len(summary.get("skipped", []))
    skipped = f"; {n_skip} inputs skipped (reasons above and in the manifest's 'skipped' list)" if n_skip else ""
    print(f"{summary['written']} outputs written ({summary.get('previously_done', 0)} already done); "
          f"{summary.get('n_rows', '?')} rows in {summary['manifest']}: {state}{skipped}")
    if summary.get("manifest_error"):
        print(summary["manifest_error"], file=sys.stderr)
    return 0


def run(args) -> int:
    return run_mode(args, {"mode": "augment", "t_prime": args.t_prime})
