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


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that it ends a run like Ctrl-C (manifest written,
    temporary files removed, a message)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``drdm augment: error: ...``) and exit code 2."""

    def error(self, message):
        import re
        message = re.sub(r"^argument [^:]+: (?=--)", "", message)   # validators already name the option
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: the signal that asked the running command to stop ("interrupted": SIGINT, "terminated":
#: SIGTERM), kept even where the exception it raised was swallowed: a KeyboardInterrupt raised
#: inside a finalizer (``__del__``) is only printed, and the work would go on
_STOP = {"how": None}


def stop_requested():
    """``"interrupted"`` or ``"terminated"`` once Ctrl-C or SIGTERM reached :func:`main`, else None;
    long loops check it at their safe points (the export between batches)."""
    return _STOP["how"]


def _on_sigint(signum, frame):
    _STOP["how"] = "interrupted"
    raise KeyboardInterrupt()


def _on_sigterm(signum, frame):
    _STOP["how"] = "terminated"
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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


def _parse(parser, argv):
    """Parse, letting positional paths sit between options (``IN --per-image 2 OUT``)."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "paths", None), list):
        args.paths += [a for a in extra if not a.startswith("-")]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        choices = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
        choices.get(getattr(args, "command", None), parser).error("unrecognized arguments: " + " ".join(extra))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    import signal
    import threading

    from .errors import DRDMError, one_line
    from .paths import shown
    parser = build_parser()
    args = _parse(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    old = old_int = None
    _STOP["how"] = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:   # not where Ctrl-C is ignored
            old_int = signal.signal(signal.SIGINT, _on_sigint)
    try:
        rc = int(args._run(args) or 0)
        if _STOP["how"] is None:
            return rc
        # the signal came, but its exception was swallowed where Python ignores exceptions (a
        # finaliser, e.g. nibabel's OrderedSet.__del__): report it as if it had propagated
        raise Terminated() if _STOP["how"] == "terminated" else KeyboardInterrupt()
    except Terminated:
        print(f"drdm {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"drdm {args.command}: interrupted", file=sys.stderr)
        return 130
    except DRDMError as e:          # every error a user can cause: one line naming the input
        print(f"drdm {args.command}: error: {shown(one_line(e))}", file=sys.stderr)
        return 1
    except MemoryError as e:
        why = str(e) or "out of memory (no detail from the allocator); try a smaller --batch or a smaller image"
        print(f"drdm {args.command}: error: {shown(one_line(MemoryError(why)))}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:      # a file system refusal, or a check outside the package's own
        print(f"drdm {args.command}: error: {shown(one_line(e))}", file=sys.stderr)
        return 1
    except Exception as e:          # never a traceback for the user; -v shows it
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(f"drdm {args.command}: error: {type(e).__name__}: {shown(one_line(e))} (rerun with -v for details)",
              file=sys.stderr)
        return 1
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)


if __name__ == "__main__":
    sys.exit(main())
