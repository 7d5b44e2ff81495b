"""build_model: HybridEmbedding (first stage), the NamStack of this pipeline stage, output layer (last)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear

from nam_embed.hybrid_embedding import HybridEmbedding
from nam_layout import Layout, StagePlan, plan_stages
from nam_spec.backends import Backend, resolve_backend
from nam_spec.config import ModelConfig, ParallelConfig, SpecConfigError
from nam_spec.cross_entropy import linear_cross_entropy
from nam_spec.graphs import graphs_unavailable, layer_graphs
from nam_spec.letters import MTP_LETTERS
from nam_spec.mtp import MtpDepth, MultiTokenPrediction, shift_left
from nam_spec.specs import layer_specs
from nam_spec.stack import NamStack
from nam_spec.transformer_config import transformer_config
from nam_spec.validation import validate


class NamModel(LanguageModule):
    """A NAM language model chunk: forward(input_ids, position_ids, labels) -> per-token loss [b, s]
    (or logits [b, s, vocab/tp] without labels; the hidden states on stages before the last).
    With ``config.mtp_depth`` = D > 0 the last stage also holds the multi-token-prediction depths
    (:mod:`nam_spec.mtp`) and, in training mode with labels, returns [1 + D, b, s]: the main
    per-token loss, then depth k's (position i predicting label i + k); in eval mode only the main
    head runs. ``packed_seq_params`` (``nam_spec.documents.document_boundaries``): documents in the rows, which
    every letter keeps apart (local backend)."""

    def __init__(
        self,
        config: ModelConfig,
        layout: Layout,
        parallel: ParallelConfig | None = None,
        *,
        pg_collection: ProcessGroupCollection | None = None,
        plan: StagePlan | None = None,
        pre_process: bool | None = None,
        post_process: bool | None = None,
        vp_stage: int = 0,
    ) -> None:
        parallel = parallel or ParallelConfig()
        validate(config, layout, parallel)
        tc = transformer_config(config, layout, parallel)
        pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        super().__init__(config=tc, pg_collection=pg_collection)
        pp_rank, pp_size = self.pp_group.rank(), self.pp_group.size()
        for what, size, group in (
            ("tensor", parallel.tensor, self.tp_group),
            ("pipeline", parallel.pipeline, self.pp_group),
        ):
            if group.size() != size:
                raise ValueError(
                    f"parallel.{what} = {size}, but megatron's {what}-parallel group has {group.size()} ranks"
                )
        plan = plan or plan_stages(layout, pp_size)
        if plan.stages != pp_size:
            raise ValueError(
                f"stage plan has {plan.stages} stages but the pipeline group has {pp_size} ranks"
            )
        chunk = plan.chunk_index(pp_rank, vp_stage)
        self.pre_process = chunk == 0 if pre_process is None else pre_process
        self.post_process = chunk == len(plan.chunks) - 1 if post_process is None else post_process
        # megatron's LanguageModule reads it: the word embedding then has a copy here, set up and
        # kept in step with the first stage's (initial all-reduce, finalize_model_grads)
        self.mtp_process = self.post_process and config.mtp_depth > 0
        self.vp_stage = vp_stage
        self.model_config, self.layout, self.plan, self.parallel = config, layout, plan, parallel
        self.model_type = ModelType.encoder_or_decoder  # megatron's schedules read it
        self.backend: Backend = resolve_backend(config.backend)
        self.share_embeddings_and_output_weights = not config.untie_output
        self.vocab_size, self.max_sequence_length = config.vocab_size, config.seq_length
        self.position_embedding_type = "rope"
        if self.pre_process or self.mtp_process:
            self.embedding = HybridEmbedding(
                tc,
                config.vocab_size,
                config.seq_length,
                position_embedding_type="none",
                tp_group=self.tp_group,
                ngram=config.embedding.ngram_config(),
                structure=config.embedding.structure_config(),
                main_replica=self.pre_process,
            )
        self.rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.head_dim,
            rotary_percent=1.0,
            rotary_base=int(config.attention.rope_base),
            use_cpu_initialization=tc.use_cpu_initialization,
        )
        kinds = plan.chunk_kinds(pp_rank, vp_stage)
        letters = set(kinds) | (set(MTP_LETTERS) if self.mtp_process else set())
        specs = layer_specs(self.backend, config)
        layer_configs = {k: transformer_config(config, layout, parallel, k) for k in letters}
        recompute = {k: config.recompute_for(k) for k in letters}

        def stack(kinds: str, offset: int, pre_process: bool) -> NamStack:
            return NamStack(
                tc,
                kinds,
                offset,
                specs,
                layer_configs,
                recompute,
                self.backend.norm,
                pg_collection,
                pre_process=pre_process,
                post_process=self.post_process,
            )

        self.decoder = stack(kinds, plan.offset(pp_rank, vp_stage), self.pre_process)
        if config.cuda_graphs:
            if (reason := graphs_unavailable(config.cuda_graphs)) is not None:
                raise SpecConfigError(reason)
            self.decoder.graphs = layer_graphs(kinds, self.decoder.layers, config.cuda_graphs)
        if self.mtp_process:
            # the depths' layers are numbered on after the model's (unique hook and layer numbers)
            width = len(MTP_LETTERS)
            self.mtp = MultiTokenPrediction(
                tc,
                [
                    MtpDepth(
                        tc,
                        stack(MTP_LETTERS, layout.depth + k * width, True),
                        self.backend.norm,
                        pg_collection,
                    )
                    for k in range(config.mtp_depth)
                ],
            )
        if self.post_process:
            self.output_layer = ColumnParallelLinear(
                tc.hidden_size,
                config.vocab_size,
                config=tc,
                init_method=tc.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=(self.pre_process or self.mtp_process)
                and self.share_embeddings_and_output_weights,
                tp_group=self.tp_group,
            )
        if self.pre_process or self.post_process:
            self.setup_embeddings_and_output_layer()
        if self.mtp_process and self.share_embeddings_and_output_weights:
            # The last stage's copy of the word embedding is also its output layer's weight: with
            # gradient_accumulation_fusion the output layer writes main_grad and marks it, and DDP's
            # hook then adds the lookups' gradient only under this mark, which megatron sets only
            # when the pipeline has one stage.
            self.shared_embedding_or_output_weight().zero_out_wgrad = True

    def allreduce_embedding_copy_grads(self) -> None:
        """Sum the gradients of nam-embed's extras over the stages that hold the embedding (the
        first, and the last's copy for multi-token prediction): megatron's finalize_model_grads
        sums the word embedding's alone. Call it after that, on every chunk."""
        if (self.pre_process or self.mtp_process) and self._is_in_embd_group() and self.embd_group.size() > 1:
            self.embedding.allreduce_extra_grads(self.embd_group)

    def set_input_tensor(self, input_tensor: torch.Tensor | list[torch.Tensor]) -> None:
        if isinstance(input_tensor, list):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        **embedding_inputs: Any,
    ) -> torch.Tensor:
        if packed_seq_params is not None and self.backend.name != "local":
            raise ValueError(
                f"document boundaries (packed_seq_params) need model.backend = 'local'; the "
                f"{self.backend.name!r} backend's attention takes them only in megatron's THD layout, "
                "which nam-spec does not build"
            )
        hidden = None
        if self.pre_process:
            hidden = self.embedding(input_ids=input_ids, position_ids=position_ids, **embedding_inputs)
        local = hidden if hidden is not None else self.decoder.input_tensor
        seq_len = local.shape[0] * (self.tp_group.size() if self.config.sequence_parallel else 1)
        rotary = self.rotary_pos_emb(seq_len)
        hidden = self.decoder(hidden, attention_mask, rotary, packed_seq_params)
        if not self.post_process:
            return hidden
        weight = (
            self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        )
        if labels is None:
            logits, _ = self.output_layer(hidden, weight=weight)
            return logits.transpose(0, 1).contiguous()
        loss = self._token_losses(hidden, labels, weight)
        if not (self.mtp_process and self.training):
            return loss
        losses = [loss]
        mtp_hidden = self.mtp(
            hidden,
            input_ids,
            position_ids,
            embedding_inputs,
            self.embedding,
            attention_mask,
            rotary,
            packed_seq_params,
        )
        for h in mtp_hidden:
            labels = shift_left(labels)
            losses.append(self._token_losses(h, labels, weight))
        return torch.stack(losses)

    def _token_losses(
        self, hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-token loss [b, s] of the output layer on ``hidden``: chunked with
        ``model.loss_chunk_tokens`` (nam_spec.cross_entropy), else from the whole logits."""
        chunk = self.model_config.loss_chunk_tokens
        if not chunk:
            logits, _ = self.output_layer(hidden, weight=weight)
            return self.compute_language_model_loss(labels, logits)
        return linear_cross_entropy(
            hidden,
            self.output_layer.weight if weight is None else weight,
            labels,
            self.tp_group,
            # the output layer's own flag (megatron turns it off at TP=1)
            sequence_parallel=self.output_layer.sequence_parallel,
            chunk_tokens=chunk,
        )


def build_model(
    layout: Layout, config: ModelConfig, parallel: ParallelConfig | None = None, **kwargs: Any
) -> NamModel:
    """The model chunk of this rank (megatron's parallel state must be initialised). Validates the
    config against the layout before allocating anything. ``layout``: ``config.layout()``, or
    any other layout to build at this geometry."""
    if not isinstance(layout, Layout):
        raise TypeError(f"build_model takes a Layout (e.g. config.layout()), got {type(layout).__name__}")
    return NamModel(config, layout, parallel, **kwargs)  # which validates before allocating
