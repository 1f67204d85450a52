"""Configuration loading: a TOML file, overridden by environment variables, overridden by
command-line options, validated by pydantic.

Environment variables are named ``{prefix}{SECTION}__{KEY}`` in upper case (``EDGELOOP_CLOUD__PORT``
sets ``cloud.port``). Every problem is raised as one `ConfigError` that names the dotted key and
where its value came from, so a wrong setting is fixed without reading a traceback.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from shared.errors import ConfigError

__all__ = ["load_config"]

M = TypeVar("M", bound=BaseModel)


_SECRET_NAMES = ("key", "token", "password", "secret")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]*@")


def _shown(name: str, value: Any) -> str:
    """A rejected value as an error message may show it: never a secret, and a URL without
    its password."""
    if any(part in name.lower() for part in _SECRET_NAMES):
        return "a value not shown"
    return _URL_PASSWORD.sub(r"\1***@", repr(value))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError("<file>", f"configuration file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from exc


def _env_overrides(
    env: Mapping[str, str], prefix: str
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    tree: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for name, value in env.items():
        if not name.startswith(prefix) or name == prefix:
            continue
        path = tuple(part.lower() for part in name[len(prefix) :].split("__"))
        if any(not part for part in path):
            raise ConfigError(name, "empty key segment in environment variable name", name)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), "set both as a value and as a section", name)
            node = child
        node[path[-1]] = value
        origins[path] = name
    return tree, origins


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_config(
    model: type[M],
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    prefix: str = "EDGELOOP_",
    overrides: Iterable[tuple[str, Any, str]] = (),
) -> M:
    """Build `model` from an optional TOML file, the environment (which wins over the file) and
    `overrides` (which win over both): ``(dotted key, value, source)`` triples, the source being
    what set the value, e.g. ``("backend.model_path", path, "--model")``.

    Raises `ConfigError` naming the first bad key, its source, and what is wrong with it.
    """
    file_data = _read_file(Path(path)) if path is not None else {}
    env_tree, origins = _env_overrides(os.environ if env is None else env, prefix)
    data = _merge(file_data, env_tree)
    for key, value, given_by in overrides:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
        origins[(*sections, name)] = given_by
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(str(part) for part in first["loc"])
        key = ".".join(loc) or "<root>"
        source = origins.get(loc) or (str(path) if path is not None else None)
        problem = first["msg"]
        if "input" in first and first["type"] != "missing":
            problem += f" (got {_shown(loc[-1] if loc else '', first['input'])})"
        raise ConfigError(key, problem, source) from exc
