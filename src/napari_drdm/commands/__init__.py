"""Sub-commands of the ``drdm`` command line (one module each)."""
from __future__ import annotations


def add_model_args(p, default=None, required=False):
    """--weights / --device / --size, shared by every command that loads a model."""
    p.add_argument("--weights", default=default, required=required and default is None,
                   help="bundled weights name (see `drdm weights`) or a checkpoint file (.safetensors or "
                        "reference .pth); default: the bundled default model of the input's dimensionality "
                        "(marked in `drdm weights`)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--size", type=int, default=None,
                   help="model side S (only needed for reference .pth files, which do not record it)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def load_from_args(args, ndim: int = 2):
    """The model named by ``--weights``, or the default bundled model for ``ndim``-D inputs."""
    import torch
    from ..model import load_model
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_model(args.weights, device=args.device, size=args.size, ndim=ndim)
