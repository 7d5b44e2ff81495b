"""A token dispatcher for one rank's experts that never waits for the device.

megatron-core's dispatchers copy the tokens per expert to the host (its all-to-all dispatcher
synchronises on a CUDA event once per MoE layer and forward), which drains the GPU queue and keeps
the host from running ahead. With every expert on this rank (expert and tensor parallel size 1)
nothing needs the counts on the host: ``GroupedExperts`` builds its grouped-GEMM offsets on the
device. Every tensor here has a size known from the shapes alone (tokens x top-k), so no op reads
a value back.

The permuted order is megatron's: grouped by expert, tokens in ascending order within each expert,
so the experts see the same rows as under megatron's dispatcher. Moving rows between token order and
that order uses gathers only, in both directions: each token's top-k rows are found through the
inverse of the permutation, so neither pass adds rows with atomics (megatron's permutation does, in
its backward, and its unpermutation in its forward), and the sums are deterministic.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from nam_mixers.ops.moe import sum_pairs


class _RepeatRows(torch.autograd.Function):
    """rows[p] = x[token[p]]: each token's row repeated for its top_k pairs, in the permuted order.
    The gradient of token t sums the pairs' gradients, gathered through ``inverse`` (pair t * top_k + j
    sits at row inverse[t * top_k + j])."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inverse,) = ctx.saved_tensors
        return sum_pairs(grad, inverse, ctx.top_k), None, None, None


class _SumRows(torch.autograd.Function):
    """out[t] = the sum of token t's top_k rows of the permuted order; the adjoint of _RepeatRows."""

    @staticmethod
    def forward(
        ctx: Any, rows: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor, top_k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(token)
        return sum_pairs(rows, inverse, top_k)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None, None


class LocalTokenDispatcher(MoETokenDispatcher):
    """Sort the (token, expert) pairs by expert with a fixed-size stable sort; move the rows there and
    back by gathers (``_RepeatRows``, ``_SumRows``)."""

    def __init__(self, config: TransformerConfig, pg_collection: ProcessGroupCollection) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        unsupported = {
            "expert parallel size": self.ep_size != 1,
            "expert tensor parallel size": self.tp_size != 1,
            "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
            "moe_router_padding_for_quantization": config.moe_router_padding_for_quantization,
            "moe_shared_expert_overlap": config.moe_shared_expert_overlap,
        }
        if bad := [name for name, on in unsupported.items() if on]:
            raise ValueError(
                f"LocalTokenDispatcher: unsupported {', '.join(bad)}; it serves expert and tensor "
                "parallel size 1, dropless routing, without shared-expert overlap"
            )
        self.top_k = config.moe_router_topk

    def dispatch_preprocess(
        self, hidden_states: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.hidden_shape = hidden_states.shape
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        # Dropless routing marks exactly top_k experts per token: topk of the 0/1 map finds them
        experts = routing_map.to(torch.uint8).topk(self.top_k, dim=1, sorted=False).indices
        # Pair p = token * top_k + j; a stable sort by expert keeps tokens ascending within an expert
        order = torch.sort(experts.flatten(), stable=True).indices
        self.token_index = order // self.top_k
        # where each pair went: a scatter of a permutation, so no two writes meet
        self.inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=order.device)
        )
        self.tokens_per_expert = routing_map.sum(dim=0)
        # index_select, not [order]: the backward of advanced indexing is index_put_ with accumulate,
        # which sorts its indices again on CUDA; index_select's is an index_add (of single scalars here)
        permuted_probs = probs.gather(1, experts).flatten().index_select(0, order)
        return _RepeatRows.apply(hidden_states, self.token_index, self.inverse, self.top_k), permuted_probs

    def token_dispatch(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden_states, probs  # the experts are on this rank

    def dispatch_postprocess(
        self, hidden_states: torch.Tensor, probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The experts applied the probs; each token's top_k outputs summed in their dtype, as megatron's
        # unpermute returns them (it adds them one by one, rounding after each; this rounds the sum once)
        out = _SumRows.apply(hidden_states, self.token_index, self.inverse, self.top_k)
        self.token_index = self.inverse = None
        return out.view(self.hidden_shape)


class LocalDispatchMoELayer(MoELayer):
    """megatron's MoELayer with :class:`LocalTokenDispatcher` in place of the one its config names."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MoESubmodules | None = None,
        layer_number: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        is_mtp_layer: bool = False,
        name: str | None = None,
    ) -> None:
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        self.token_dispatcher = LocalTokenDispatcher(config, pg_collection)
