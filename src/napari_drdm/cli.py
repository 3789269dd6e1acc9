"""The ``drdm`` command line.  Each sub-command lives in ``napari_drdm.commands.<name>`` with
``add_parser(subparsers)`` and ``run(args) -> int``; this file only dispatches."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from . import __version__

#: sub-command modules, in help order
COMMANDS = ["generate", "evaluate", "augment", "synthesize_pairs", "weights", "info"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drdm", description="Deformation-Recovery Diffusion Model: random, anatomically plausible "
        "deformations of medical images, for augmentation and registration training.")
    parser.add_argument("--version", action="version", version=f"napari-drdm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"napari_drdm.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"napari_drdm.commands.{name}":
                continue
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("drdm: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"drdm {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
