"""Reading the JSON input files the commands take (workloads, job items, intents), with errors
that name the file and line instead of a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.errors import InputFileError

__all__ = ["read_json", "read_jsonl"]


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read it ({exc})") from None


def read_json(path: Path) -> Any:
    """The JSON value in `path`."""
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: not valid JSON ({exc})") from None


def read_jsonl(path: Path, *, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file, one per non-blank line, each holding `required` keys."""
    rows = []
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise InputFileError(f"{path}:{number}: expected a JSON object")
        missing = [key for key in required if key not in row]
        if missing:
            raise InputFileError(f"{path}:{number}: no {', '.join(map(repr, missing))}")
        rows.append(row)
    return rows
