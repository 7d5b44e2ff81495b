"""One residual mixer layer (the M and R letters): x + mixer(norm(x)), through megatron's bias-dropout-add.

The mixer adapters take and return megatron's sequence-first [s, b, h] (the local sequence slice
under sequence parallelism) and return ``(output, bias)`` as megatron's linears do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from nam_spec.documents import segment_ids


@dataclass
class MixerLayerSubmodules:
    norm: Any
    mixer: ModuleSpec | type
    bda: Any


class MixerLayer(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        submodules: MixerLayerSubmodules,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        **_: object,  # the stack passes the same keywords to every layer kind
    ) -> None:
        super().__init__(config)
        self.layer_number = layer_number
        pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.norm = submodules.norm(
            config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
        )
        self.mixer = build_module(
            submodules.mixer, config=config, layer_number=layer_number, pg_collection=pg_collection
        )
        self.bda = build_module(submodules.bda)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_context: object = None,
        rotary_pos_emb: torch.Tensor | None = None,
        *,
        packed_seq_params: PackedSeqParams | None = None,
        **_: object,
    ) -> torch.Tensor:
        residual = hidden_states
        out_with_bias = self.mixer(self.norm(hidden_states), packed_seq_params=packed_seq_params)
        with torch.enable_grad():
            return self.bda(training=self.training, fused=self.config.bias_dropout_fusion)(
                out_with_bias, residual, self.config.hidden_dropout
            )


def seq_idx_from_packed(
    params: PackedSeqParams | None, s: int, b: int, device: torch.device
) -> torch.Tensor | None:
    """The mixers' seq_idx [b, s] (segment per token, see nam_spec.documents), None without boundaries;
    ``params.seq_idx`` when given (a CUDA graph's static input, nam_spec.graphs)."""
    if params is None:
        return None
    if params.seq_idx is not None:
        if params.seq_idx.shape != (b, s):
            raise ValueError(
                f"packed_seq_params.seq_idx must be [batch, seq] = [{b}, {s}], got {tuple(params.seq_idx.shape)}"
            )
        return params.seq_idx
    return segment_ids(params, b, s, device)


def mark_tensor_parallel(*params: torch.nn.Parameter) -> None:
    """Heads split across TP ranks along dim 0: megatron counts them once per rank in norms."""
    for p in params:
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1


@torch.no_grad()
def mark_core_parameters(
    core: torch.nn.Module, replicated: tuple[str, ...], group: torch.distributed.ProcessGroup
) -> None:
    """A mixer core's parameters under TP: those named in ``replicated`` (shared by all heads) held
    whole on every rank, the rest split by heads."""
    for name, p in core.named_parameters():
        if name in replicated:
            replicate_across_tp(p, group)
        else:
            mark_tensor_parallel(p)


def replicate_across_tp(p: torch.nn.Parameter, group: torch.distributed.ProcessGroup) -> None:
    """A parameter every TP rank holds whole: the same values everywhere, and (flagged like
    megatron's sequence-parallel norms) its gradient all-reduced over TP ranks."""
    p.sequence_parallel = True
    broadcast_from_first_rank(p, group)


def broadcast_from_first_rank(p: torch.Tensor, group: torch.distributed.ProcessGroup) -> None:
    """Make a replicated parameter identical on all TP ranks (not on meta: there is no data)."""
    if group.size() > 1 and p.device.type != "meta":
        torch.distributed.broadcast(p.data, src=torch.distributed.get_global_rank(group, 0), group=group)
