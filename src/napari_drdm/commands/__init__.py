"""Sub-commands of the ``drdm`` command line (one module each)."""
from __future__ import annotations

from ..core.config import SCHEDULE_NAMES, Schedule
from ..validate import (
    COMPOSE_PADDINGS,
    LABEL_INTERPS,
    arg_type,
    check_anatomy_fit_option,
    check_background_margin_option,
    check_device,
    check_input_padding_option,
    check_k,
    check_keep_size_option,
    check_model_size,
    check_seed,
    check_threads,
)


def add_model_args(p, default=None, required=False):
    """--weights / --device / --size / --threads, shared by every command that loads a model.

    Values are checked while parsing (a bad one is one line naming the option, before any work)."""
    p.add_argument("--weights", default=default, required=required and default is None,
                   help="bundled weights name (see `drdm weights`) or a checkpoint file (.safetensors or "
                        "reference .pth); default: the bundled default model of the input's dimensionality "
                        "(marked in `drdm weights`)")
    p.add_argument("--device", default="auto", type=arg_type(check_device, "--device"),
                   help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--size", type=arg_type(check_model_size, "--size"), default=None,
                   help="model side S (only needed for reference .pth files, which do not record it)")
    p.add_argument("--threads", type=arg_type(check_threads, "--threads"), default=None,
                   help="CPU threads for torch (default: torch's choice)")


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


def seed_arg(p, default=0, help="random seed (0 .. 2**63-1)"):
    p.add_argument("--seed", type=arg_type(check_seed, "--seed"), default=default, help=help)


def schedule_arg(p):
    """--schedule, one of :data:`~napari_drdm.core.config.SCHEDULE_NAMES` (default: the model's own)."""
    p.add_argument("--schedule", choices=SCHEDULE_NAMES, default=None,
                   help=f"reverse loop: '{Schedule.PAPER}' runs T' steps, '{Schedule.REFERENCE}' all T steps "
                        f"(default: the model's)")


def compose_padding_arg(p):
    """--compose-padding, one of :data:`~napari_drdm.core.config.COMPOSE_PADDINGS` (default: the model's own)."""
    p.add_argument("--compose-padding", choices=COMPOSE_PADDINGS, default=None,
                   help="how the reverse loop composes each step into the field where it samples outside the "
                        "image: 'border' repeats the edge displacement, 'zeros' takes none there and reproduces "
                        "the authors' 2D code (default: the model's; the bundled cmr2d uses border)")


def input_padding_arg(p):
    """--input-padding PX, checked while parsing (a multiple of 4 >= 0; the bound S/2 once the model
    is loaded: :func:`checked_input_padding`); default None, the model's own."""
    p.add_argument("--input-padding", type=arg_type(check_input_padding_option, "--input-padding"), default=None,
                   metavar="PX",
                   help="pixels of mirrored image around the network's input at every reverse step, a multiple of "
                        "4 below S/2; 0 is the authors' behaviour (default: the model's; the bundled cmr2d uses 8)")


def checked_input_padding(args, model):
    """``--input-padding`` checked against the loaded model's side (one line naming the option), or
    None when not given (the model's own)."""
    return check_input_padding_option(getattr(args, "input_padding", None), model.size, "--input-padding")


def background_margin_arg(p):
    """--background-margin PX|off, checked while parsing (the bound S/2 once the model is loaded:
    :func:`checked_background_margin`); default None, the model's own."""
    p.add_argument("--background-margin", type=arg_type(check_background_margin_option, "--background-margin"),
                   default=None, metavar="PX|off",
                   help="pixels kept around the anatomy; farther out the recovered field is replaced by the smooth "
                        "(harmonic) extension of the field around it, where the image shows nothing for the network "
                        "to recover; 'off' keeps the loop's field as it is, the authors' behaviour (default: the "
                        "model's; drdm weights lists each model's)")


def anatomy_fit_arg(p):
    """--anatomy-fit PX|off, checked while parsing (the bound S/2 once the model is loaded:
    :func:`checked_anatomy_fit`); default None, the model's own."""
    p.add_argument("--anatomy-fit", type=arg_type(check_anatomy_fit_option, "--anatomy-fit"),
                   default=None, metavar="PX|off",
                   help="fit the model's view to the anatomy, keeping this many of its pixels free around it: "
                        "the reverse loop runs on a square (cube) around everything bright, at most 2x enlarged, "
                        "and the field is returned on the whole image; 'off' shows the model the whole image, "
                        "the authors' behaviour (default: the model's; drdm weights lists each model's)")


def keep_size_arg(p):
    """--keep-size on|inflation|off, checked while parsing; default None, the model's own."""
    p.add_argument("--keep-size", type=arg_type(check_keep_size_option, "--keep-size"), default=None,
                   metavar="on|inflation|off",
                   help="take the generated deformation's global zoom over the anatomy out (one similarity after "
                        "the loop: it folds nothing, and leaves the anatomy where the generation put it, at its "
                        "own size); 'inflation' takes it out only where the anatomy came out enlarged; 'off' keeps "
                        "it, the authors' behaviour (default: the model's; drdm weights "
                        "lists each model's)")


def checked_anatomy_fit(args, model):
    """``--anatomy-fit`` checked against the loaded model's side (one line naming the option): None
    when not given (the model's own), "off", or pixels."""
    return check_anatomy_fit_option(getattr(args, "anatomy_fit", None), model.size, "--anatomy-fit")


def checked_background_margin(args, model):
    """``--background-margin`` checked against the loaded model's side (one line naming the option):
    None when not given (the model's own), "off", or pixels."""
    return check_background_margin_option(getattr(args, "background_margin", None), model.size,
                                          "--background-margin")


def label_interp_arg(p):
    """--label-interp nearest|linear_argmax."""
    p.add_argument("--label-interp", choices=LABEL_INTERPS, default=LABEL_INTERPS[0],
                   help="label warping: nearest neighbour, or per-label linear + argmax (default nearest)")


def k_arg(p, help="internal recursions K >= 1 (default: the model's)"):
    p.add_argument("--k", type=arg_type(check_k, "--k"), default=None, help=help)


def load_from_args(args, ndim: int = 2):
    """The model named by ``--weights``, or the default bundled model for ``ndim``-D inputs."""
    import torch

    from ..model import load_model
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return load_model(args.weights, device=args.device, size=args.size, ndim=ndim)
