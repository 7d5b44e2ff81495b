"""MoE metrics of a step: megatron's aux losses and nam-spec's per-expert token counts.

megatron's tracker is reduced here, in the order of its report() (pipeline, the entry's own group,
data parallel), rather than by report(), which formats a console string and writes its own
TensorBoard scalars; averages are sums and a division, the same on gloo and NCCL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist


class MoEMetrics:
    def __init__(self, chunks: list[Any], model_config: Any, layout: Any, device: torch.device) -> None:
        from megatron.core.utils import unwrap_model

        from nam_spec.moe_metrics import MoECounter, init_megatron_tracker

        self.moe_layers = layout.counts.get("E", 0)
        self.enabled = self.moe_layers > 0
        if self.enabled:
            self.counter = MoECounter(unwrap_model(chunks), model_config, layout.depth)
            init_megatron_tracker(model_config, layout.depth, device=device)

    def collect(self, microbatches: int) -> dict[str, float]:
        """This step's metrics (a collective: every rank calls it), then reset for the next step."""
        if not self.enabled:
            return {}
        from megatron.core import parallel_state
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        out: dict[str, float] = {}
        tracker = get_moe_metrics_tracker()
        dp = parallel_state.get_data_parallel_group()
        for name, entry in sorted(tracker.metrics.items()):
            v = entry.values.clone()
            torch_dist.all_reduce(v, group=parallel_state.get_pipeline_model_parallel_group())
            if entry.reduce_group is not None:
                torch_dist.all_reduce(v, group=entry.reduce_group)
            if entry.avg_group is not None:
                torch_dist.all_reduce(v, group=entry.avg_group)
                v /= torch_dist.get_world_size(entry.avg_group)
            if entry.needs_dp_avg:
                torch_dist.all_reduce(v, group=dp)
                v /= torch_dist.get_world_size(dp)
            out[f"moe/{name}"] = float(v.sum()) / self.moe_layers / microbatches
        tracker.clear()
        out.update(self.counter.collect().as_metrics())
        return out

    def discard(self) -> None:
        """Forget what an evaluation's forwards recorded (a collective)."""
        if self.enabled:
            from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

            get_moe_metrics_tracker().clear()
            self.counter.collect()
