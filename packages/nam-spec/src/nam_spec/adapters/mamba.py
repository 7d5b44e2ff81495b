"""MambaAdapter: nam_mixers.MambaCore between megatron column/row-parallel projections.

in_proj's output is laid out [z, x, B, C, dt] (DESIGN.md), so under TP each rank's column shard
holds its own [z_r, x_r, B_r, C_r, dt_r]: d_inner/tp channels, ngroups/tp groups, nheads/tp
heads. The core runs on those local heads and groups (its norm is group-wise, so the split does
not change the math); out_proj is row-parallel. Checkpoints store each of z, x, B, C and dt (and
the conv's x, B, C) as its own TP-sharded tensor, so they load at any TP size.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from nam_mixers import MambaCore
from nam_spec.adapters.layer import mark_tensor_parallel, seq_idx_from_packed
from nam_spec.devices import param_device


class MambaAdapter(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        column_linear: Any,
        row_linear: Any,
        layer_number: int = 1,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        d_state: int = 64,
        head_dim: int = 64,
        ngroups: int = 8,
        expand: int = 2,
        conv_width: int = 4,
        chunk_size: int = 128,
        path: str = "auto",
        recompute_core: bool = False,
    ) -> None:
        super().__init__(config)
        pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        d_inner = expand * config.hidden_size
        nheads = d_inner // head_dim
        self.d_inner_local, self.ngroups_local, self.nheads_local = d_inner // tp, ngroups // tp, nheads // tp
        self.d_state = d_state
        self.recompute_core = recompute_core
        d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads
        self.in_proj = column_linear(
            config.hidden_size,
            d_in_proj,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )
        device = param_device(config)
        with tensor_parallel.get_cuda_rng_tracker().fork():  # local heads: TP-rank-specific init
            self.core = MambaCore(
                self.nheads_local,
                headdim=head_dim,
                d_state=d_state,
                ngroups=self.ngroups_local,
                conv_width=conv_width,
                chunk_size=chunk_size,
                norm_eps=config.layernorm_epsilon,
                path=path,
                device=device,
                dtype=config.params_dtype,
            )
        mark_tensor_parallel(*self.core.parameters())
        self.out_proj = row_linear(
            d_inner,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )

    def forward(
        self, hidden_states: torch.Tensor, packed_seq_params: PackedSeqParams | None = None, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, local] over the full sequence
        zxbcdt = zxbcdt.transpose(0, 1)
        seq_idx = seq_idx_from_packed(packed_seq_params, zxbcdt.shape[1], zxbcdt.shape[0], zxbcdt.device)
        if self.recompute_core and self.training:
            y = torch.utils.checkpoint.checkpoint(self.core, zxbcdt, seq_idx, use_reentrant=False)
        else:
            y = self.core(zxbcdt, seq_idx)
        return self.out_proj(y.transpose(0, 1).contiguous())

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out: ShardedStateDict = {}
        for name, module in (("in_proj", self.in_proj), ("out_proj", self.out_proj)):
            out.update(
                sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        core_state = self.core.state_dict(prefix="", keep_vars=True)
        out.update(
            make_sharded_tensors_for_checkpoint(
                core_state,
                f"{prefix}core.",
                dict.fromkeys(core_state, 0),
                sharded_offsets,
                tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"],
            )
        )
        di, gn, nh = self.d_inner_local, self.ngroups_local * self.d_state, self.nheads_local
        out[f"{prefix}in_proj.weight"] = _split_tensor_factory(
            out[f"{prefix}in_proj.weight"], [di, di, gn, gn, nh], ["z", "x", "B", "C", "dt"], 0
        )
        for name in ("conv_weight", "conv_bias"):
            key = f"{prefix}core.{name}"
            out[key] = _split_tensor_factory(out[key], [di, gn, gn], ["x", "B", "C"], 0)
        return out
