"""``load``: a trained model from a checkpoint, without the training set-up.

    from nam_trainer import load
    loaded = load("runs/nam56r-tiny")      # the newest checkpoint of a run directory, or a checkpoint

The model is built from the configuration the checkpoint recorded (``config`` in its marker) with
its data-parallel world of this process (TP = PP = 1: dist_checkpointing reshards what was saved at
any other layout), and only the model's tensors are read: no optimizer state, schedule or RNG. It
comes back in eval mode, in bfloat16 on a GPU and float32 on the CPU, with the tokenizer it was
trained with (checked against the recorded sha256).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nam_trainer.config import Config, ConfigError, saved_config
from nam_trainer.data.cache import file_sha256
from nam_trainer.data.tokenizer import LoadedTokenizer, TokenizerError, load_tokenizer
from nam_trainer.train.checkpoint import MARKER, CheckpointError, find_latest
from nam_trainer.train.checkpoint import marker as markers


@dataclass
class Loaded:
    model: Any  # nam_spec.NamModel, eval mode, on this process's device
    tokenizer: LoadedTokenizer
    config: Config  # as saved, with any overrides
    step: int
    path: Path  # the checkpoint directory

    @property
    def device(self) -> torch.device:
        return self.model.output_layer.weight.device


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` itself when it is a complete checkpoint, else the newest of the run directory ``path``."""
    path = Path(path).expanduser()
    if (path / MARKER).is_file():
        return path
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
    raise CheckpointError(
        f"{path}: neither a checkpoint (a directory with {MARKER}) nor a run directory with one; "
        "pass --checkpoint RUN_DIR/checkpoints/step_N or a run directory that has trained"
    )


def load(path: str | Path, overrides: Sequence[str] = ()) -> Loaded:
    """The model, tokenizer and configuration of the checkpoint at ``path`` (a checkpoint or a run
    directory). ``overrides`` (``--section.key value``) change the saved configuration, e.g. the data
    to evaluate; the model's own keys cannot change. Sets up torch.distributed and megatron's
    parallel state (TP = PP = 1) when nothing has yet."""
    from megatron.core import dist_checkpointing

    from nam_runtime import dist
    from nam_runtime.megatron import import_before_enable, reset_moe_state
    from nam_spec import ParallelConfig, build_model

    ckpt = checkpoint_dir(path)
    meta = markers.read_marker(ckpt)
    if meta.get("config") is None or meta.get("trained_on") is None:
        raise CheckpointError(
            f"{ckpt}: the checkpoint records no configuration (saved by a nam-train before `eval` and "
            "`generate`); it can be resumed, not loaded alone"
        )
    try:
        config = saved_config(meta["config"], f"the checkpoint {ckpt}", overrides)
    except ConfigError as err:
        raise CheckpointError(f"{ckpt}: {err}") from None
    if config.model != saved_config(meta["config"], f"the checkpoint {ckpt}").model:
        raise CheckpointError(f"{ckpt}: the model of a checkpoint is as saved; drop the --model.* options")
    tokenizer = _tokenizer(ckpt, config, meta["trained_on"]["tokenizer"])
    import_before_enable("nam_spec.model")
    if not dist.is_initialized():
        dist.initialize(seed=config.training.seed)
    reset_moe_state()
    # CUDA graphs serve training calls only: a checkpoint trained with them evaluates anywhere
    model = build_model(config.model.layout(), config.model.replace(cuda_graphs=""), ParallelConfig())
    model.to(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    sharded = {"model": model.sharded_state_dict()}
    markers.check_geometry(ckpt, meta, markers.geometry(sharded))
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except Exception as err:  # megatron and torch raise many kinds for unreadable files
        raise CheckpointError(
            f"{ckpt}: damaged checkpoint, its tensors could not be read ({type(err).__name__})"
        ) from err
    model.load_state_dict(loaded["model"])
    if torch.cuda.is_available():
        model.to(torch.bfloat16)
    return Loaded(model.eval(), tokenizer, config, int(meta["step"]), ckpt)


def _tokenizer(ckpt: Path, config: Config, saved: dict[str, Any]) -> LoadedTokenizer:
    tok_path = Path(saved["path"])
    if not tok_path.is_file() or file_sha256(tok_path) != saved["sha256"]:
        raise CheckpointError(
            f"{ckpt}: its tokenizer {tok_path} (sha256 {saved['sha256'][:12]}) is gone or changed; restore "
            "that file (the data cache keeps it) to use this checkpoint"
        )
    try:
        return load_tokenizer(tok_path, config.tokenizer, config.model.vocab_size)
    except TokenizerError as err:
        raise CheckpointError(f"{ckpt}: {err}") from None
