"""What the M and R adapters share: a core between a column-parallel in_proj and a row-parallel out_proj."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import sharded_state_dict_default


class ProjectedCoreAdapter(MegatronModule):
    """Subclasses build ``self.core`` (on the local heads) between `_projections`' two linears.

    in_proj's output is split across TP ranks by columns (whole heads per rank) and out_proj's input
    by rows, so the core never communicates; megatron's linears do.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None,
        recompute_core: bool,
    ) -> None:
        super().__init__(config)
        pg_collection = pg_collection or ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.recompute_core = recompute_core

    def _projections(self, column_linear: Any, row_linear: Any, in_features: int, out_features: int) -> None:
        """in_proj: hidden -> in_features (column-parallel); out_proj: out_features -> hidden (row-parallel)."""
        common = {"config": self.config, "bias": False, "is_expert": False, "tp_group": self.tp_group}
        self.in_proj = column_linear(
            self.config.hidden_size,
            in_features,
            init_method=self.config.init_method,
            gather_output=False,
            skip_bias_add=False,
            tp_comm_buffer_name="fc1",
            **common,
        )
        self.out_proj = row_linear(
            out_features,
            self.config.hidden_size,
            init_method=self.config.output_layer_init_method,
            input_is_parallel=True,
            skip_bias_add=True,
            tp_comm_buffer_name="fc2",
            **common,
        )

    def _run_core(self, *args: torch.Tensor | None) -> torch.Tensor:
        """The core, recomputed in backward instead of keeping its activations when asked."""
        if self.recompute_core and self.training:
            # the cores draw no random numbers: no RNG state to keep (and none to read inside a CUDA graph capture)
            return torch.utils.checkpoint.checkpoint(
                self.core, *args, use_reentrant=False, preserve_rng_state=False
            )
        return self.core(*args)

    def _projections_sharded_state_dict(
        self, prefix: str, sharded_offsets: tuple, metadata: dict
    ) -> ShardedStateDict:
        out: ShardedStateDict = {}
        for name, module in (("in_proj", self.in_proj), ("out_proj", self.out_proj)):
            out.update(
                sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        return out
