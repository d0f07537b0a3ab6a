"""The ``densenet`` command: one subcommand per module of this package, each with ``register``
(``arguments`` holds the argument types they share).

Commands parse their arguments, call the library and print; they hold no logic of their own.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from densenet import __version__
from densenet.cli import (
    bench,
    convert,
    eval,
    explain,
    export,
    list_models,
    predict,
    summary,
    train,
)
from densenet.errors import DenseNetError

COMMANDS = (list_models, summary, train, eval, predict, explain, export, bench, convert)


class _Parser(argparse.ArgumentParser):
    """A parser whose usage errors are one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage first: for `train`, dozens of lines above the error.
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="densenet",
        description="Train, evaluate and deploy the DenseNets of Huang et al. (CVPR 2017).",
    )
    parser.add_argument("--version", action="version", version=f"densenet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except DenseNetError as error:
        print(f"densenet {args.command}: {error.label}: {error}", file=sys.stderr)
        return error.exit_status
    except KeyboardInterrupt:
        print(f"densenet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`densenet list | head`): stop quietly, as shell tools do, and
        # keep Python from reporting the failed flush of stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
