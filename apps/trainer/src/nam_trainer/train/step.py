"""One optimizer step and one evaluation through megatron's ``get_forward_backward_func``.

The loss is the mean cross-entropy over the loss-mask tokens of the whole global batch (every
micro-batch of every data-parallel rank). megatron divides each micro-batch's loss by the number
of micro-batches and DDP averages gradients over data-parallel ranks, so each micro-batch returns
``sum(loss * mask) * microbatches * dp / global_tokens``; the global token count is one
all-reduce per step. MoE aux losses (and STP) enter backward through megatron's aux-loss scaler
with the schedule's usual 1 / microbatches scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as torch_dist

from nam_trainer.train.setup import Run

# Keys of a collated micro-batch that are not model arguments.
_NOT_MODEL_ARGS = ("loss_mask", "document_ids")


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean over the global batch's loss tokens; non-finite: the step was skipped
    grad_norm: float | None  # before clipping; None when skipped or clipping is off
    tokens: int  # loss tokens in the global batch

    @property
    def skipped(self) -> bool:
        return not math.isfinite(self.loss)


def _groups() -> tuple[Any, Any]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group()


def _global_tokens(micro: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
    dp, _ = _groups()
    tokens = torch.stack([m["loss_mask"].sum() for m in micro]).sum().to(device, torch.float64)
    torch_dist.all_reduce(tokens, group=dp)
    return tokens


def _loss_func(
    loss_mask: torch.Tensor, scale: float, per_token: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    masked = (per_token.float() * loss_mask).sum()
    return masked * scale, {"loss_sum": masked.detach().clone()}  # the schedule divides the first in place


def _forward_step(
    scale: float, before_forward: Callable[[dict[str, Any]], None], data: Iterator[dict[str, Any]], model: Any
) -> tuple[torch.Tensor, Callable]:
    batch = next(data)
    before_forward(batch)
    args = {k: v for k, v in batch.items() if k not in _NOT_MODEL_ARGS}
    return model(**args), partial(_loss_func, batch["loss_mask"], scale)


def _run_schedule(
    run: Run,
    micro: list[dict[str, Any]],
    forward_only: bool,
    before_forward: Callable[[dict[str, Any]], None],
) -> tuple[float, int]:
    """Forward (and backward) over ``micro``; the global batch's (mean loss, loss tokens) on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = run.world.device
    tokens = _global_tokens(micro, device)
    scale = len(micro) * run.dp_size / max(float(tokens), 1.0)
    stats = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, scale, before_forward),
        data_iterator=[iter(micro) for _ in run.chunks],  # one per model chunk (virtual stage)
        model=run.chunks,
        num_microbatches=len(micro),
        seq_length=micro[0]["input_ids"].shape[1],
        micro_batch_size=micro[0]["input_ids"].shape[0],
        forward_only=forward_only,
    )
    # Loss sums live on the last pipeline stage: sum over data-parallel ranks, then over stages
    # (the others add zero), so every rank holds the same number and takes the same decision.
    total = torch.zeros((), dtype=torch.float64, device=device)
    for s in stats:
        total += s["loss_sum"].to(torch.float64)
    dp, pp = _groups()
    torch_dist.all_reduce(total, group=dp)
    torch_dist.all_reduce(total, group=pp)
    return float(total) / max(float(tokens), 1.0), int(tokens)


def train_step(
    run: Run, micro: list[dict[str, Any]], before_forward: Callable[[dict[str, Any]], None]
) -> StepResult:
    """Forward, backward and, for a finite loss, the optimizer step; the LR schedule advances either way."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    loss, tokens = _run_schedule(run, micro, forward_only=False, before_forward=before_forward)
    grad_norm = None
    if math.isfinite(loss):
        _, norm, _ = run.optimizer.step()
        grad_norm = None if norm is None else float(norm)
    run.scheduler.step(1)
    return StepResult(loss, grad_norm, tokens)


def evaluate(run: Run, batches: list[list[dict[str, Any]]]) -> float:
    """Mean loss per loss token over the validation batches (forward only, no gradients)."""
    for chunk in run.chunks:
        chunk.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for micro in batches:
                loss, tokens = _run_schedule(run, micro, forward_only=True, before_forward=lambda _b: None)
                total_loss += loss * tokens
                total_tokens += tokens
    finally:
        for chunk in run.chunks:
            chunk.train()
    return total_loss / max(total_tokens, 1)
