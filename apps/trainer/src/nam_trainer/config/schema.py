"""The configuration as data: one frozen dataclass per TOML section.

``[model]`` is nam-spec's ``ModelConfig`` itself (nested tables ``[model.moe]``, ``[model.mamba]``
...), and ``[parallel]`` extends nam-spec's ``ParallelConfig`` with what only the trainer knows:
there is one model schema in the project, and it is nam-spec's. The sections defined here are the
trainer's own. Every field has a default so that a preset only states what it changes; ranges
that a single field can check are checked here, where the field is defined. Checks that involve
several fields or the world size live in ``validate.py`` (with nam-spec's model checks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import nam_spec


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says which key, its value and what is accepted."""


def _at_least(section: object, name: str, minimum: float) -> None:
    value = getattr(section, name)
    if value < minimum:
        raise ConfigError(f"{section.SECTION}.{name} = {value!r}: must be >= {minimum}")  # type: ignore[attr-defined]


def _one_of(section: object, name: str, accepted: tuple[str, ...]) -> None:
    value = getattr(section, name)
    if value not in accepted:
        raise ConfigError(
            f"{section.SECTION}.{name} = {value!r}: accepted values are {', '.join(map(repr, accepted))}"  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class TokenizerConfig:
    """A byte-level BPE trained on the training split, or a tokenizer.json given by path."""

    SECTION: ClassVar[str] = "tokenizer"
    # a `tokenizers` tokenizer.json (at most model.vocab_size tokens); "" = train a byte-level BPE of
    # model.vocab_size tokens (cached)
    path: str = ""
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"

    def __post_init__(self) -> None:
        _at_least(self, "min_frequency", 1)
        if self.eos_token == self.pad_token or not self.eos_token or not self.pad_token:
            raise ConfigError(
                f"tokenizer.eos_token = {self.eos_token!r}, tokenizer.pad_token = {self.pad_token!r}: "
                "need two distinct non-empty tokens"
            )


@dataclass(frozen=True)
class SourceConfig:
    """One source of documents (a ``[[data.sources]]`` table; a plain string is ``{path = STRING}``)."""

    SHORTHAND: ClassVar[str] = "path"
    # a directory (recursive), a file, a glob (*, ?, [...], **); files ending in .jsonl, .jsonl.gz,
    # .jsonl.zst or .parquet hold one document per record
    path: str = ""
    weight: float = 1.0  # share of the training samples, relative to the other sources' weights
    include: list[str] = field(
        default_factory=list
    )  # file name endings to keep, e.g. [".h", ".cpp"]; [] = all
    exclude: list[str] = field(default_factory=list)  # file name endings to leave out
    text_key: str = "text"  # the JSONL field or Parquet column holding the text


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is split, packed and cached."""

    SECTION: ClassVar[str] = "data"
    # [] = the C++ standard library headers of the machine's C++ compiler
    sources: list[SourceConfig] = field(default_factory=list)
    compiler: str = ""  # "" = the first of c++, g++, clang++ on PATH (only for the default corpus)
    validation_fraction: float = (
        0.05  # of each source's documents (files or records); 0 = no validation split
    )
    split_seed: int = 0  # rows are model.seq_length tokens long
    structure: str = "cpp"  # structure channels from nam-embed's C++ extractor, or "none"
    # keep the documents of a packed row apart: attention, Mamba and M2RNN states and convolutions
    # restart at each document (and never cross a pad token); false lets them see across, as before
    document_masking: bool = True
    cache_dir: str = "~/.cache/nam-train"
    workers: int = 0  # processes preparing the data; 0 = one per CPU core this process may use

    def __post_init__(self) -> None:
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction = {self.validation_fraction!r}: must be in [0, 1)")
        _at_least(self, "workers", 0)
        for i, source in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if not source.path:
                raise ConfigError(f"{where}.path = '': need a directory, file, glob, JSONL or Parquet file")
            if not (source.weight > 0 and math.isfinite(source.weight)):
                raise ConfigError(f"{where}.weight = {source.weight!r}: must be a finite number > 0")
            if not source.text_key:
                raise ConfigError(
                    f"{where}.text_key = '': need the JSONL field or Parquet column holding the text"
                )
            for name in ("include", "exclude"):
                if "" in getattr(source, name):
                    raise ConfigError(f"{where}.{name} has '': give file name endings such as '.h'")
        _one_of(self, "structure", ("cpp", "none"))


@dataclass(frozen=True)
class TrainingConfig:
    """The optimisation schedule (consumed by the training loop)."""

    SECTION: ClassVar[str] = "training"
    steps: int = 200
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 1234  # precision and recompute are the model's: model.params_dtype, model.recompute
    eval_interval: int = 50
    eval_iters: int = 4  # validation batches (of global_batch_size rows) per evaluation
    # steps in a row with a non-finite loss (each skipped: no optimizer update) that stop the run (exit 3)
    max_consecutive_skips: int = 5
    # torch's fused AdamW: one pass over params, grads and moments instead of the foreach path's
    # several (bench/RESULTS.md, H100: nam56r-small's step 1289 -> 1108 ms, the same gradients)
    fused_adam: bool = True

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "micro_batch_size",
            "global_batch_size",
            "eval_interval",
            "eval_iters",
            "max_consecutive_skips",
        ):
            _at_least(self, name, 1)
        for name in ("warmup_steps", "weight_decay", "clip_grad", "min_lr"):
            _at_least(self, name, 0)
        if not self.lr > 0:
            raise ConfigError(f"training.lr = {self.lr!r}: must be > 0")
        if self.warmup_steps >= self.steps:
            raise ConfigError(
                f"training.warmup_steps = {self.warmup_steps}: must be < training.steps = {self.steps}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"training.min_lr = {self.min_lr!r}: must be <= training.lr = {self.lr!r}")


@dataclass(frozen=True)
class ParallelConfig(nam_spec.ParallelConfig):
    """nam-spec's parallel sizes, and the trainer's: data parallelism (what the world size leaves)
    and the distributed optimizer."""

    SECTION: ClassVar[str] = "parallel"
    data: int = -1  # -1 = world size / (tensor * pipeline)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "virtual_pipeline", "expert"):
            _at_least(self, name, 1)
        _at_least(self, "expert_tensor", 0)
        if self.data != -1 and self.data < 1:
            raise ConfigError(f"parallel.data = {self.data!r}: must be >= 1, or -1 to follow the world size")


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often the loop writes dist_checkpointing checkpoints."""

    SECTION: ClassVar[str] = "checkpoint"
    dir: str = "runs/nam-train"  # the run directory: checkpoints, metrics.jsonl, tb/
    interval: int = 100  # steps between checkpoints (also written on SIGTERM/SIGINT and at the end)
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in dir, if any
    # resume checkpoints trained on other data (fine-tuning on purpose); a changed tokenizer is always refused
    allow_new_data: bool = False

    def __post_init__(self) -> None:
        _at_least(self, "interval", 1)
        _at_least(self, "keep_last", 1)


@dataclass(frozen=True)
class PlasticityConfig:
    """nam-plasticity's plan: FIRE, DASH and ReDo at scheduled steps, and the STP regulariser.

    A schedule runs at the steps in ``*_at`` and every ``*_every`` steps (0 = never) after ``*_start``.
    All off by default.
    """

    SECTION: ClassVar[str] = "plasticity"
    fire_at: list[int] = field(default_factory=list)
    fire_every: int = 0
    fire_start: int = 0
    fire_mode: str = "all"  # "all" blocks, or only attention "qk"
    dash_at: list[int] = field(default_factory=list)
    dash_every: int = 0
    dash_start: int = 0
    dash_lambda: float = 0.3  # lower bound of DASH's per-row shrink factor
    dash_alpha: float = 0.0  # gradient EMA weight, 0 = the step's gradient alone
    redo_at: list[int] = field(default_factory=list)
    redo_every: int = 0
    redo_start: int = 0
    redo_tau: float = 0.1  # dormancy threshold on the normalised activation score
    stp: bool = False
    stp_layers: list[int] = field(default_factory=list)  # global 1-based layers; [] = every R layer
    stp_lambda: float = 0.02
    stp_start: int = 0
    stp_warmup: int = 0
    stp_form: str = "straight"
    stp_samples: int = 64

    def __post_init__(self) -> None:
        for name in ("fire_every", "fire_start", "dash_every", "dash_start", "redo_every", "redo_start"):
            _at_least(self, name, 0)
        for name in ("stp_lambda", "stp_start", "stp_warmup", "redo_tau"):
            _at_least(self, name, 0)
        _at_least(self, "stp_samples", 1)
        _one_of(self, "fire_mode", ("all", "qk"))
        _one_of(self, "stp_form", ("straight", "span"))
        if not 0 <= self.dash_lambda <= 1:
            raise ConfigError(f"plasticity.dash_lambda = {self.dash_lambda!r}: must be in [0, 1]")
        if not 0 <= self.dash_alpha <= 1:
            raise ConfigError(f"plasticity.dash_alpha = {self.dash_alpha!r}: must be in [0, 1] (0 = no EMA)")
        for name in ("fire_at", "dash_at", "redo_at", "stp_layers"):
            if any(v < 1 for v in getattr(self, name)):
                raise ConfigError(f"plasticity.{name} = {getattr(self, name)!r}: steps and layers are >= 1")


@dataclass(frozen=True)
class Config:
    model: nam_spec.ModelConfig = field(default_factory=nam_spec.ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plasticity: PlasticityConfig = field(default_factory=PlasticityConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Section -> its fields, nested tables as dicts (``[model.moe]`` as ``model["moe"]``)."""
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}  # type: ignore[misc]
