"""HybridEmbedding: megatron-core's LanguageModelEmbedding plus the n-gram hash and structure
embeddings.

Placement under tensor parallelism:
- the n-gram tables are one weight of ``NgramHashConfig.rows`` rows split evenly by rows over the
  TP ranks (like the vocabulary of VocabParallelEmbedding); each rank looks up the rows it holds,
  an all-reduce of the [batch, seq, tables * dim] lookups (14x narrower than the hidden state at
  the defaults) completes them, exactly, since every lookup lives on one rank;
- the n-gram projection, the structure tables and their up-projection are small and replicated;
  they see identical inputs on every TP rank and so get identical gradients.
The sum is therefore the same on every TP size. Under sequence parallelism the extras follow the
word embedding: scattered to the sequence shard where upstream reduce-scatters the word
embedding, added before upstream's own scatter otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedStateDict, ShardedTensor
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import get_pg_rank, get_pg_size, make_tp_sharded_tensor_for_checkpoint
from torch import Tensor

from nam_embed.hashing import NgramHashConfig
from nam_embed.ngram import NgramHashEmbedding
from nam_embed.structure import StructureConfig, StructureEmbedding

LATER_STAGE_REPLICA = 1
"""First element of the replica id of every tensor held by a copy built on a later pipeline stage
(megatron's convention for the multi-token-prediction copy of the word embedding)."""


class HybridEmbedding(LanguageModelEmbedding):
    """LanguageModelEmbedding whose output also carries ``NgramHashEmbedding(input_ids)`` and
    ``StructureEmbedding(structure)``; with both off it is upstream, call for call.

    ``main_replica=False`` builds the copy a later pipeline stage holds (multi-token prediction):
    every tensor in its ``sharded_state_dict`` is then marked as a replica of the first stage's,
    so a checkpoint has one main replica per tensor and loading gives every stage the same
    weights. Whoever builds the model passes ``main_replica=pre_process``. The copies start equal
    (the extras are seeded by their configs) and stay equal if ``allreduce_extra_grads`` runs
    each step.
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: Literal["learned_absolute", "rope", "none"] = "learned_absolute",
        num_tokentypes: int = 0,
        scatter_to_sequence_parallel: bool = True,
        tp_group: torch.distributed.ProcessGroup | None = None,
        *,
        ngram: NgramHashConfig | None = None,
        structure: StructureConfig | None = None,
        main_replica: bool = True,
    ) -> None:
        super().__init__(
            config,
            vocab_size,
            max_sequence_length,
            position_embedding_type=position_embedding_type,
            num_tokentypes=num_tokentypes,
            scatter_to_sequence_parallel=scatter_to_sequence_parallel,
            tp_group=tp_group,
        )
        self.main_replica = main_replica
        # CPU initialisation: the default device, so a torch.device("meta") context builds shapes only
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        dtype = config.params_dtype
        hidden = config.hidden_size
        self.ngram: NgramHashEmbedding | None = None
        self.structure: StructureEmbedding | None = None
        if ngram is not None and config.context_parallel_size > 1:
            # Context parallelism hands each rank two non-adjacent sequence chunks before the
            # embedding: n-grams across the seam would hash tokens that are not neighbours.
            raise ValueError(
                f"HybridEmbedding: the n-gram hash needs whole rows; context_parallel_size="
                f"{config.context_parallel_size} splits them (use 1, or turn ngram off)"
            )
        if ngram is not None:
            tp_size, tp_rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
            if ngram.rows % tp_size:
                raise ValueError(
                    f"HybridEmbedding: {ngram.rows} n-gram rows do not split over {tp_size} "
                    "tensor-parallel ranks; use a TP size that divides 128"
                )
            share = ngram.rows // tp_size
            self.ngram = NgramHashEmbedding(
                ngram,
                hidden,
                row_range=(tp_rank * share, (tp_rank + 1) * share),
                reduce=self._sum_over_tp if tp_size > 1 else None,
                gradient_accumulation_fusion=config.gradient_accumulation_fusion,
                device=device,
                dtype=dtype,
            )
            tensor_parallel.set_tensor_model_parallel_attributes(self.ngram.weight, True, 0, 1)
        if structure is not None:
            self.structure = StructureEmbedding(structure, hidden, device=device, dtype=dtype)
        if not main_replica:  # megatron's gradient norm counts a shared parameter once, on its main copy
            for p in self.extra_parameters():
                p.shared = True

    def extra_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters this class adds to upstream's."""
        return [p for m in (self.ngram, self.structure) if m is not None for p in m.parameters()]

    def allreduce_extra_grads(self, group: torch.distributed.ProcessGroup) -> None:
        """Sum the extras' gradients over the stages that hold a copy (megatron's embedding
        group), as megatron's finalize_model_grads does for the word embedding and for nothing
        else: call it right after that, on every stage holding a copy, so the copies take the same
        optimizer steps. Reads ``main_grad`` where megatron's DDP keeps one, else ``grad``."""
        for p in self.extra_parameters():
            grad = getattr(p, "main_grad", None)
            grad = p.grad if grad is None else grad
            if grad is not None:
                torch.distributed.all_reduce(grad, group=group)

    def _sum_over_tp(self, x: Tensor) -> Tensor:
        return tensor_parallel.reduce_from_tensor_model_parallel_region(x, group=self.tp_group)

    def extras(
        self, input_ids: Tensor, position_ids: Tensor | None, structure: Mapping[str, Tensor] | None
    ) -> Tensor | None:
        """Sum of the enabled extra embeddings, [batch, seq, hidden]; None when both are off."""
        out = None
        if self.ngram is not None:
            out = self.ngram(input_ids, position_ids)
        if self.structure is not None:
            if structure is None:
                raise ValueError(
                    "HybridEmbedding: the structure embedding is enabled "
                    f"(channels {list(self.structure.enabled)}) but no structure channels were given"
                )
            s = self.structure(structure, input_ids)
            out = s if out is None else out + s
        return out

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        tokentype_ids: int | None = None,
        structure: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Upstream's embedding with the extras added to the word embedding.

        The extras join the word embedding's output (a forward hook for this call only), so all
        that upstream does after it (position embedding, layout change, scaling, sequence-parallel
        scatter, dropout) applies to the sum unchanged. ``position_ids`` are also the n-gram
        hash's positions within the document.
        """
        if structure is not None and self.structure is None:
            raise ValueError("HybridEmbedding: structure channels given but the structure embedding is off")
        extra = self.extras(input_ids, position_ids, structure)
        if extra is None:
            return super().forward(input_ids, position_ids, tokentype_ids)
        if self.reduce_scatter_embeddings:
            # The word embedding comes out [seq / tp, batch, hidden]: give the extras that layout.
            extra = tensor_parallel.scatter_to_sequence_parallel_region(
                extra.transpose(0, 1).contiguous(), group=self.tp_group
            )
        handle = self.word_embeddings.register_forward_hook(lambda _m, _args, out: out + extra.to(out.dtype))
        try:
            return super().forward(input_ids, position_ids, tokentype_ids)
        finally:
            handle.remove()

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple[tuple[int, int, int], ...] = (),
        metadata: dict | None = None,
    ) -> ShardedStateDict:
        """Upstream's entries, the n-gram weight split by rows over TP, and on a later-stage copy
        every entry marked as a replica of the first stage's."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.ngram is not None:
            key = f"{prefix}ngram.weight"
            sharded[key] = make_tp_sharded_tensor_for_checkpoint(
                self.ngram.weight,
                key,
                tp_axis=0,
                prepend_offsets=sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"],
            )
        if not self.main_replica:
            for entry in sharded.values():
                if isinstance(entry, ShardedTensor | ShardedObject):
                    entry.replica_id = _later_stage(entry.replica_id)
        return sharded


def _later_stage(replica_id: int | tuple[int, ...]) -> tuple[int, ...]:
    rest = replica_id[1:] if isinstance(replica_id, tuple) else (replica_id,)
    return (LATER_STAGE_REPLICA, *rest)
