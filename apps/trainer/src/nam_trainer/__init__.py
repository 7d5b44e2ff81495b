"""nam-train: NAM56R training end to end on megatron-core.

``nam_trainer.config`` turns presets, TOML files and overrides into a checked Config;
``nam_trainer.data`` turns a corpus into cached, packed megatron indexed datasets.
"""

__version__ = "0.1.0"
