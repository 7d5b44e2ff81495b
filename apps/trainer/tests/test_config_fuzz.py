"""Any TOML file and any command-line overrides: the configuration either loads and checks, or
fails with a ConfigError (one message for the user), never with another exception."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
import typing
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nam_trainer.config import ConfigError, check, load_config
from nam_trainer.config.schema import SECTIONS


def _keys(cls: type, prefix: str) -> list[str]:
    """The dotted keys of a section's dataclass, nested tables walked."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        out += _keys(t, f"{prefix}{f.name}.") if dataclasses.is_dataclass(t) else [f"{prefix}{f.name}"]
    return out


# Every key of every section, and a few that do not exist or are tables.
KEYS = sorted(
    {key for section, cls in SECTIONS.items() for key in _keys(cls, f"{section}.")}
    | {"model.preset", "model.attention", "training.stpes", "nosuch.key", "model.moe.top_k.x"}
)

SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, 1, -1, 2, 3, 4, 7, 64, 130, 10**11]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(
        ["auto", "local", "te", "cpp", "none", "selective", "NAM52", "nam56r", "[]", "{A = 1}", "[1, 2]"]
    ),
)
VALUES = st.one_of(
    SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=3), SCALARS, max_size=2)
)


def _toml(value: object) -> str:
    """A TOML literal of ``value``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)  # nan, inf, -inf: TOML's spelling
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _raw(value: object) -> str:
    """What a shell user types for ``value`` after --section.key."""
    return value if isinstance(value, str) else _toml(value)


@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    file_entries=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=3),
    overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES, st.booleans()), max_size=3),
    junk=st.sampled_from(["", "x", "[model", "= 1", "[[model]]\n", "model = 3\n", "\x00"]),
    world_size=st.sampled_from([1, 2, 0, -1, 8]),
)
# found by this test once: a model preset named by a list
@example(file_entries=[("model.preset", [])], overrides=[], junk="", world_size=1)
def test_any_config_and_overrides_give_a_config_or_a_config_error(
    file_entries: list[tuple[str, object]],
    overrides: list[tuple[str, object, bool]],
    junk: str,
    world_size: int,
) -> None:
    lines = [junk] if junk else []
    for key, value in file_entries:
        section, _, rest = key.partition(".")
        lines.append(f"[{section}]\n{rest} = {_toml(value)}")
    argv: list[str] = []
    for key, value, joined in overrides:
        argv += [f"--{key}={_raw(value)}"] if joined else [f"--{key}", _raw(value)]
    with tempfile.TemporaryDirectory(prefix="faults-cli-fuzz-") as tmp:
        path = Path(tmp) / "c.toml"
        path.write_text("\n".join(lines))
        with contextlib.suppress(ConfigError):  # anything else fails the test
            check(load_config("nam56r-tiny", [path], argv), world_size)
