"""The `edgeloop` command.

Subcommands are plugged in through the ``edgeloop.commands`` entry-point group: each entry points
at a ``register(subparsers)`` function that adds its parser and sets ``func`` on it. That keeps
this package free of imports from the rest of edgeloop, and lets a deployment add its own
commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from shared.errors import EdgeloopError
from shared.log import configure_logging

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeloop",
        description="edgeloop: an edge-cloud agent framework (edge SDK, cloud agent, protocol).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="log line format"
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for entry in sorted(entry_points(group="edgeloop.commands"), key=lambda e: e.name):
        entry.load()(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    configure_logging(args.log_level, args.log_format)
    try:
        code = func(args)
    except EdgeloopError as exc:
        print(f"edgeloop: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
