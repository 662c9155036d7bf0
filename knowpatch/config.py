"""Typed configs: dataclasses filled from YAML files and `key=value` overrides.

An unknown key is an error naming it (with the keys that exist), never a silent default;
a value that does not fit the field's type is an error naming the field and the value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import KnowpatchError, field_error

C = TypeVar("C")


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["lr=1e-3", "rank=4"]` → `{"lr": "1e-3", "rank": "4"}`."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KnowpatchError(f"override {item!r}: expected key=value (e.g. lr=1e-3)")
        out[key.strip()] = value.strip()
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise KnowpatchError(f"config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:  # one line: file, line, column, the parser's problem
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KnowpatchError(f"config: {where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise KnowpatchError(f"config: {path} must hold a mapping of key: value")
    return data


def build_config(cls: type[C], *sources: dict[str, Any] | None, where: str = "config") -> C:
    """Build `cls` from mappings applied in order (later wins); values may be strings."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for source in sources:
        for key, value in (source or {}).items():
            if key not in fields:
                raise KnowpatchError(
                    f"{where}: unknown key {key!r} (known keys: {', '.join(sorted(fields))})"
                )
            values[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**values)
    except KnowpatchError:
        raise
    except (TypeError, ValueError) as exc:
        raise KnowpatchError(f"{where}: {exc}") from None


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn `value` (possibly a string from the command line) into type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, name)
            except KnowpatchError:
                continue
        raise field_error(name, f"does not fit {tp}", value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise field_error(name, "must be a list", value)
        inner = args[0] if args else str
        items = [coerce(v, inner, name) for v in value]
        return items if origin is list else tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise field_error(name, "must be true or false", value)
    if tp is int:
        if isinstance(value, bool):
            raise field_error(name, "must be an integer", value)
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise field_error(name, "must be an integer", value) from None
        if as_float != int(as_float):
            raise field_error(name, "must be an integer", value)
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise field_error(name, "must be a number", value)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise field_error(name, "must be a number", value) from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise field_error(name, "must be a string", value)
        return str(value)
    return value


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
