"""The output layer and megatron's vocab-parallel cross entropy fused over chunks of tokens, so
that the logits of a whole micro-batch never exist at once (``model.loss_chunk_tokens``).

Same semantics as ``output_layer`` followed by ``compute_language_model_loss`` (megatron's
``vocab_parallel_cross_entropy``, no label smoothing): per chunk the logits of this rank's
vocabulary shard are computed in the weight's dtype and upcast to fp32, and the max, the target
logit and the sum of exponentials are reduced over the tensor-parallel group, giving
``loss = log(sum exp(logit - max)) - (logit[label] - max)`` per token.

Backward recomputes each chunk's logits from the saved input and the per-token log-sum-exp. The
gradient of the loss is only known in backward and is a per-token scale (the caller's loss mask
and normalisation): it scales the rows of the input gradient, but the weight gradient sums over
tokens, so precomputing gradients in forward (Liger's trick) would need every chunk's logit
gradient kept until backward, i.e. the whole logits again. Recomputing instead costs one extra
matmul: 4 x 2 x tokens x hidden x vocab/tp FLOPs in all instead of the plain path's 3 x, for
memory bounded by one chunk's logits (fp32 beside its weight-dtype source or gradient: 6 x chunk
x vocab/tp bytes in bf16) plus what is kept, the gathered input and an fp32 log-sum-exp per token,
and in backward over several chunks an fp32 sum of the weight gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    tp_group: dist.ProcessGroup,
    *,
    sequence_parallel: bool,
    chunk_tokens: int,
) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) of ``labels`` [b, s] under the logits ``hidden @ weight.T``:
    ``hidden`` [s, b, h] ([s / tp, b, h] under sequence parallelism), ``weight`` this rank's
    vocabulary shard [vocab / tp, h] of a column-parallel output layer, ``chunk_tokens`` tokens'
    logits at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    # the input of a column-parallel layer, as megatron's ColumnParallelLinear takes it: gathered
    # over the sequence (backward: reduce-scatter), or copied (backward: all-reduce)
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b, h = hidden.shape
    # megatron's loss works in [s, b]; tokens flattened in that order
    flat_labels = labels.transpose(0, 1).reshape(-1)
    loss = _LinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, flat_labels, chunk_tokens, tp_group)
    return loss.view(s, b).transpose(0, 1).contiguous()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> None:
    if group.size() > 1:
        dist.all_reduce(tensor, op=op, group=group)


def _logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # in the weight's dtype, then fp32: the plain path's rounding (output layer, then the loss's upcast)
    return (hidden @ weight.t()).float()


def _local_targets(labels: torch.Tensor, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as indices into this rank's vocabulary shard (0 where another rank owns them) and
    whether this rank owns them."""
    owned = (labels >= start) & (labels < start + size)
    return torch.where(owned, labels - start, 0), owned


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_tokens: int,
        tp_group: dist.ProcessGroup,
    ) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        start = tp_group.rank() * vocab
        loss = hidden.new_empty(n, dtype=torch.float32)
        lse = torch.empty_like(loss)
        for first in range(0, n, chunk_tokens):
            rows = slice(first, first + chunk_tokens)
            logits = _logits(hidden[rows], weight)
            target, owned = _local_targets(labels[rows], start, vocab)
            peak = logits.max(dim=-1).values
            _all_reduce(peak, dist.ReduceOp.MAX, tp_group)
            logits.sub_(peak[:, None])
            predicted = torch.where(owned, logits.gather(1, target[:, None]).squeeze(1), 0.0)
            # predicted logit and sum of exponentials in one all-reduce
            stats = torch.stack((predicted, logits.exp_().sum(dim=-1)))
            _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
            log_sum = stats[1].log()
            loss[rows] = log_sum - stats[0]
            lse[rows] = log_sum + peak
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_tokens, ctx.start = chunk_tokens, start
        return loss

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        hidden, weight, labels, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Several chunks: their products (each rounded once to the weight dtype, as the plain path's
        # one product is) summed in fp32, a weight-sized fp32 buffer. With megatron's
        # gradient_accumulation_fusion this sum would go straight into weight.main_grad (and the
        # returned grad be a dummy, grad_added_to_main_grad set); megatron's DDP adds a returned
        # grad to main_grad either way.
        single = hidden.shape[0] <= ctx.chunk_tokens
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight and not single else None
        for first in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(first, first + ctx.chunk_tokens)
            h = hidden[rows]
            probs = _logits(h, weight).sub_(lse[rows, None]).exp_()
            target, owned = _local_targets(labels[rows], ctx.start, weight.shape[0])
            mine = owned.nonzero().squeeze(1)
            probs[mine, target[mine]] -= 1.0
            grad_logits = probs.mul_(grad_loss[rows, None]).to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if want_weight and single:
                grad_weight = grad_logits.t() @ h
            elif want_weight:
                grad_weight += grad_logits.t() @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None
