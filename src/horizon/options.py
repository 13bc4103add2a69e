"""Options as dataclass fields: each component owns a `Config` dataclass whose fields carry their
default, one line of help and their rule (`option(...)`); the command line, the TOML file, the
saved options of a run and the Python API all read these fields, so an option is added in one
place. Rules are checked once, when a config is constructed (`check_fields` in `__post_init__`),
and a bad value raises `ConfigError` naming the option as its flag (`--lr`).

This module knows nothing of argparse (cli.py generates the parser from the fields) or of any
component: it is the bottom of the package, beside `errors`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, field

from .errors import HorizonError


class ConfigError(HorizonError, ValueError):
    """A bad option value. `option` is the field name (None for a rule across fields)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option(default=MISSING, help: str = "", *, factory=None, metavar: str | None = None,
           choices: tuple | None = None, ge=None, gt=None, lt=None, le=None, path: bool = False,
           cli: bool = True, default_help: str | None = None, nargs: str | None = None, name: str | None = None):
    """A config field. `ge/gt/lt/le`: bounds (numbers must also be finite); `choices`: the
    allowed values; `path`: a filesystem path (anchored to a TOML file's directory);
    `default_help`: how --help states a default that is derived (e.g. "lr / 10");
    `cli=False`: a Python-API-only field (no flag); `name`: the option's name on the command
    line and in files when it differs from the attribute (`paths` -> `--data`)."""
    meta = dict(help=help, metavar=metavar, choices=choices, ge=ge, gt=gt, lt=lt, le=le, path=path, cli=cli,
                default_help=default_help, nargs=nargs, name=name)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- field kinds
def kind_of(f: dataclasses.Field, owner) -> tuple[str, bool]:
    """(base kind, optional) of a field: kind in int, float, str, bool, list, dict."""
    hints = typing.get_type_hints(owner)
    t = hints[f.name]
    optional = False
    origin = typing.get_origin(t)
    if origin is typing.Union or type(t).__name__ == "UnionType":
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = len(args) < len(typing.get_args(t))
        t = args[0]
        origin = typing.get_origin(t)
    if origin is list or t is list:
        return "list", optional
    if origin is dict or t is dict:
        return "dict", optional
    return {int: "int", float: "float", str: "str", bool: "bool"}.get(t, "str"), optional


def _bounds_text(m: dict) -> str:
    parts = []
    for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if m.get(key) is not None:
            parts.append(f"{op} {m[key]}")
    return " and ".join(parts)


def option_name(f: dataclasses.Field) -> str:
    """The name of a field's option on the command line (as --flag) and in files."""
    return f.metadata.get("name") or f.name


def check_value(name: str, value, kind: str, optional: bool, m: dict):
    """Checks one value against its field's rule; returns it (ints accepted where floats are
    asked, as TOML writes `lr = 1`). Raises ConfigError naming the flag."""
    fl = flag(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{fl} needs a value", name)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{fl} must be true or false, got {value!r}", name)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{fl} must be a string, got {value!r}", name)
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(f"{fl} must be one of {', '.join(m['choices'])}, got {value!r}", name)
        return value
    if kind == "dict":  # parsed from its text form by the owning config before the check
        if not isinstance(value, dict):
            raise ConfigError(f"{fl} must be a mapping, got {value!r}", name)
        return value
    if kind == "list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{fl} must be a path or a list of paths, got {value!r}", name)
        return list(value)
    bounds = _bounds_text(m)
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
        if ok:
            value = float(value)
    if ok:
        ok = ((m.get("ge") is None or value >= m["ge"]) and (m.get("gt") is None or value > m["gt"])
              and (m.get("le") is None or value <= m["le"]) and (m.get("lt") is None or value < m["lt"]))
    if not ok:
        raise ConfigError(f"{fl} must be {what}{' ' + bounds if bounds else ''}, got {value!r}", name)
    return value


_BYTE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
               "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12,
               "tib": 1 << 40}


def parse_bytes(name: str, value) -> int:
    """A byte count given as an int or a string with a unit ("8GiB", "512MB", "1.5G"; K/M/G/T
    alone are binary); raises ConfigError naming the flag."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        num = text.rstrip("kmgtib")
        unit = text[len(num):]
        try:
            n = float(num) * _BYTE_UNITS[unit] if num else None
        except (ValueError, KeyError):
            n = None
        if n is None or not math.isfinite(n):
            raise ConfigError(f"{flag(name)} must be a byte count such as 8GiB, 512MB or 1000000, got {value!r}", name)
        n = int(n)
    else:
        raise ConfigError(f"{flag(name)} must be a byte count such as 8GiB, 512MB or 1000000, got {value!r}", name)
    if n < 0:
        raise ConfigError(f"{flag(name)} must be >= 0 bytes, got {value!r}", name)
    return n


def check_fields(obj) -> None:
    """Validates (and normalises) every field of a config dataclass instance, in place."""
    for f in dataclasses.fields(obj):
        if dataclasses.is_dataclass(f.type) or _is_section(f, type(obj)):
            continue
        kind, optional = kind_of(f, type(obj))
        value = check_value(option_name(f), getattr(obj, f.name), kind, optional, f.metadata)
        object.__setattr__(obj, f.name, value)


def _is_section(f: dataclasses.Field, owner) -> bool:
    t = typing.get_type_hints(owner)[f.name]
    return dataclasses.is_dataclass(t)


def sections(cls) -> list[tuple[str, type]]:
    """The nested config dataclasses of a composite config: [(attribute, class)]."""
    return [(f.name, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls) if _is_section(f, cls)]


def leaf_fields(cls) -> list[tuple[str | None, dataclasses.Field, type]]:
    """Every option of a (possibly composite) config: [(section or None, field, owner class)]."""
    out = []
    for f in dataclasses.fields(cls):
        if _is_section(f, cls):
            sub = typing.get_type_hints(cls)[f.name]
            out += [(f.name, g, sub) for g in dataclasses.fields(sub)]
        else:
            out.append((None, f, cls))
    return out


def default_text(f: dataclasses.Field) -> str | None:
    """The default as --help states it: the field's own default, or its `default_help`."""
    if f.metadata.get("default_help"):
        return f.metadata["default_help"]
    if f.default is not MISSING and f.default is not None and f.default is not False:
        return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
    return None
