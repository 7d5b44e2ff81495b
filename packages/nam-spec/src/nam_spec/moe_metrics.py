"""MoE observability: tokens per expert, imbalance and dead experts per E layer.

A forward hook on each router adds its routing map's column sums to a per-layer counter.
:func:`collect` reduces the counters of all ranks into one [depth, num_experts] table indexed by
global layer: every rank contributes a table of the same shape (zeros for layers it does not
hold), so a pipeline stage without E layers takes part in the same collectives and nothing hangs.
:func:`init_megatron_tracker` does the same for megatron's own aux-loss tracker, which otherwise
skips metrics a stage never recorded and deadlocks the pipeline-parallel all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

from nam_spec.config import ModelConfig


@dataclass
class MoEStats:
    tokens: torch.Tensor  # [depth, num_experts], routed token-slots per expert (0 rows: not an E layer)
    layers: list[int]  # 1-based global numbers of the E layers

    def imbalance(self) -> dict[int, float]:
        """Busiest expert's tokens over the mean, per E layer (1.0 is perfect balance)."""
        out = {}
        for n in self.layers:
            row = self.tokens[n - 1].double()
            out[n] = float(row.max() / row.mean()) if row.sum() > 0 else float("nan")
        return out

    def dead(self) -> dict[int, int]:
        """Experts that received no token, per E layer."""
        return {n: int((self.tokens[n - 1] == 0).sum()) for n in self.layers}

    def as_metrics(self, prefix: str = "moe") -> dict[str, float]:
        """Flat scalars for a metrics logger: per-layer imbalance and dead experts, and their extremes."""
        imb, dead = self.imbalance(), self.dead()
        out: dict[str, float] = {}
        for n in self.layers:
            out[f"{prefix}/layer{n:02d}/imbalance"] = imb[n]
            out[f"{prefix}/layer{n:02d}/dead_experts"] = float(dead[n])
        if self.layers:
            out[f"{prefix}/max_imbalance"] = max(imb.values())
            out[f"{prefix}/dead_experts"] = float(sum(dead.values()))
        return out


class MoECounter:
    """Counts routed tokens per expert for every MoE layer of the given model chunks."""

    def __init__(self, chunks: list[torch.nn.Module], config: ModelConfig, depth: int) -> None:
        self.num_experts, self.depth = config.moe.num_experts, depth
        self._counts: dict[int, torch.Tensor] = {}
        self._handles = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, MoELayer):
                    self._handles.append(module.router.register_forward_hook(self._hook(module.layer_number)))

    def _hook(self, layer_number: int):
        def hook(
            _module: torch.nn.Module, _inputs: object, output: tuple[torch.Tensor, torch.Tensor]
        ) -> None:
            counts = output[1].detach().sum(dim=0)  # the routing map's column sums
            kept = self._counts.get(layer_number)
            if kept is None:
                self._counts[layer_number] = counts.to(torch.float64)
            else:  # in place: a CUDA graph of the layer (nam_spec.graphs) replays this add into the same tensor
                kept.add_(counts)

        return hook

    def collect(self, group: dist.ProcessGroup | None = None, reset: bool = True) -> MoEStats:
        """Sum over ``group`` (default: every rank). Each token-slot is counted by every rank that
        routes it (tensor-parallel ranks under sequence parallelism see different tokens; without
        it they route the same tokens, so pass a group that excludes TP duplicates then)."""
        device = next(iter(self._counts.values())).device if self._counts else "cpu"
        table = torch.zeros(self.depth, self.num_experts, dtype=torch.float64, device=device)
        for n, c in self._counts.items():
            table[n - 1] += c
        if dist.is_initialized():
            dist.all_reduce(table, group=group)
        if reset:
            for counts in self._counts.values():
                counts.zero_()
        layers = [i + 1 for i in range(self.depth) if table[i].sum() > 0]
        return MoEStats(table.to(torch.int64).cpu(), layers)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def tracker_names(config: ModelConfig) -> list[str]:
    """The names megatron's router records for this config's load balancing."""
    return {
        "aux_loss": ["load_balancing_loss"],
        "seq_aux_loss": ["seq_load_balancing_loss"],
        "none": [],
    }[config.moe.load_balancing]


def init_megatron_tracker(config: ModelConfig, depth: int, device: torch.device | str | None = None) -> None:
    """Pre-create megatron's MoE tracker entries on this rank so stages without E layers join
    the pipeline-parallel reduction of report() instead of skipping it."""
    tracker = get_moe_metrics_tracker()
    for name in tracker_names(config):
        tracker.ensure_initialized(name, depth, device=device)
