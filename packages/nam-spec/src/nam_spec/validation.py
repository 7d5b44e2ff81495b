"""One validation entry point for a model: every problem at once, before any allocation.

The checks of each letter live in its module (:mod:`nam_spec.letters`); here are only the rules
that hold for every model: the layout's letters are buildable, sizes are positive, names are
known, and the parallel sizes fit the depth and sequence. Callers with rules of their own
(nam-train: data, batch sizes, world size) add their problems to :func:`problems`' list.
"""

from __future__ import annotations

from nam_layout import Layout
from nam_spec.config import (
    BACKENDS,
    PARAMS_DTYPES,
    RECOMPUTE_POLICIES,
    ModelConfig,
    ParallelConfig,
    SpecConfigError,
)
from nam_spec.letters import GRAPH_LETTERS, LETTERS, MTP_LETTERS, SPEC_LETTERS


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def problems(config: ModelConfig, layout: Layout, parallel: ParallelConfig | None = None) -> list[str]:
    """What stops ``config`` from building ``layout`` at ``parallel``; empty when nothing does."""
    parallel = parallel or ParallelConfig()
    out: list[str] = []
    unknown = sorted(set(layout.kinds) - set(SPEC_LETTERS))
    if unknown:
        out.append(
            f"layout letter(s) {unknown} have no nam-spec block; nam-spec builds {' '.join(SPEC_LETTERS)}"
        )
    sizes = [(f"model.{k}", getattr(config, k)) for k in ("hidden_size", "vocab_size", "seq_length")]
    sizes += [
        (f"parallel.{k}", getattr(parallel, k)) for k in ("tensor", "pipeline", "virtual_pipeline", "expert")
    ]
    out += [
        f"{name} must be a positive integer, got {value!r}" for name, value in sizes if not _positive(value)
    ]
    if not (isinstance(parallel.expert_tensor, int) and parallel.expert_tensor >= 0):
        out.append(
            f"parallel.expert_tensor must be >= 0 (0: the tensor size), got {parallel.expert_tensor!r}"
        )
    depth, weight = config.mtp_depth, config.mtp_loss_weight
    if not (isinstance(depth, int) and not isinstance(depth, bool) and 0 <= depth < config.seq_length):
        out.append(
            f"model.mtp_depth {depth!r} must be an integer from 0 (off) to model.seq_length - 1 = "
            f"{config.seq_length - 1} (depth k predicts the token k + 1 ahead within the row)"
        )
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight < float("inf"):
        out.append(f"model.mtp_loss_weight {weight!r} must be a finite number >= 0")
    chunk = config.loss_chunk_tokens
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
        out.append(f"model.loss_chunk_tokens {chunk!r} must be an integer >= 0 (0: the whole logits at once)")
    if out:  # the letters' arithmetic needs sane sizes
        return out
    if config.backend not in BACKENDS:
        out.append(f"model.backend {config.backend!r} is unknown; accepted: {', '.join(map(repr, BACKENDS))}")
    if config.params_dtype not in PARAMS_DTYPES:
        out.append(
            f"model.params_dtype {config.params_dtype!r}; accepted: {', '.join(map(repr, PARAMS_DTYPES))}"
        )
    policies = (
        {"every letter": config.recompute} if isinstance(config.recompute, str) else dict(config.recompute)
    )
    for key, policy in policies.items():
        if policy not in RECOMPUTE_POLICIES or (key != "every letter" and key not in LETTERS):
            out.append(
                f"model.recompute[{key!r}] = {policy!r}: a policy ({', '.join(map(repr, RECOMPUTE_POLICIES))}) "
                f"for every letter, or a table of letters of {SPEC_LETTERS!r} to policies"
            )
    if parallel.pipeline > layout.depth:
        out.append(f"parallel.pipeline {parallel.pipeline} exceeds the depth {layout.depth}")
    if parallel.virtual_pipeline > 1 and parallel.pipeline == 1:
        out.append(f"parallel.virtual_pipeline {parallel.virtual_pipeline} needs parallel.pipeline > 1")
    tp = parallel.tensor
    if config.vocab_size % tp:
        out.append(
            f"model.vocab_size {config.vocab_size} is not divisible by parallel.tensor {tp} "
            "(the embedding and output layer split the vocabulary across tensor ranks)"
        )
    try:
        ngram = config.embedding.ngram_config()
    except ValueError as err:
        out.append(f"model.embedding.ngram_*: {err}")
    else:
        if ngram is not None and ngram.rows % tp:
            out.append(
                f"the n-gram embedding's {ngram.rows} table rows are not divisible by parallel.tensor {tp} "
                "(they split by rows across tensor ranks; a power of two up to 128 always divides them)"
            )
    if parallel.sequence_parallel and parallel.tensor > 1 and config.seq_length % parallel.tensor:
        out.append(
            f"model.seq_length {config.seq_length} is not divisible by parallel.tensor {parallel.tensor} "
            "(sequence parallelism splits the sequence across tensor ranks)"
        )
    out.extend(_graph_problems(config, parallel))
    for key in dict.fromkeys(layout.kinds + (MTP_LETTERS if config.mtp_depth else "")):
        if key in LETTERS:
            out.extend(LETTERS[key].problems(config, parallel))
    return out


def _graph_problems(config: ModelConfig, parallel: ParallelConfig) -> list[str]:
    letters = config.cuda_graphs
    if not isinstance(letters, str):
        return [f"model.cuda_graphs {letters!r} must be a string of letters from {GRAPH_LETTERS!r}"]
    out = []
    if bad := sorted(set(letters) - set(GRAPH_LETTERS)):
        out.append(
            f"model.cuda_graphs {letters!r}: {bad} cannot be captured; accepted letters: {GRAPH_LETTERS!r}"
        )
    for key in dict.fromkeys(letters):
        if key in GRAPH_LETTERS:
            out.extend(f"model.cuda_graphs {letters!r}: {p}" for p in LETTERS[key].graph_problems(config))
    if letters and (parallel.pipeline > 1 or parallel.tensor > 1):
        out.append(
            f"model.cuda_graphs {letters!r} needs parallel.pipeline = 1 and parallel.tensor = 1 (got "
            f"{parallel.pipeline} and {parallel.tensor}): a layer's graph holds one micro-batch's "
            "activations, and tensor-parallel collectives are not captured"
        )
    if full := [k for k in dict.fromkeys(letters) if config.recompute_for(k) == "full"]:
        out.append(
            f"model.cuda_graphs {letters!r}: letter(s) {full} have model.recompute 'full'; "
            "a graphed layer cannot also be recomputed whole"
        )
    return out


def environment_problems(config: ModelConfig) -> list[str]:
    """What this machine lacks to train ``config``, one line each (``problems`` checks the
    configuration alone, so a GPU configuration can be planned on any machine)."""
    from nam_spec.backends import te_unavailable
    from nam_spec.graphs import graphs_unavailable

    out = []
    if config.backend == "te" and (reason := te_unavailable()) is not None:
        out.append(f"model.backend = 'te': Transformer Engine is not usable here ({reason}); use 'local'")
    if (reason := graphs_unavailable(config.cuda_graphs)) is not None:
        out.append(reason)
    return out


def validate(config: ModelConfig, layout: Layout, parallel: ParallelConfig | None = None) -> None:
    """Raise :class:`SpecConfigError` listing every problem of :func:`problems`."""
    found = problems(config, layout, parallel)
    if found:
        raise SpecConfigError("invalid model config: " + "; ".join(found))
