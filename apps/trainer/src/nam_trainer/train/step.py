"""One optimizer step and one evaluation through megatron's ``get_forward_backward_func``.

The loss is the mean cross-entropy over the loss-mask tokens of the whole global batch (every
micro-batch of every data-parallel rank). megatron divides each micro-batch's loss by the number
of micro-batches and DDP averages gradients over data-parallel ranks, so each micro-batch returns
``sum(loss * mask) * microbatches * dp / global_tokens``; the global token count is one
all-reduce per step. MoE aux losses (and STP) enter backward through megatron's aux-loss scaler
with the schedule's usual 1 / microbatches scale.

With multi-token prediction (``model.mtp_depth`` = D) a training forward returns the per-token
losses of the main head and of each depth; depth k's mean over its own tokens (``nam_spec.mtp``'s
shifted masks, whose global counts join the same all-reduce) enters the loss times
``mtp_loss_weight / D``, as megatron scales its MTP losses. The reported loss is the main head's;
evaluation runs the main head alone.
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
    loss: float  # main head's mean over the global batch's loss tokens; non-finite: the step was skipped
    grad_norm: float | None  # before clipping; None when skipped or clipping is off
    tokens: int  # loss tokens in the global batch
    mtp_losses: tuple[float, ...] = ()  # the mean loss of each multi-token-prediction depth

    @property
    def skipped(self) -> bool:
        return not math.isfinite(self.loss)


def _groups() -> tuple[Any, Any]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group()


def _loss_masks(batch: dict[str, Any], depth: int) -> torch.Tensor:
    """[1 + depth, b, s]: the main head's loss mask, then each MTP depth's (inside the document
    where the model keeps documents apart)."""
    mask = batch["loss_mask"].unsqueeze(0)
    if not depth:
        return mask
    from nam_spec.mtp import mtp_loss_masks

    docs = batch["document_ids"] if "packed_seq_params" in batch else None
    return torch.cat([mask, mtp_loss_masks(batch["loss_mask"], depth, docs)])


def _global_tokens(masks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Loss tokens per head [1 + depth] over the global batch."""
    dp, _ = _groups()
    tokens = torch.stack([m.sum(dim=(1, 2)) for m in masks]).sum(0).to(device, torch.float64)
    torch_dist.all_reduce(tokens, group=dp)
    return tokens


def _loss_func(
    masks: torch.Tensor, scales: torch.Tensor, per_token: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    per_token = per_token if per_token.dim() == 3 else per_token.unsqueeze(0)  # the main head alone
    sums = (per_token.float() * masks).sum(dim=(1, 2))
    # the schedule divides the first in place
    return (sums * scales).sum(), {"loss_sum": sums.detach().clone()}


def _forward_step(
    scales: torch.Tensor,
    depth: int,
    before_forward: Callable[[dict[str, Any]], None],
    data: Iterator[dict[str, Any]],
    model: Any,
) -> tuple[torch.Tensor, Callable]:
    batch = next(data)
    before_forward(batch)
    args = {k: v for k, v in batch.items() if k not in _NOT_MODEL_ARGS}
    return model(**args), partial(_loss_func, _loss_masks(batch, depth), scales)


def _run_schedule(
    run: Run,
    micro: list[dict[str, Any]],
    forward_only: bool,
    before_forward: Callable[[dict[str, Any]], None],
) -> tuple[list[float], int]:
    """Forward (and backward) over ``micro``; the global batch's mean loss per head (the main one,
    then each MTP depth when training) and its loss tokens, on every rank."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = run.world.device
    depth = 0 if forward_only else run.model.mtp_depth  # eval mode runs the main head alone
    tokens = _global_tokens([_loss_masks(m, depth) for m in micro], device)
    weights = torch.tensor([1.0] + [run.model.mtp_loss_weight / max(depth, 1)] * depth, dtype=torch.float64)
    scales = (weights * len(micro) * run.dp_size / tokens.cpu().clamp(min=1.0)).to(device, torch.float32)
    stats = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, scales, depth, before_forward),
        data_iterator=[iter(micro) for _ in run.chunks],  # one per model chunk (virtual stage)
        model=run.chunks,
        num_microbatches=len(micro),
        seq_length=micro[0]["input_ids"].shape[1],
        micro_batch_size=micro[0]["input_ids"].shape[0],
        forward_only=forward_only,
    )
    # Loss sums live on the last pipeline stage: sum over data-parallel ranks, then over stages
    # (the others add zero), so every rank holds the same number and takes the same decision.
    total = torch.zeros(1 + depth, dtype=torch.float64, device=device)
    for s in stats:
        total += s["loss_sum"].to(torch.float64)
    dp, pp = _groups()
    torch_dist.all_reduce(total, group=dp)
    torch_dist.all_reduce(total, group=pp)
    return (total / tokens.clamp(min=1.0)).tolist(), int(tokens[0])


def train_step(
    run: Run, micro: list[dict[str, Any]], before_forward: Callable[[dict[str, Any]], None]
) -> StepResult:
    """Forward, backward and, for a finite loss, the optimizer step; the LR schedule advances either way."""
    for chunk in run.chunks:
        chunk.zero_grad_buffer()
    run.optimizer.zero_grad()
    (loss, *mtp_losses), tokens = _run_schedule(run, micro, forward_only=False, before_forward=before_forward)
    if not all(map(math.isfinite, mtp_losses)):
        loss = math.nan  # the objective the step trains on includes the depths: skip it
    grad_norm = None
    if math.isfinite(loss):
        _, norm, _ = run.optimizer.step()
        grad_norm = None if norm is None else float(norm)
    run.scheduler.step(1)
    return StepResult(loss, grad_norm, tokens, tuple(mtp_losses))


def evaluate(run: Run, batches: list[list[dict[str, Any]]]) -> float:
    """Mean loss per loss token over the validation batches (forward only, no gradients)."""
    for chunk in run.chunks:
        chunk.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        with torch.no_grad():
            for micro in batches:
                (loss,), tokens = _run_schedule(run, micro, forward_only=True, before_forward=lambda _b: None)
                total_loss += loss * tokens
                total_tokens += tokens
    finally:
        for chunk in run.chunks:
            chunk.train()
    return total_loss / max(total_tokens, 1)
