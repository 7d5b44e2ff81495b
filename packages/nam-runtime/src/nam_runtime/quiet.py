"""Library messages that are not ours, silenced where they are emitted: one row per message.

megatron-core 0.19 and torch 2.11 tell every run about optional packages they fall back from,
their own deprecations and CUDA being absent; on a training console (and in `--dry-run` or
`nam-spec plan`) that buries what the run says. Each row names the message, the module or logger
that emits it and why it is safe to drop: warnings get a filter scoped to that module and
message, log records a filter on that logger alone, so every other warning (ours included) still
shows. `tests/test_quiet.py` emits each through its source and proves the row still matches.

Importing this module loads only the standard library: `quiet()` must run before torch and
megatron are imported, since several of these are said at import.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

__all__ = ["NOISE", "Noise", "quiet"]


@dataclass(frozen=True)
class Noise:
    """One row of the noise table."""

    source: (
        str  # a warning's module (a regular expression, as warnings.filterwarnings takes) or a logger name
    )
    message: str  # regular expression matched at the start of the message
    why: str
    category: type[Warning] | None = None  # a warning of this category; None: a log record of logger `source`


NOISE: tuple[Noise, ...] = (
    Noise(
        r"megatron\.",
        r"(Transformer Engine and )?Apex (is|are) not installed",
        "megatron-core's import-time notice that it falls back to torch optimizers, norms and "
        "multi-tensor helpers; Transformer Engine is opt-in (model.backend) and nam-spec says so "
        "itself when it is asked for and missing",
        UserWarning,
    ),
    Noise(
        # compile-time warnings carry the file name, not the module, so match the path
        r".*[/\\]megatron[/\\]core[/\\]",
        r"invalid escape sequence",
        "megatron-core 0.19's docstrings (inference/contexts/kv_block_allocator.py), said whenever "
        "its source is compiled without a cached .pyc",
        SyntaxWarning,
    ),
    Noise(
        r"megatron\.core\.hyper_comm_grid",
        r"absl\.logging is not installed",
        "megatron-core 0.19's import-time notice that it logs through the standard library where "
        "absl-py is absent (environments without tensorboard); its messages still reach logging",
        UserWarning,
    ),
    Noise(
        r"megatron\.core\.transformer\.transformer_config",
        r"full scope is deprecated",
        "megatron-core 0.19's TransformerConfig about its own CUDA-graph scope default; nam-spec "
        "sets no CUDA-graph option",
        UserWarning,
    ),
    Noise(
        r"megatron\.core\.transformer\.transformer_config",
        r"If you are using transformer_engine as the transformer implementation, the core_attn",
        "megatron-core's advice to TE users on recomputing attention; nam-spec's selective recompute "
        "of an A layer is core_attn by design (its memory estimate counts what that saves)",
        UserWarning,
    ),
    Noise(
        r"megatron\.core\._rank_utils",
        r"Could not determine rank from torch\.distributed",
        "megatron-core 0.19's log_single_rank wherever no process group exists and RANK is unset: "
        "at import, and each time an IndexedDataset is opened (nam-train data packing its units, "
        "the packed splits, eval's data) in a one-process run; rank 0, its default, is the right one",
        UserWarning,
    ),
    Noise(
        r"megatron\.core\.models\.mimo\.",
        r"MimoModelConfig is experimental",
        "a megatron-core model class we never use, said when megatron.core.models is imported",
        UserWarning,
    ),
    Noise(
        r"nam_runtime\.cpu",
        r"The \.grad attribute of a Tensor that is not a leaf",
        "megatron-core reads .grad of a non-leaf tensor during a step on CPU; torch warns from the "
        "frame of nam_runtime.cpu's device mode, which forwards every torch call, so it names our module",
        UserWarning,
    ),
    Noise(
        "torch.utils.cpp_extension",
        r"No CUDA runtime is found",
        "torch at import on a machine without CUDA, where the CPU path is the intended one",
    ),
    Noise(
        "megatron.core.distributed.distributed_data_parallel",
        r"DistributedDataParallel: full_param_layout not provided",
        "megatron-core 0.19 asks callers of DDP with the distributed optimizer to pre-compute the "
        "parameter layout; DDP computes the same layout itself",
    ),
    Noise(
        r"torch\.distributed\.checkpoint\.",
        r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to",
        "torch 2.11's distributed checkpoint when it saves or loads without a process group (nam-train "
        "eval and generate load a checkpoint at one process): one process is the intent",
        UserWarning,
    ),
    Noise(
        r"torch\.distributed\.checkpoint\.",
        r"The argument order of load has been changed",
        "torch 2.11's notice to callers of its checkpoint load that pass the storage reader by "
        "position, as megatron-core 0.19's dist_checkpointing does; said on every load",
        UserWarning,
    ),
    Noise(
        "megatron.core.dist_checkpointing.strategies.torch",
        r"MCore's async save is deprecated",
        "said by megatron-core 0.19 when its default save strategy is built, though checkpoints "
        "here are saved synchronously; it was printed into the progress line",
    ),
)


class _Drop(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self._pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._pattern.match(record.getMessage())


_installed = False


def quiet() -> None:
    """Install every row's filter, once per process (warnings filters are process-wide state)."""
    global _installed
    if _installed:
        return
    _installed = True
    for row in NOISE:
        if row.category is None:
            logging.getLogger(row.source).addFilter(_Drop(row.message))
        else:
            warnings.filterwarnings("ignore", message=row.message, category=row.category, module=row.source)
