"""Layered configuration: defaults < preset < TOML files < command-line overrides.

Overrides are data (``--section.key value`` or ``--section.key=value``), parsed by the type of
the field they set, so ``--data.cache_dir /tmp/x`` is a string and ``--training.steps 10`` an
integer. Every value remembers where it came from, and every error names that origin.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from nam_trainer.config.schema import SECTIONS, Config, ConfigError

PRESETS = ("nam56r", "nam56r-small", "nam56r-tiny")
DEFAULT_PRESET = "nam56r-tiny"


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; accepted: {', '.join(PRESETS)}")
    return resources.files("nam_trainer.config").joinpath("presets", f"{name}.toml").read_text()


def load_config(
    preset: str = DEFAULT_PRESET, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> Config:
    """Build and check a Config from a preset, TOML files over it, then ``--section.key value`` pairs."""
    values: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
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


def parse_overrides(argv: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["--data.seq_length", "128", "--tokenizer.path=x.json"]`` -> {"data": {"seq_length": 128}, ...}."""
    out: dict[str, dict[str, Any]] = {}
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
        section, _, name = key.partition(".")
        field_type = _field_type(section, name, "the command line")
        out.setdefault(section, {})[name] = _parse_cli_value(raw, field_type, f"--{key}")
        i += 1
    return out


def _parse_toml(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: not valid TOML: {err}") from err


def _merge(
    values: dict[str, dict[str, Any]],
    origins: dict[tuple[str, str], str],
    layer: dict[str, Any],
    origin: str,
) -> None:
    for section, table in layer.items():
        if not isinstance(table, dict):
            raise ConfigError(
                f"{origin}: top-level key {section!r} is not a [section]; sections: {', '.join(SECTIONS)}"
            )
        for name, value in table.items():
            _field_type(section, name, origin)
            values.setdefault(section, {})[name] = value
            origins[section, name] = origin


def _field_type(section: str, name: str, origin: str) -> Any:
    if section not in SECTIONS:
        raise ConfigError(
            f"{origin}: unknown section [{section}]{_suggest(section, SECTIONS)}; sections: {', '.join(SECTIONS)}"
        )
    hints = typing.get_type_hints(SECTIONS[section])
    names = [f.name for f in fields(SECTIONS[section])]
    if name not in names:
        raise ConfigError(
            f"{origin}: unknown key {section}.{name}{_suggest(name, names)}; keys of [{section}]: {', '.join(names)}"
        )
    return hints[name]


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse_cli_value(raw: str, field_type: Any, where: str) -> Any:
    if field_type is str:
        return raw
    if typing.get_origin(field_type) is list and not raw.lstrip().startswith("["):
        return [raw] if typing.get_args(field_type)[0] is str else [_toml_value(raw, where)]
    return _toml_value(raw, where)


def _toml_value(raw: str, where: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where} {raw!r}: not a value (a number, true/false, or a [list])") from err


def _check_type(value: Any, field_type: Any, where: str) -> Any:
    """The value converted to the field's type, or a ConfigError saying what was expected."""
    origin = typing.get_origin(field_type)
    if origin is list:
        (item,) = typing.get_args(field_type)
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected a list of {item.__name__}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if field_type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if field_type is int and isinstance(value, bool):
        raise ConfigError(f"{where} = {value!r}: expected an integer")
    if not isinstance(value, field_type):
        names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
        raise ConfigError(f"{where} = {value!r}: expected {names.get(field_type, field_type.__name__)}")
    return value


def _build(values: dict[str, dict[str, Any]], origins: dict[tuple[str, str], str]) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.get(section, {}).items():
            try:
                kwargs[name] = _check_type(value, hints[name], f"{section}.{name}")
            except ConfigError as err:
                raise ConfigError(f"{err} (set by {origins[section, name]})") from err
        try:
            sections[section] = cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{err} (set by {_origin_of(str(err), section, origins)})") from err
    return Config(**sections)


def _origin_of(message: str, section: str, origins: dict[tuple[str, str], str]) -> str:
    """Which layer set the key a section's own check complains about (the key the message names first)."""
    named = [
        (message.find(f"{sec}.{name} "), origin) for (sec, name), origin in origins.items() if sec == section
    ]
    named = [(at, origin) for at, origin in named if at >= 0]
    return min(named)[1] if named else "the defaults"


def to_toml(config: Config) -> str:
    """The full configuration as TOML; loading it back gives the same Config whatever the preset."""
    lines: list[str] = []
    for section, table in config.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{name} = {_toml_literal(value)}" for name, value in table.items())
        lines.append("")
    return "\n".join(lines)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")
