"""M2RNNAdapter: nam_mixers.M2RNNCore between megatron column/row-parallel projections.

Value heads split across TP ranks: in_proj's output is head-major ([v, g, x_f] per head), so a
contiguous column shard holds whole heads and the checkpoint layout does not depend on TP. The one
shared q/k head is replicated on every rank: its projection runs on the local tokens and the
result is all-gathered along the sequence, whose backward reduce-scatter sums the partial
gradients of the ranks' heads. The q/k weights (projection and conv) are then partial per rank and
marked ``sequence_parallel`` so megatron sums them over TP; config validation therefore requires
sequence parallelism for R layers with TP > 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import nn

from nam_mixers import M2RNNCore
from nam_spec.adapters.layer import mark_core_parameters, replicate_across_tp, seq_idx_from_packed
from nam_spec.adapters.projected import ProjectedCoreAdapter
from nam_spec.devices import param_device

_REPLICATED = ("qk_conv_weight", "qk_conv_bias")


class M2RNNAdapter(ProjectedCoreAdapter):
    def __init__(
        self,
        config: TransformerConfig,
        column_linear: Any,
        row_linear: Any,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        num_heads: int = 44,
        head_dim_v: int = 16,
        head_dim_k: int = 64,
        num_qk_heads: int = 1,
        conv_width: int = 4,
        path: str = "auto",
        recompute_core: bool = False,
    ) -> None:
        super().__init__(config, pg_collection, recompute_core)
        tp = self.tp_group.size()
        kw = {"device": param_device(config), "dtype": config.params_dtype}
        self.qk_weight = nn.Parameter(torch.empty(2 * num_qk_heads * head_dim_k, config.hidden_size, **kw))
        if config.perform_initialization:
            config.init_method(self.qk_weight)
        self._projections(column_linear, row_linear, num_heads * (2 * head_dim_v + 1), num_heads * head_dim_v)
        with tensor_parallel.get_cuda_rng_tracker().fork():  # local heads: TP-rank-specific init
            self.core = M2RNNCore(
                num_heads // tp,
                head_dim_k,
                head_dim_v,
                num_qk_heads=num_qk_heads,
                conv_width=conv_width,
                norm_eps=config.layernorm_epsilon,
                path=path,
                **kw,
            )
        mark_core_parameters(self.core, _REPLICATED, self.tp_group)  # the shared q/k head is one head
        replicate_across_tp(self.qk_weight, self.tp_group)

    def plasticity_parts(self) -> dict[str, Any]:
        """nam-plasticity's plasticity-parts protocol: the shared q/k projection is [q, k]
        (replicated), in_proj is head-major [v, g, x_f] per local value head, so v, g and the
        forget-gate input of all local heads gathered over TP ranks are those parts of the model."""
        c, v = self.core, self.core.head_dim_v
        qk = c.num_qk_heads * c.head_dim_k
        return {
            "rows": {
                "qk_weight": {"parts": (("q", qk), ("k", qk))},
                "in_proj.weight": {"parts": (("v", v), ("g", v), ("f", 1)), "repeat": c.num_heads},
            }
        }

    def forward(
        self, hidden_states: torch.Tensor, packed_seq_params: PackedSeqParams | None = None, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qk = F.linear(hidden_states, self.qk_weight)  # local tokens under sequence parallelism
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            qk = gather_from_sequence_parallel_region(qk, group=self.tp_group)
        vgf, _ = self.in_proj(hidden_states)
        qk, vgf = qk.transpose(0, 1), vgf.transpose(0, 1)
        seq_idx = seq_idx_from_packed(packed_seq_params, vgf.shape[1], vgf.shape[0], vgf.device)
        y = self._run_core(qk, vgf, seq_idx)
        return self.out_proj(y.transpose(0, 1).contiguous())

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = self._projections_sharded_state_dict(prefix, sharded_offsets, metadata)
        own = {"qk_weight": self.qk_weight}
        own.update({f"core.{k}": v for k, v in self.core.state_dict(prefix="", keep_vars=True).items()})
        split = {k: 0 for k in own if k.startswith("core.") and k.removeprefix("core.") not in _REPLICATED}
        out.update(
            make_sharded_tensors_for_checkpoint(
                own,
                prefix,
                split,
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
        return out
