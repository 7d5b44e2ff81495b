"""Layered configuration: defaults < preset < TOML files < command-line overrides.

Overrides are data (``--section.key value``, ``--section.key=value``, nested tables too:
``--model.moe.top_k 4``), parsed by the type of the field they set, so ``--data.cache_dir /tmp/x``
is a string and ``--training.steps 10`` an integer. ``[model]`` starts from the nam-spec model
preset ``model.preset`` names. Every value remembers where it came from, and every error names
that origin.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import nam_spec
from nam_trainer.config.schema import SECTIONS, Config, ConfigError

PRESETS = ("nam56r", "nam56r-small", "nam56r-tiny", "cppmega-nam56r")
DEFAULT_PRESET = "nam56r-tiny"
# [model] preset = NAME: the nam-spec model preset the [model] keys of every layer apply to
MODEL_PRESET_KEY = "preset"


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return resources.files("nam_trainer.config").joinpath("presets", f"{name}.toml").read_text()


def load_config(
    preset: str = DEFAULT_PRESET, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> Config:
    """Build and check a Config from a preset, TOML files over it, then ``--section.key value`` pairs.

    ``[model]`` starts from the nam-spec model preset that ``model.preset`` names (set by the
    trainer preset, a file or the command line) and takes every other ``[model]`` key over it."""
    values: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    _merge(values, origins, _parse_toml(preset_text(preset), f"preset {preset!r}"), f"preset {preset!r}")
    for path in files:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"config file {str(path)!r}: cannot read it ({err.strerror})") from err
        _merge(values, origins, _parse_toml(text, f"config file {str(path)!r}"), f"config file {str(path)!r}")
    _merge(values, origins, parse_overrides(overrides), "the command line")
    return _build(values, origins)


def saved_config(saved: dict[str, Any], origin: str, overrides: Sequence[str] = ()) -> Config:
    """The Config a run saved (``Config.to_dict()``, e.g. in a checkpoint), with ``--section.key
    value`` overrides over it; ``origin`` names where it was saved for messages."""
    values: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    _merge(values, origins, saved, origin)
    _merge(values, origins, parse_overrides(overrides), "the command line")
    return _build(values, origins)


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``["--data.cache_dir", "x", "--model.moe.top_k=4"]`` -> {"data": {"cache_dir": "x"}, "model":
    {"moe": {"top_k": 4}}}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"command-line argument {arg!r}: expected --section.key VALUE or --section.key=VALUE"
            )
        key, sep, raw = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(argv):
                raise ConfigError(f"command-line argument {arg!r}: missing its value")
            raw = argv[i + 1]
            i += 1
        path = tuple(key.split("."))
        field_type = _field_type(path, "the command line")
        table = out
        for part in path[:-1]:
            table = table.setdefault(part, {})
        table[path[-1]] = _parse_cli_value(raw, field_type, f"--{key}")
        i += 1
    return out


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from err


def _merge(
    values: dict[str, Any], origins: dict[tuple[str, ...], str], layer: dict[str, Any], origin: str
) -> None:
    for section, table in layer.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{origin}: top-level key {section!r} is not a [section]; sections: {', '.join(SECTIONS)}"
            )
        _merge_table(values.setdefault(section, {}), origins, (section,), table, origin)


def _merge_table(
    into: dict[str, Any],
    origins: dict[tuple[str, ...], str],
    path: tuple[str, ...],
    table: dict[str, Any],
    origin: str,
) -> None:
    for name, value in table.items():
        key = (*path, name)
        field_type = _field_type(key, origin)
        if dataclasses.is_dataclass(field_type) and isinstance(value, dict):
            _merge_table(into.setdefault(name, {}), origins, key, value, origin)
        else:
            into[name] = value
            origins[key] = origin


def _field_type(path: tuple[str, ...], origin: str) -> Any:
    """The type of the field at ``path`` (section, key, nested keys), or a ConfigError naming what exists."""
    section = path[0]
    if section not in SECTIONS:
        raise ConfigError(
            f"{origin}: unknown section [{section}]{_suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}"
        )
    cls: Any = SECTIONS[section]
    if len(path) == 1:
        raise ConfigError(f"{origin}: [{section}] needs a key: --{section}.KEY VALUE")
    for depth, name in enumerate(path[1:], 1):
        where = ".".join(path[:depth])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{origin}: {where} is a value, not a table: {'.'.join(path)} does not exist")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in fields(cls)]
        if cls is SECTIONS["model"]:
            names.append(MODEL_PRESET_KEY)
            hints[MODEL_PRESET_KEY] = str
        if name not in names:
            raise ConfigError(
                f"{origin}: unknown key {where}.{name}{_suggest(name, names)}; keys of [{where}]: {', '.join(names)}"
            )
        cls = hints[name]
    return cls


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_cli_value(raw: str, field_type: Any, where: str) -> Any:
    if _accepts_str(field_type) and not raw.lstrip().startswith("{"):
        return raw
    if typing.get_origin(field_type) in (list, tuple) and not raw.lstrip().startswith("["):
        item = typing.get_args(field_type)[0]
        as_text = item is str or (hasattr(item, "SHORTHAND") and not raw.lstrip().startswith("{"))
        return [raw] if as_text else [_toml_value(raw, where)]
    return _toml_value(raw, where)


def _accepts_str(field_type: Any) -> bool:
    if field_type is str:
        return True
    if typing.get_origin(field_type) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(field_type))
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(field_type))
    return False


def _toml_value(raw: str, where: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"{where} {raw!r}: not a value (a number, true/false, a [list] or a {{table}})"
        ) from err


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_type(value: Any, field_type: Any, where: str) -> Any:
    """The value converted to the field's type, or a ConfigError saying what was expected."""
    origin = typing.get_origin(field_type)
    if origin is typing.Literal:
        accepted = typing.get_args(field_type)
        if value not in accepted:
            raise ConfigError(f"{where} = {value!r}: accepted values are {', '.join(map(repr, accepted))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(field_type):
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err).split(": ", 1)[-1])
        raise ConfigError(f"{where} = {value!r}: {' or '.join(errors)}")
    if dataclasses.is_dataclass(field_type):
        return _table_item(value, field_type, where)
    if origin in (list, tuple):
        item = typing.get_args(field_type)[0]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} = {value!r}: expected a list of {_NAMES.get(item, item.__name__)}")
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin in (dict, collections.abc.Mapping):
        key_type, value_type = typing.get_args(field_type)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table")
        return {
            _check_type(k, key_type, where): _check_type(v, value_type, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if field_type is int and isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if not isinstance(value, field_type):
        raise ConfigError(f"{where} = {value!r}: expected {_NAMES.get(field_type, field_type.__name__)}")
    return value


def _table_item(value: Any, cls: Any, where: str) -> Any:
    """A table inside a list (``[[data.sources]]``) as ``cls``; a string is the table of its SHORTHAND field."""
    if isinstance(value, str) and hasattr(cls, "SHORTHAND"):
        value = {cls.SHORTHAND: value}
    if not isinstance(value, dict):
        accepted = f"a table or a string ({cls.SHORTHAND})" if hasattr(cls, "SHORTHAND") else "a table"
        raise ConfigError(f"{where} = {value!r}: expected {accepted}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in value:
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, names)}; keys: {', '.join(names)}")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in value.items()})


def _build(values: dict[str, Any], origins: dict[tuple[str, ...], str]) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        table = dict(values.get(section, {}))
        if section == "model":
            name = table.pop(MODEL_PRESET_KEY, DEFAULT_PRESET)
            if not isinstance(name, str) or name not in nam_spec.PRESETS:
                raise ConfigError(
                    f"model.preset = {name!r} (set by {origins.get(('model', MODEL_PRESET_KEY), 'the defaults')}): "
                    f"no such nam-spec model preset; accepted: {', '.join(nam_spec.PRESETS)}"
                )
            sections[section] = _apply(nam_spec.PRESETS[name], table, (section,), origins)
            continue
        try:
            sections[section] = _apply(cls(), table, (section,), origins)
        except ConfigError as err:
            if "(set by " in str(err):  # a type error, which names its layer already
                raise
            raise ConfigError(f"{err} (set by {_origin_of(str(err), section, origins)})") from err
    return Config(**sections)


def _apply(
    base: Any, table: dict[str, Any], path: tuple[str, ...], origins: dict[tuple[str, ...], str]
) -> Any:
    """``base`` (a dataclass) with ``table``'s values, type-checked, nested tables applied recursively."""
    hints = typing.get_type_hints(type(base))
    changes = {}
    for name, value in table.items():
        key = (*path, name)
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            changes[name] = _apply(getattr(base, name), value, key, origins)
            continue
        try:
            changes[name] = _check_type(value, hints[name], ".".join(key))
        except ConfigError as err:
            raise ConfigError(f"{err} (set by {origins[key]})") from err
    return dataclasses.replace(base, **changes)


def _origin_of(message: str, section: str, origins: dict[tuple[str, ...], str]) -> str:
    """Which layer set the key a section's own check complains about (the key the message names first)."""
    named = [
        (at, origin)
        for key, origin in origins.items()
        if key[0] == section
        for at in (message.find(f"{'.'.join(key)} "), message.find(f"{'.'.join(key)}["))
    ]
    named = [(at, origin) for at, origin in named if at >= 0]
    return min(named)[1] if named else "the defaults"


def to_toml(config: Config) -> str:
    """The full configuration as TOML; loading it back gives the same Config whatever the preset."""
    lines: list[str] = []
    for section, table in config.to_dict().items():
        _table_lines(lines, section, table)
    return "\n".join(lines)


def _table_lines(lines: list[str], name: str, table: dict[str, Any]) -> None:
    lines.append(f"[{name}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict) and k != "recompute"}
    lines.extend(f"{k} = {_toml_literal(v)}" for k, v in table.items() if k not in nested)
    lines.append("")
    for key, sub in nested.items():
        _table_lines(lines, f"{name}.{key}", sub)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_literal(str(k))} = {_toml_literal(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(f"no TOML literal for {value!r}")
