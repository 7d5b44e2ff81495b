"""The metrics file: one JSON object per line, ``{"step", "split", "time", **values}``.

A value that is not finite is written as ``null`` (JSON has no NaN). A last line without its
newline is a write cut short (a killed run, or a reader racing the writer) and is not a record.
"""

from __future__ import annotations

import json
import math
from numbers import Real
from pathlib import Path
from typing import Any

SPLITS = ("train", "valid")
RESERVED = ("step", "split", "time")

Record = dict[str, Any]


class MetricsError(ValueError):
    """A metrics file or value that cannot be used; the message says what and where."""


def encode(step: int, split: str, time: float, values: dict[str, float]) -> str:
    """One line of the metrics file (with its newline), after checking every field."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise MetricsError(f"step must be an integer >= 0, got {step!r}")
    if split not in SPLITS:
        raise MetricsError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    record: Record = {"step": step, "split": split, "time": time}
    for key, value in values.items():
        if not isinstance(key, str) or not key or key in RESERVED:
            raise MetricsError(f"metric name {key!r}: must be a non-empty string other than {RESERVED}")
        if isinstance(value, bool) or not isinstance(value, Real):
            raise MetricsError(f"metric {key!r} = {value!r}: must be an int or float")
        record[key] = value if isinstance(value, int) else (float(value) if math.isfinite(value) else None)
    return json.dumps(record, allow_nan=False) + "\n"


def read_records(path: Path) -> list[Record]:
    """Every record of ``path`` in file order; a malformed line raises with file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetricsError(f"{path}: no metrics file (a run writes metrics.jsonl at its first log)") from None
    except UnicodeDecodeError as err:
        raise MetricsError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    # The last piece is "" after a final newline, else a cut-short write: never a record.
    lines = text.split("\n")[:-1]
    return [_decode(line, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]


def _decode(line: str, where: str) -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise MetricsError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise MetricsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise MetricsError(f"{where}: 'step' must be an integer >= 0, got {step!r}")
    if record.get("split") not in SPLITS:
        raise MetricsError(
            f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {record.get('split')!r}"
        )
    for key, value in record.items():
        if key != "split" and value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
            raise MetricsError(f"{where}: {key!r} = {value!r}: values must be numbers or null")
    return record
