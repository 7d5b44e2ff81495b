"""MambaAdapter and Mamba3Adapter: nam_mixers.MambaCore / Mamba3Core between megatron
column/row-parallel projections.

in_proj's output is laid out [z, x, B, C, dt] (DESIGN.md), so under TP each rank's column shard
holds its own [z_r, x_r, B_r, C_r, dt_r]: d_inner/tp channels, ngroups/tp groups, nheads/tp
heads. The core runs on those local heads and groups (its norm is group-wise, so the split does
not change the math); out_proj is row-parallel. Checkpoints store each of z, x, B, C and dt (and
the conv's x, B, C) as its own TP-sharded tensor, so they load at any TP size.

Mamba-3 splits the same way ([z, x, B, C, dt, A, trap]); its angle projection is shared by all
heads, so it is replicated on every rank as M2RNN's q/k head is: it runs on the local tokens and is
all-gathered along the sequence, whose backward reduce-scatter sums the ranks' partial gradients,
and megatron sums the weight's (and the B/C norm weights') gradients over TP through the
``sequence_parallel`` mark; validation therefore requires sequence parallelism with TP > 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from torch import nn

from nam_mixers import Mamba3Core, MambaCore
from nam_spec.adapters.layer import (
    mark_core_parameters,
    mark_tensor_parallel,
    replicate_across_tp,
    seq_idx_from_packed,
)
from nam_spec.adapters.projected import ProjectedCoreAdapter
from nam_spec.devices import param_device


class _SplitHeadsAdapter(ProjectedCoreAdapter):
    """What the Mamba-2 and Mamba-3 adapters share: this rank's channels, groups and heads, and
    in_proj's local rows as named parts of them (for plasticity and for checkpoints)."""

    def _local_sizes(
        self, hidden_size: int, expand: int, head_dim: int, ngroups: int, d_state: int
    ) -> tuple[int, int]:
        """Sets this rank's sizes; returns the model's d_inner and heads."""
        tp = self.tp_group.size()
        d_inner = expand * hidden_size
        nheads = d_inner // head_dim
        self.d_inner_local, self.ngroups_local, self.nheads_local = d_inner // tp, ngroups // tp, nheads // tp
        self.d_state = d_state
        return d_inner, nheads

    def _parts(self) -> list[tuple[str, int]]:
        """in_proj's local rows in order: [z, x, B, C, dt] (Mamba-3 adds its own after them)."""
        di, gn, nh = self.d_inner_local, self.ngroups_local * self.d_state, self.nheads_local
        return [("z", di), ("x", di), ("B", gn), ("C", gn), ("dt", nh)]

    def plasticity_parts(self) -> dict[str, Any]:
        """nam-plasticity's plasticity-parts protocol: in_proj's local rows are ``_parts()`` of this
        rank's channels, groups and heads, so each part gathered over TP ranks is that part of the
        model."""
        return {"rows": {"in_proj.weight": {"parts": tuple(self._parts())}}}

    def _split_in_proj(self, out: ShardedStateDict, prefix: str) -> None:
        """in_proj's weight stored as one TP-sharded tensor per part."""
        names, sizes = zip(*self._parts(), strict=True)
        key = f"{prefix}in_proj.weight"
        out[key] = _split_tensor_factory(out[key], list(sizes), list(names), 0)


class MambaAdapter(_SplitHeadsAdapter):
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
        super().__init__(config, pg_collection, recompute_core)
        d_inner, nheads = self._local_sizes(config.hidden_size, expand, head_dim, ngroups, d_state)
        self._projections(column_linear, row_linear, 2 * d_inner + 2 * ngroups * d_state + nheads, d_inner)
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
                device=param_device(config),
                dtype=config.params_dtype,
            )
        mark_tensor_parallel(*self.core.parameters())

    def forward(
        self, hidden_states: torch.Tensor, packed_seq_params: PackedSeqParams | None = None, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, local] over the full sequence
        zxbcdt = zxbcdt.transpose(0, 1)
        seq_idx = seq_idx_from_packed(packed_seq_params, zxbcdt.shape[1], zxbcdt.shape[0], zxbcdt.device)
        y = self._run_core(zxbcdt, seq_idx)
        return self.out_proj(y.transpose(0, 1).contiguous())

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = self._projections_sharded_state_dict(prefix, sharded_offsets, metadata)
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
        self._split_in_proj(out, prefix)
        di, gn = self.d_inner_local, self.ngroups_local * self.d_state
        for name in ("conv_weight", "conv_bias"):
            key = f"{prefix}core.{name}"
            out[key] = _split_tensor_factory(out[key], [di, gn, gn], ["x", "B", "C"], 0)
        return out


_MAMBA3_REPLICATED = ("B_norm_weight", "C_norm_weight")


class Mamba3Adapter(_SplitHeadsAdapter):
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
        chunk_size: int = 64,
        rope_fraction: float = 0.5,
        A_floor: float = 1e-4,
        path: str = "auto",
        recompute_core: bool = False,
    ) -> None:
        super().__init__(config, pg_collection, recompute_core)
        d_inner, nheads = self._local_sizes(config.hidden_size, expand, head_dim, ngroups, d_state)
        kw = {"device": param_device(config), "dtype": config.params_dtype}
        self._projections(
            column_linear, row_linear, 2 * d_inner + 2 * ngroups * d_state + 3 * nheads, d_inner
        )
        with tensor_parallel.get_cuda_rng_tracker().fork():  # local heads: TP-rank-specific init
            self.core = Mamba3Core(
                self.nheads_local,
                headdim=head_dim,
                d_state=d_state,
                ngroups=self.ngroups_local,
                chunk_size=chunk_size,
                rope_fraction=rope_fraction,
                A_floor=A_floor,
                norm_eps=config.layernorm_epsilon,
                path=path,
                **kw,
            )
        self.angle_weight = nn.Parameter(torch.empty(self.core.shape.n_angles, config.hidden_size, **kw))
        if config.perform_initialization:
            config.init_method(self.angle_weight)
        mark_core_parameters(self.core, _MAMBA3_REPLICATED, self.tp_group)
        replicate_across_tp(self.angle_weight, self.tp_group)

    def _parts(self) -> list[tuple[str, int]]:
        """[z, x, B, C, dt, A, trap]; the angle projection is replicated, so not a part."""
        return [*super()._parts(), ("dd_A", self.nheads_local), ("trap", self.nheads_local)]

    def forward(
        self, hidden_states: torch.Tensor, packed_seq_params: PackedSeqParams | None = None, **_: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        angles = F.linear(hidden_states, self.angle_weight)  # local tokens under sequence parallelism
        if self.config.sequence_parallel and self.tp_group.size() > 1:
            angles = gather_from_sequence_parallel_region(angles, group=self.tp_group)
        zxbcdt, _ = self.in_proj(hidden_states)  # [s, b, local] over the full sequence
        zxbcdt, angles = zxbcdt.transpose(0, 1), angles.transpose(0, 1)
        seq_idx = seq_idx_from_packed(packed_seq_params, zxbcdt.shape[1], zxbcdt.shape[0], zxbcdt.device)
        y = self._run_core(zxbcdt, angles, seq_idx)
        return self.out_proj(y.transpose(0, 1).contiguous())

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = self._projections_sharded_state_dict(prefix, sharded_offsets, metadata)
        own = {"angle_weight": self.angle_weight}
        own.update({f"core.{k}": v for k, v in self.core.state_dict(prefix="", keep_vars=True).items()})
        split = {
            k: 0 for k in own if k.startswith("core.") and k.removeprefix("core.") not in _MAMBA3_REPLICATED
        }
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
        self._split_in_proj(out, prefix)
        return out
