"""YAML settings files and ``--set key=value`` overrides: read, parse, set and flatten as plain dicts, then
checked into typed dataclasses (:func:`from_dict`), or set on a dataclass already built
(:func:`set_typed`). Shared by run configs (config.py) and sweep files
(jobs/sweep_config.py); torch-free.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from mae_ray.errors import ConfigError


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); a syntax error is one line with its place."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` -> (key, the value read as YAML, or the text when it is not YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. model.mask_ratio=0.6), got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text; the type check will judge it
    return key.strip(), value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key`` "a.b", making sections as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    node[leaf] = value


def set_typed(obj: Any, key: str, value: Any) -> None:
    """``obj.a.b = value`` for ``key`` "a.b" on nested dataclasses, ``value`` checked against the field's type as
    :func:`from_dict` checks it (a mapping given for a section builds that section from it); unknown keys are
    the same errors as there."""
    *parents, leaf = key.split(".")
    node, prefix = obj, ""
    for part in [*parents, leaf]:
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"--set {key}: '{prefix.rstrip('.')}' is a value, not a section")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            section = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(f"unknown key '{prefix}{part}'; valid keys in {section}: {', '.join(names)}")
        if part == leaf:
            typ = typing.get_type_hints(type(node))[part]
            if dataclasses.is_dataclass(typ):
                value = from_dict(typ, value if value is not None else {}, f"{prefix}{part}.")
            else:
                value = _coerce(value, typ, f"{prefix}{part}")
            setattr(node, part, value)
            return
        node, prefix = getattr(node, part), f"{prefix}{part}."


def flatten(d: dict[str, Any], prefix: str = ""):
    """(dotted key, value) for every leaf of nested dicts."""
    for key, value in d.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, type-checking every value; unknown keys are errors."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            section = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys in {section}: {', '.join(names)}")
    kwargs = {}
    for key, value in data.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against annotation ``typ``; ints pass as floats and numeric strings as numbers."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        typ = inner[0] if len(inner) == 1 else typ
    if typ is bool and isinstance(value, bool):
        return value
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as text
            try:
                return float(value)
            except ValueError:
                pass
    if typ is str and isinstance(value, str):
        return value
    if (typ is list and isinstance(value, list)) or (typ is dict and isinstance(value, dict)):
        return value
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")
