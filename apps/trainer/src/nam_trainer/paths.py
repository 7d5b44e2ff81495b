"""The directories a command writes, checked before any work that would be lost without them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from nam_trainer.config import ConfigError


def usable_dir(value: str, key: str) -> Path:
    """``value`` (the config ``key``) as a directory that exists and takes files: created when
    missing, else a ConfigError saying why it cannot be used."""
    path = Path(value).expanduser()
    where = f"{key} = {value!r}"
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{where} is a file, not a directory; give a directory (it is created when missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"{where}: cannot create it ({err.strerror}); give a directory you can write"
        ) from err
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(
            f"{where}: cannot write in it ({err.strerror}); give a directory you can write"
        ) from err
    return path
