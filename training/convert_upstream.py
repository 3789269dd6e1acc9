"""Convert the authors' published 2D checkpoint to the plugin's ``.safetensors`` format.

    python -m training convert-upstream --pth ../shared/reference/upstream_cmr2d.pth \\
        --out src/napari_drdm/weights/cmr2d.safetensors

The tensors are copied unchanged (checked bit for bit after writing); the file gains the
:class:`~napari_drdm.core.config.DRDMConfig` the authors trained it with (2D, S = 256, the
reference forward process and the cardiac reverse-loop settings) and a provenance record: the
source repository, file and commit, the sha256 of the upstream file and of the copy read, and
the licence.  The network was released under the Apache License 2.0; the bundled copy ships
with that licence text (``weights/LICENSE-cmr2d``) and a notice of this conversion
(``weights/NOTICE``).

One inference setting differs from the authors' 2D configuration unless asked otherwise: the
reverse loop composes each step into the accumulated field with ``border`` padding (as their 3D
configuration does) instead of ``zeros``.  With ``zeros``, most of the published network's
folds lie in the background within 16 px of the image border, where zero padding pulls in no
displacement; ``border`` cuts the folding by 42-55 % on held-out slices at a similar
displacement (the provenance entry ``compose_padding_change`` gives the figures and where they
were measured).  ``--compose-padding zeros`` writes the authors' setting; a user can also choose
either at generation time (``compose_padding=``, ``drdm ... --compose-padding``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .data import ensure_core

ensure_core()

from napari_drdm.checkpoint import CheckpointError, file_sha256, read_checkpoint, write_checkpoint  # noqa: E402
from napari_drdm.core.config import COMPOSE_PADDINGS  # noqa: E402
from napari_drdm.validate import check_choice  # noqa: E402

__all__ = ["UPSTREAM", "AUTHORS_COMPOSE_PADDING", "DEFAULT_COMPOSE_PADDING", "BORDER_MEASUREMENT", "convert_upstream"]

# What is known of the published file (shared/reference/NOTICE and upstream_cmr2d.keys.txt).
UPSTREAM = {
    "repository": "https://github.com/jianqingzheng/def_diff_rec",
    "file": "models/cmr_recresacnet/000000_cmr_recresacnet.pth",
    "added_in_commit": "b7da2aa",
    "read_at_commit": "1c70370",
    "upstream_sha256": "c9e93ccbd99ad288bb1c961f980141d2c8c91115e8a5986d7a20a98f64ae8e93",
    "licence": "Apache-2.0",
    "copyright": "the DRDM authors (Jian-Qing Zheng et al.)",
    "trained_on": "ACDC cardiac cine MRI, 2D slices at 256 x 256 (the authors' training)",
    "paper": "Zheng, Mo et al., Deformation-Recovery Diffusion Model, Medical Image Analysis 2026, arXiv 2407.07295",
}

#: the reverse-loop composition padding of the authors' 2D (cardiac) configuration
AUTHORS_COMPOSE_PADDING = "zeros"
#: what the bundled file uses: border, chosen by the measurement below
DEFAULT_COMPOSE_PADDING = "border"
#: why border, recorded in the file's provenance when it departs from the authors' setting
BORDER_MEASUREMENT = (
    "changed from the authors' 2D configuration (zeros; their 3D configuration uses border): with zeros, "
    "60-85 % of the folded pixels lay within 16 px of the image border, in the background. Held-out 2D sets "
    "(brain MRI / chest CT / cardiac cine), T' = 45, reference loop, 8 generations each, seeds 0-7: folding "
    "2.50 / 0.91 / 0.87 % with zeros -> 1.45 / 0.41 / 0.47 % with border; mean displacement "
    "10.9 / 4.1 / 4.8 -> 11.5 / 3.9 / 4.8 % of the side; max displacement 25.7 / 10.1 / 11.8 -> "
    "26.9 / 12.9 / 12.8 %. napari-drdm benchmarks/weights_table.py, results in "
    "benchmarks/results/weights_table_t45.json (zeros) and "
    "benchmarks/results/weights_table_t45_cmr2d_border.json (border). compose_padding=zeros (or "
    "--compose-padding zeros) at generation time gives the authors' behaviour.")


def convert_upstream(pth, out, name: str = "cmr2d", overwrite: bool = False,
                     compose_padding: str = DEFAULT_COMPOSE_PADDING) -> str:
    """Write ``out`` from the reference-format ``pth``; returns the new file's sha256.

    Args:
        pth: the published state_dict (read with ``torch.load(weights_only=True)``).
        out: the ``.safetensors`` file to write.
        name: model name stored in the configuration.
        overwrite: replace an existing ``out``.
        compose_padding: the reverse-loop composition padding stored in the configuration:
            ``border`` (default, measured: see :data:`BORDER_MEASUREMENT`) or ``zeros`` (the
            authors' 2D setting).
    """
    import torch
    padding = check_choice(compose_padding, COMPOSE_PADDINGS, "--compose-padding")
    state, cfg, _ = read_checkpoint(pth, size=256)
    if cfg.ndim != 2:
        raise CheckpointError(f"{pth}: expected the 2D published checkpoint, found a {cfg.ndim}D network")
    cfg.extra = {"name": name, "source": "published checkpoint (converted)"}
    cfg.compose_padding = padding
    prov = dict(UPSTREAM, converted_by="napari-drdm training/convert_upstream.py",
                converted_from=Path(pth).name, converted_from_sha256=file_sha256(pth),
                change="tensors copied unchanged from the PyTorch state_dict into safetensors; configuration and "
                       "this record added",
                compose_padding=padding, authors_compose_padding=AUTHORS_COMPOSE_PADDING)
    if padding != AUTHORS_COMPOSE_PADDING:
        prov["change"] += (f"; one inference setting changed: reverse-loop composition padding {padding} "
                           "(see compose_padding_change)")
        prov["compose_padding_change"] = BORDER_MEASUREMENT
    sha = write_checkpoint(out, state, cfg, prov, overwrite=overwrite)
    back, _, _ = read_checkpoint(out)
    if set(back) != set(state) or any(not torch.equal(back[k], state[k]) for k in state):
        raise RuntimeError(f"{out}: the converted tensors differ from {pth}")
    return sha


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training convert-upstream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pth", default="../shared/reference/upstream_cmr2d.pth", help="the published .pth file")
    ap.add_argument("--out", default="src/napari_drdm/weights/cmr2d.safetensors", help="output .safetensors")
    ap.add_argument("--name", default="cmr2d", help="model name stored in the file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    ap.add_argument("--compose-padding", choices=COMPOSE_PADDINGS, default=DEFAULT_COMPOSE_PADDING,
                    help="reverse-loop composition padding stored in the file: 'border' (default; 42-55 %% less "
                         "folding on held-out slices, recorded in the provenance) or "
                         "'zeros' (the authors' 2D configuration)")


def run(args) -> int:
    try:
        sha = convert_upstream(args.pth, args.out, args.name, args.overwrite, args.compose_padding)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (sha256 {sha}) from {args.pth}; composition padding {args.compose_padding}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
