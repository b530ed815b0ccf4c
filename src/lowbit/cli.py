"""The ``lowbit`` command line: a thin argparse front over the library.

Each command group lives in ``lowbit.commands.<name>`` and registers its sub-parsers; heavy
imports happen inside the handlers so ``lowbit --help`` stays fast. Every LowbitError becomes
one ``error:`` line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lowbit.errors import LowbitError

COMMAND_MODULES = ("data", "train", "classify", "eval", "run", "study", "report", "export")


def build_parser() -> argparse.ArgumentParser:
    """The root parser with every command group registered."""
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Compress GANs and CNN classifiers to 1-8 bits: quantization-aware training, "
        "precision search, FID/IS evaluation and packed CPU export.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"lowbit.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except LowbitError as exc:
        if args.debug:
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
