"""Configuration: dataclass sections, TOML presets and files, command-line overrides, checks."""

from nam_trainer.config.loader import (
    DEFAULT_PRESET,
    PRESETS,
    load_config,
    parse_overrides,
    preset_text,
    saved_config,
    to_toml,
)
from nam_trainer.config.schema import Config, ConfigError
from nam_trainer.config.validate import Checked, ParallelSizes, check

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Checked",
    "Config",
    "ConfigError",
    "ParallelSizes",
    "check",
    "load_config",
    "parse_overrides",
    "preset_text",
    "saved_config",
    "to_toml",
]
