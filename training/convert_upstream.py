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

A second one: each reverse step's input is surrounded by 8 px of mirrored image and the estimate
cropped back (``input_padding``).  The published network inflates whatever sits in a dark frame
and its own late steps fold only at the image border; with the mirrored frame it folds less on
every held-out set and pushes almost no foreground out of view (figures in
``input_padding_change``; 16 px folds a little less still but shrinks slices that fill the view).
``--input-padding 0`` writes the authors' setting; ``input_padding=0`` in the Python API chooses it
at generation time.

A third: the recovered field farther than 8 px from anything bright (in the image and in the
deformed image) is replaced by the harmonic extension of the field around it
(``background_margin``, core/background.py).  The image there is empty, so the network's steps
there are guesses and most of the remaining folds lie there; the anatomy's field is unchanged
(figures in ``background_margin_change``).  ``--background-margin off`` writes the authors'
behaviour; ``background_margin="off"`` chooses it at generation time.

A fourth: the reverse loop runs on the smallest square of the model grid around everything bright,
with 16 px of it free around the anatomy, at most 2x enlarged, and the field is brought back to the
whole image (``anatomy_fit``, core/view.py).  The published network stretches an anatomy that sits
small in a dark field of view to fill it; seen at its own scale it deforms less (figures in
``anatomy_fit_change``).  ``--anatomy-fit off`` writes the authors' behaviour;
``anatomy_fit="off"`` chooses it at generation time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .data import ensure_core

ensure_core()

from napari_drdm.checkpoint import CheckpointError, file_sha256, read_checkpoint, write_checkpoint  # noqa: E402
from napari_drdm.core.config import BACKGROUND_OFF, COMPOSE_PADDINGS, check_input_padding  # noqa: E402
from napari_drdm.validate import check_anatomy_fit_option, check_background_margin_option, check_choice  # noqa: E402

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


#: what the bundled file uses: 8 px of mirrored image around the network's input (the authors: 0),
#: chosen on data-kit slices (below) and measured on the held-out sets
DEFAULT_INPUT_PADDING = 8
#: why, recorded in the file's provenance when it departs from the authors' setting
INPUT_PADDING_MEASUREMENT = (
    "changed from the authors' setting (the image fed as it is, 0): the network inflates content that sits in a "
    "dark frame and its own steps fold at the image border, so each step's input is surrounded by 8 px of "
    "mirrored image and the estimate cropped back. Chosen on data-kit slices (T' = 45): 8 brain validation "
    "slices (the brainbrowser head, a subject the held-out brain set also draws slices from), folding "
    "1.55 / 0.85 / 0.69 % and zoom 1.30 / 1.23 / 1.19 with 0 / 8 / 16 px; two rat-thorax MR slices and a CT "
    "slice that fill the view and are in no held-out set, folding 0.69 / 0.08 / 0.07 % (MR) and maximum "
    "displacement 13.1 / 10.8 / 16.5 % of the side (16 px shrinks such slices). Held-out 2D sets (brain MRI / "
    "chest CT / cardiac cine), reference loop, border composition, 8 generations each, seeds 0-7: folding "
    "1.59 / 0.52 / 0.54 % -> 1.12 / 0.19 / 0.27 %, foreground out of view 0.47 / 2.68 / 2.03 % -> "
    "0.00 / 0.02 / 0.01 %, zoom 1.218 / 1.008 / 1.070 -> 1.161 / 0.961 / 1.022, max displacement "
    "26.8 / 13.6 / 13.0 -> 26.3 / 15.3 / 10.9 % of the side. napari-drdm benchmarks/generalisation_gap.py "
    "(benchmarks/results/input_padding_val_cmr2d_p*.json, input_padding_fill_cmr2d_p*.json) and "
    "benchmarks/weights_table.py (benchmarks/results/weights_table_t45_cmr2d_pad0.json, "
    "weights_table_t45_cmr2d_pad8.json, weights_table_t45_cmr2d_pad16.json); "
    "input_padding=0 at generation time (Python API) gives the authors' behaviour.")


#: what the bundled file uses: the field beyond 8 px (3 % of the side) from the anatomy extended
#: harmonically (the authors: none)
DEFAULT_BACKGROUND_MARGIN = 8
#: why, recorded in the file's provenance when it departs from the authors' setting
BACKGROUND_MEASUREMENT = (
    "changed from the authors' behaviour (the reverse loop's field as it is): in empty background the image shows "
    "nothing the network could recover, and most of the folds left lie there. The field farther than 8 px from "
    "anything above the foreground threshold, in the image and in the deformed image, is replaced by the harmonic "
    "extension of the field around it. Held-out 2D sets (brain MRI / chest CT / cardiac cine), T' = 45, reference "
    "loop, border composition, 8 px input padding, 8 generations each, seeds 0-7: folding "
    "1.12 / 0.19 / 0.27 % -> 0.42 / 0.16 / 0.15 %, folding inside the anatomy unchanged, the deformed image "
    "changed by at most 0.05 of its range. napari-drdm benchmarks/background_extension.py "
    "(benchmarks/results/background_extension.json) and benchmarks/weights_table.py; "
    "background_margin='off' at generation time gives the authors' behaviour.")


#: what the bundled file uses: the view fitted to the anatomy with 16 px (6 % of the side) free
#: around it (the authors: the whole image)
DEFAULT_ANATOMY_FIT = 16
#: why, recorded in the file's provenance when it departs from the authors' setting
ANATOMY_FIT_MEASUREMENT = (
    "changed from the authors' behaviour (the network sees the whole image): the published network stretches an "
    "anatomy that sits small in a dark field of view to fill it. The reverse loop runs on the smallest square of "
    "the model grid holding everything above the foreground threshold with 16 px of the square free around it "
    "(at most 2x enlarged); the fields are brought back to the whole grid, the field outside the square that of "
    "its nearest edge. Held-out 2D sets (brain MRI / chest CT / cardiac cine), T' = 45, reference loop, border "
    "composition, 8 px input padding, 8 px background margin, 8 generations each, seeds 0-7: brain maximum "
    "displacement 25.7 -> 19.1 % of the side, zoom 1.166 -> 1.087, folding 0.42 -> 0.50 %; the CT and cardiac "
    "slices reach the image edges, so their view is the whole image and nothing changes. napari-drdm "
    "benchmarks/weights_table.py (benchmarks/results/weights_table_t45_cmr2d_bg8.json, "
    "weights_table_t45_cmr2d_bg8_fit16.json); anatomy_fit='off' at generation time gives the authors' behaviour.")


def convert_upstream(pth, out, name: str = "cmr2d", overwrite: bool = False,
                     compose_padding: str = DEFAULT_COMPOSE_PADDING,
                     input_padding: int = DEFAULT_INPUT_PADDING,
                     background_margin=DEFAULT_BACKGROUND_MARGIN, anatomy_fit=DEFAULT_ANATOMY_FIT) -> str:
    """Write ``out`` from the reference-format ``pth``; returns the new file's sha256.

    Args:
        pth: the published state_dict (read with ``torch.load(weights_only=True)``).
        out: the ``.safetensors`` file to write.
        name: model name stored in the configuration.
        overwrite: replace an existing ``out``.
        compose_padding: the reverse-loop composition padding stored in the configuration:
            ``border`` (default, measured: see :data:`BORDER_MEASUREMENT`) or ``zeros`` (the
            authors' 2D setting).
        input_padding: pixels of mirrored image around the network's input stored in the
            configuration: 8 (default, measured: see :data:`INPUT_PADDING_MEASUREMENT`) or 0 (the
            authors' setting); a multiple of 4 below 128.
        background_margin: pixels kept around the anatomy before the field is extended into the
            background: 8 (default, measured: see :data:`BACKGROUND_MEASUREMENT`) or None / "off"
            (the authors' behaviour); below 128.
        anatomy_fit: pixels of the model's view kept free around the anatomy: 16 (default, measured:
            see :data:`ANATOMY_FIT_MEASUREMENT`) or None / "off" (the whole image, the authors'
            behaviour); below 128.
    """
    import torch
    padding = check_choice(compose_padding, COMPOSE_PADDINGS, "--compose-padding")
    state, cfg, _ = read_checkpoint(pth, size=256)
    if cfg.ndim != 2:
        raise CheckpointError(f"{pth}: expected the 2D published checkpoint, found a {cfg.ndim}D network")
    cfg.extra = {"name": name, "source": "published checkpoint (converted)"}
    cfg.compose_padding = padding
    try:
        cfg.input_padding = check_input_padding(input_padding, cfg.size)
    except ValueError as e:
        raise ValueError(f"--input-padding: {e}") from None
    margin = check_background_margin_option(background_margin, cfg.size, "--background-margin")
    cfg.background_margin = None if margin in (None, BACKGROUND_OFF) else margin
    fit = check_anatomy_fit_option(anatomy_fit, cfg.size, "--anatomy-fit")
    cfg.anatomy_fit = None if fit in (None, BACKGROUND_OFF) else fit
    prov = dict(UPSTREAM, converted_by="napari-drdm training/convert_upstream.py",
                converted_from=Path(pth).name, converted_from_sha256=file_sha256(pth),
                change="tensors copied unchanged from the PyTorch state_dict into safetensors; configuration and "
                       "this record added",
                compose_padding=padding, authors_compose_padding=AUTHORS_COMPOSE_PADDING,
                input_padding=cfg.input_padding, authors_input_padding=0,
                background_margin=cfg.background_margin, authors_background_margin=None,
                anatomy_fit=cfg.anatomy_fit, authors_anatomy_fit=None)
    changed = []
    if padding != AUTHORS_COMPOSE_PADDING:
        changed.append(f"reverse-loop composition padding {padding} (see compose_padding_change)")
        prov["compose_padding_change"] = BORDER_MEASUREMENT
    if cfg.input_padding:
        changed.append(f"{cfg.input_padding} px of mirrored image around the network's input "
                       "(see input_padding_change)")
        prov["input_padding_change"] = INPUT_PADDING_MEASUREMENT
    if cfg.background_margin is not None:
        changed.append(f"the field beyond {cfg.background_margin} px of the anatomy extended harmonically "
                       "(see background_margin_change)")
        prov["background_margin_change"] = BACKGROUND_MEASUREMENT
    if cfg.anatomy_fit is not None:
        changed.append(f"the reverse loop on a square around the anatomy with {cfg.anatomy_fit} px free around it "
                       "(see anatomy_fit_change)")
        prov["anatomy_fit_change"] = ANATOMY_FIT_MEASUREMENT
    if changed:
        word = "one inference setting" if len(changed) == 1 else f"{len(changed)} inference settings"
        prov["change"] += f"; {word} changed: " + "; ".join(changed)
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
    ap.add_argument("--input-padding", type=int, default=DEFAULT_INPUT_PADDING, metavar="PX",
                    help="pixels of mirrored image around the network's input stored in the file: 8 (default; "
                         "less folding and no foreground pushed out of view on held-out slices, recorded in the "
                         "provenance) or 0 (the authors' setting)")
    ap.add_argument("--background-margin", default=str(DEFAULT_BACKGROUND_MARGIN), metavar="PX|off",
                    help="pixels kept around the anatomy before the field is extended into the background, stored "
                         "in the file: 8 (default; fewer folds in empty background, the anatomy's field unchanged, "
                         "recorded in the provenance) or off (the authors' behaviour)")
    ap.add_argument("--anatomy-fit", default=str(DEFAULT_ANATOMY_FIT), metavar="PX|off",
                    help="pixels of the model's view kept free around the anatomy, stored in the file: 16 "
                         "(default; a small anatomy in a wide view is stretched less, recorded in the provenance) "
                         "or off (the whole image, the authors' behaviour)")


def run(args) -> int:
    try:
        sha = convert_upstream(args.pth, args.out, args.name, args.overwrite, args.compose_padding,
                               args.input_padding, args.background_margin, args.anatomy_fit)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (sha256 {sha}) from {args.pth}; composition padding {args.compose_padding}, "
          f"input padding {args.input_padding} px, background margin {args.background_margin}, "
          f"anatomy fit {args.anatomy_fit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
