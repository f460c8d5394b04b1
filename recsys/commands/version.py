from __future__ import annotations

import argparse

from recsys import __version__


def _version(_args: argparse.Namespace) -> int:
    print(f"recsys {__version__}")
    return 0


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("version", help="print the version", description="Print the version.")
    parser.set_defaults(handler=_version)
