"""`plait` command line. Each subcommand is a small function registered in COMMANDS; errors a user
can cause (PlaitError) are printed without a traceback and exit with status 2."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from rich.console import Console

from plait.ir.errors import PlaitError

# Piped output (files, CI logs, tests) gets a wide console so tables are not squeezed to 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, soft_wrap=True, width=_WIDTH)

DESCRIPTION = ("plait plans, compiles and runs the parallel training of Transformer, Mixture-of-Experts "
               "and hybrid Mamba models from spec files, and plans their structured pruning.")

# name -> (add_arguments, run). Subcommands register themselves below.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str):
    def register(fn):
        COMMANDS[name] = (getattr(fn, "arguments", lambda p: None), fn)
        fn.help = help
        return fn
    return register


def arguments(setup: Callable[[argparse.ArgumentParser], None]):
    def attach(fn):
        fn.arguments = setup
        return fn
    return attach


def build_parser() -> argparse.ArgumentParser:
    from plait import commands  # noqa: F401  (registers the subcommands)

    parser = argparse.ArgumentParser(prog="plait", description=DESCRIPTION,
                                     epilog="`plait COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (setup, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=fn.help)
        setup(p)
        p.set_defaults(run=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except PlaitError as e:
        err_console.print(e.format(), markup=False, highlight=False)
        return 2
    except BrokenPipeError:  # `plait ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as e:
        err_console.print(f"error: no such file: {e.filename}", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
