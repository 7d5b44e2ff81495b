"""Multi-token prediction: ``model.mtp_depth`` heads after the main one (DeepSeek-V3, section 2.2),
with megatron-core's ``MultiTokenPredictionBlock`` semantics, on the last pipeline stage.

Depth k (1-based) turns h_{k-1} (h_0: the stack's output after its final norm) into h_k:

    h_k = stack_k(eh_proj([enorm(embed(tokens shifted left by k)), hnorm(h_{k-1})]))

``eh_proj`` is a column-parallel 2h -> h linear whose output is gathered over the tensor ranks
(and scattered back to the sequence shard under sequence parallelism), ``stack_k`` the letters
``nam_spec.letters.MTP_LETTERS`` ending in their own final norm. The embedding is the model's (a
copy on the last stage when that is not the first) and h_k goes through the model's output layer
to predict the labels shifted left by k: position i at depth k predicts token i + k + 1. Shifted-in
positions are zero; :func:`mtp_loss_masks` drops them from the loss.

megatron's block itself is not used: its inner layer is a ``TransformerLayer`` or megatron's
``HybridStack`` built from megatron's hybrid specs, its embedding call passes only token and
position ids (nam-embed's structure channels would not be shifted), and its losses go into
megatron's global loss tracker at a per-micro-batch token mean. Here the inner layers are
nam-spec's own letters and the model hands back per-token losses, which nam-train weighs like the
main loss (a mean over the global batch's tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_token_prediction import roll_tensor

from nam_spec.stack import NamStack


def shift_left(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` one position further along its last (sequence) dimension, the last position 0
    (megatron's ``roll_tensor`` without context parallelism)."""
    return roll_tensor(tensor, shifts=-1, dims=-1)[0]


def shift_inputs(
    input_ids: torch.Tensor, position_ids: torch.Tensor, embedding_inputs: Mapping[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The embedding's inputs one token further: ids, positions and nam-embed's structure channels."""
    structure = embedding_inputs.get("structure")
    shifted = dict(embedding_inputs)
    if structure is not None:
        shifted["structure"] = {name: shift_left(values) for name, values in structure.items()}
    return shift_left(input_ids), shift_left(position_ids), shifted


def mtp_loss_masks(
    loss_mask: torch.Tensor, depth: int, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[depth, b, s] masks of the MTP losses from the main loss mask [b, s]: depth k keeps position
    i where label i + k is kept and, with ``document_ids`` (document masking), lies in i's document."""
    masks, mask, docs = [], loss_mask, document_ids
    for _ in range(depth):
        mask = shift_left(mask)
        if document_ids is not None:
            docs = shift_left(docs)
            mask = mask * (docs == document_ids)
        masks.append(mask)
    return torch.stack(masks)


class MtpDepth(MegatronModule):
    """One depth: the two norms, ``eh_proj`` and the inner stack (``mtp_model_layer``, with its
    final norm)."""

    def __init__(
        self, config: TransformerConfig, stack: NamStack, norm: Any, pg_collection: ProcessGroupCollection
    ) -> None:
        super().__init__(config)
        self.tp_group = pg_collection.tp
        h, eps = config.hidden_size, config.layernorm_epsilon
        self.enorm = norm(config=config, hidden_size=h, eps=eps)
        self.hnorm = norm(config=config, hidden_size=h, eps=eps)
        self.eh_proj = ColumnParallelLinear(
            2 * h,
            h,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            tp_group=self.tp_group,
        )
        self.mtp_model_layer = stack

    def forward(
        self,
        hidden: torch.Tensor,
        embedded: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary_pos_emb: torch.Tensor,
        packed_seq_params: PackedSeqParams | None,
    ) -> torch.Tensor:
        x = torch.cat((self.enorm(embedded), self.hnorm(hidden)), dim=-1)
        x, _ = self.eh_proj(x)
        x = gather_from_tensor_model_parallel_region(x, group=self.tp_group)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        return self.mtp_model_layer(x, attention_mask, rotary_pos_emb, packed_seq_params)


class MultiTokenPrediction(MegatronModule):
    """The depths in order; ``forward`` returns h_1 .. h_D ([s_local, b, h] each). Attribute names
    are megatron's (``layers``, each with its ``mtp_model_layer``): its schedules reach into them."""

    def __init__(self, config: TransformerConfig, depths: list[MtpDepth]) -> None:
        super().__init__(config)
        self.layers = torch.nn.ModuleList(depths)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        embedding_inputs: Mapping[str, Any],
        embedding: torch.nn.Module,
        attention_mask: torch.Tensor | None,
        rotary_pos_emb: torch.Tensor,
        packed_seq_params: PackedSeqParams | None,
    ) -> list[torch.Tensor]:
        out = []
        for depth in self.layers:
            input_ids, position_ids, embedding_inputs = shift_inputs(
                input_ids, position_ids, embedding_inputs
            )
            embedded = embedding(input_ids=input_ids, position_ids=position_ids, **embedding_inputs)
            hidden = depth(hidden, embedded, attention_mask, rotary_pos_emb, packed_seq_params)
            out.append(hidden)
        return out

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        # per depth: megatron's default would treat the ModuleList as one plain module and save
        # eh_proj's tensor-parallel shards as replicated tensors
        out: ShardedStateDict = {}
        for i, depth in enumerate(self.layers):
            out.update(depth.sharded_state_dict(f"{prefix}layers.{i}.", sharded_offsets, metadata))
        return out
