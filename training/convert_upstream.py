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
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .data import ensure_core

ensure_core()

from napari_drdm.checkpoint import CheckpointError, file_sha256, read_checkpoint, write_checkpoint  # noqa: E402

__all__ = ["UPSTREAM", "convert_upstream"]

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


def convert_upstream(pth, out, name: str = "cmr2d", overwrite: bool = False) -> str:
    """Write ``out`` from the reference-format ``pth``; returns the new file's sha256.

    Args:
        pth: the published state_dict (read with ``torch.load(weights_only=True)``).
        out: the ``.safetensors`` file to write.
        name: model name stored in the configuration.
        overwrite: replace an existing ``out``.
    """
    import torch
    state, cfg, _ = read_checkpoint(pth, size=256)
    if cfg.ndim != 2:
        raise CheckpointError(f"{pth}: expected the 2D published checkpoint, found a {cfg.ndim}D network")
    cfg.extra = {"name": name, "source": "published checkpoint (converted)"}
    prov = dict(UPSTREAM, converted_by="napari-drdm training/convert_upstream.py",
                converted_from=Path(pth).name, converted_from_sha256=file_sha256(pth),
                change="tensors copied unchanged from the PyTorch state_dict into safetensors; "
                       "configuration and this record added")
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


def run(args) -> int:
    try:
        sha = convert_upstream(args.pth, args.out, args.name, args.overwrite)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (sha256 {sha}) from {args.pth}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
