"""Sub-commands of the ``drdm`` command line (one module each)."""
from __future__ import annotations


def add_model_args(p, default=None, required=True):
    """--weights / --device / --size, shared by every command that loads a model."""
    p.add_argument("--weights", default=default, required=required and default is None,
                   help="bundled weights name (see `drdm weights`) or a checkpoint file (.safetensors or reference .pth)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--size", type=int, default=None,
                   help="model side S (only needed for reference .pth files, which do not record it)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def add_fold_guard_arg(p, default: bool):
    """--fold-guard / --no-fold-guard (README "Fold-free deformations" says why each default).

    Args:
        p: the sub-command's argument parser.
        default: the guard's state when neither flag is given.
    """
    import argparse
    state = "on" if default else "off"
    p.add_argument("--fold-guard", action=argparse.BooleanOptionalAction, default=default,
                   help=f"make every written field fold-free, det(I + grad phi) > 0 at every pixel/voxel under the "
                        f"central and the strict (2^d one-sided) Jacobian, with a local correction (default: {state})")


def load_from_args(args):
    import torch
    from ..model import load_model
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_model(args.weights, device=args.device, size=args.size)
