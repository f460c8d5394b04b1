"""The `recsys` command line.

Each command imports what it needs when it runs, so `recsys --help` and `recsys version`
work with the `serve` extra alone and never import TensorFlow. Errors are one line on
stderr naming the flag at fault, with a non-zero exit; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from recsys.errors import RecsysError

Handler = Callable[[argparse.Namespace], int]


# Command modules under recsys.commands, in the order `recsys --help` lists them.
COMMAND_MODULES = ("build", "evaluate", "serve", "up", "client", "catalogue", "store", "version")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="A multi-stage recommender: offline training and async gRPC serving.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    commands.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"recsys.commands.{name}").register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `recsys store list | head`: the reader left, nothing to report
        return 0
    except (RecsysError, ValueError, OSError) as error:
        if args.debug:
            raise
        print(f"recsys {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
