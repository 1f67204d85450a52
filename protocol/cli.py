"""`edgeloop protocol ...`: publish and inspect the protocol."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from protocol.schema import SCHEMA_DIR, stale, write_all

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("protocol", help="protocol tools (schema generation)")
    sub = parser.add_subparsers(title="protocol commands", metavar="COMMAND", required=True)
    schema = sub.add_parser(
        "schema",
        help="write the JSON Schema and AsyncAPI documents and SPEC.md's reference sections",
    )
    schema.add_argument(
        "--out", type=Path, default=SCHEMA_DIR, help=f"output directory (default: {SCHEMA_DIR})"
    )
    schema.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files in --out differ from the code",
    )
    schema.set_defaults(func=_schema)


def _schema(args: argparse.Namespace) -> int:
    if args.check:
        names = stale(args.out)
        for name in names:
            print(f"stale: {name} (run `edgeloop protocol schema`)", file=sys.stderr)
        return 1 if names else 0
    for path in write_all(args.out):
        print(path)
    return 0
