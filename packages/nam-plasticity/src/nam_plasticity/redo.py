"""ReDo: find dormant neurons of MLP layers and recycle them.

A neuron of an MLP is one hidden unit: row i of fc1 (for SwiGLU, gate row i and up row i) feeds
it and column i of fc2 reads it. Its activation is entry i of fc2's input, which is what the
hook reads, so SwiGLU needs nothing special and an expert (a SequentialMLP expert, or one
slice of a grouped expert's input) sees only the tokens routed to it.

Score (Sokar et al., "The Dormant Neuron Phenomenon in Deep Reinforcement Learning", 2023):
s_i = E|a_i| / mean_j E|a_j| over the neurons of the layer (all tensor-parallel ranks), with E
an EMA over training forwards. Neuron i is dormant when s_i <= tau. Recycling draws its incoming
rows afresh from the layer's initial distribution and zeroes (or fills with small noise) its
outgoing column; its score restarts at the layer mean so it is not recycled again at once.

The units come from the ``neurons`` a module declares (``nam_plasticity.parts``: its own
``plasticity_parts()``, else the megatron rules, which declare every megatron MLP): fc1, fc2,
whether fc1 is gated, the tensor-parallel group of the units, a fresh row's std, and
``activations(hook)``, through which the module hands fc2's input to the statistics every
forward. Grouped experts (3-D fc1 and fc2) hand over the tokens per expert with it; each expert
is then its own layer, an expert that received no tokens keeps its statistic, and one that has
never received any is not scored.

Data-parallel replicas see different tokens, so their EMAs differ; before scoring, each layer's
EMA is averaged over its data-parallel group (dense layers: megatron's data-parallel group with
context parallel; grouped experts: the expert-data-parallel group, as each expert lives on one
expert-parallel rank; plain torch: ``Redo(group=)``; no distributed init: nothing), counting
only replicas where the expert has received tokens, and written back when recycling. Every
replica therefore takes the same decision and edits its own shard of the same values.

The fresh rows are drawn for the gathered layer from a generator seeded by (seed, step, layer),
and each rank keeps its own rows, so a tensor-parallel run recycles exactly what a
single-process run would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nam_plasticity.naming import expert_indices, global_names
from nam_plasticity.params import resolve
from nam_plasticity.parts import Declaration, Neurons, declarations
from nam_plasticity.records import Record


@dataclass(frozen=True)
class RedoConfig:
    """tau: dormancy threshold on the normalised score. beta: EMA decay of the activation
    statistic. noise_std: std of the outgoing weights of a recycled neuron (0: zeros).
    init_std: std of the fresh incoming rows; None takes the layer's ``config.init_method_std``
    (megatron) or nn.Linear's 1 / sqrt(3 fan_in)."""

    tau: float = 0.1
    beta: float = 0.99
    noise_std: float = 0.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        if self.tau < 0 or not 0 <= self.beta < 1:
            raise ValueError(
                f"RedoConfig: need tau >= 0 and 0 <= beta < 1, got tau={self.tau}, beta={self.beta}"
            )


@dataclass
class MLPLayer:
    """One MLP (or one expert) ReDo watches: fc1 [(2 x) ffn, hidden], fc2 [hidden, ffn]; for an
    expert of grouped weights, ``expert`` indexes dim 0 of 3-D fc1 and fc2 and ``seen`` (a 0-d
    bool tensor) says whether it has received tokens yet."""

    name: str
    fc1: nn.Parameter
    fc2: nn.Parameter
    gated: bool
    group: dist.ProcessGroup | None
    init_std: float
    tensors: tuple[str, str]
    expert: int | None = None
    replicas: dist.ProcessGroup | None = None  # data-parallel replicas of the layer
    ema: torch.Tensor | None = None
    seen: torch.Tensor | None = None

    @property
    def neurons(self) -> int:
        return self.fc2.shape[-1]

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This layer's matrix (a view) of a tensor shaped like fc1 or fc2."""
        return full if self.expert is None else full[self.expert]


@dataclass
class GroupedStats:
    """The activation EMA of all local experts of one grouped module, updated without a host sync."""

    ema: torch.Tensor  # [E_local, F_local]
    seen: torch.Tensor  # [E_local] bool


def _layers(name: str, d: Declaration, modules: dict[str, nn.Module], config: RedoConfig) -> list[MLPLayer]:
    """The layers of one module's ``neurons``: the MLP, or one per local expert of grouped weights."""
    spec = d.parts["neurons"]
    unknown, missing = set(spec) - set(Neurons.__annotations__), Neurons.__required_keys__ - set(spec)
    if unknown or missing:
        raise ValueError(
            f"ReDo: {d.source}: neurons with unknown keys {sorted(unknown)}, missing {sorted(missing)}; "
            f"accepted {sorted(Neurons.__annotations__)}"
        )
    w1, w2 = d.module.get_parameter(spec["fc1"]), d.module.get_parameter(spec["fc2"])
    gated = bool(spec.get("gated", False))
    if w1.dim() != w2.dim() or w1.dim() not in (2, 3) or w1.shape[-2] != w2.shape[-1] * (2 if gated else 1):
        raise ValueError(
            f"ReDo: {d.source}: fc1 {tuple(w1.shape)} and fc2 {tuple(w2.shape)} (gated={gated}); "
            "accepted [(2 x) F, H] and [H, F], or grouped [E, (2 x) F, H] and [E, H, F]"
        )
    std = float(config.init_std or spec.get("init_std") or 1 / math.sqrt(3 * w1.shape[-1]))
    group = spec.get("group")
    group = group if group is not None and group.size() > 1 else None
    tensors = (f"{name}.{spec['fc1']}", f"{name}.{spec['fc2']}")
    if w1.dim() == 2:
        return [MLPLayer(name, w1, w2, gated, group, std, tensors)]
    return [
        MLPLayer(f"{name}.{g}", w1, w2, gated, group, std, tensors, expert=e)
        for e, g in enumerate(expert_indices(modules, d.name, w1.shape[0]))
    ]


def _replica_group(expert: bool, group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The data-parallel group holding replicas of a layer: megatron's (expert-)data-parallel
    group when its parallel state is initialised, else ``group``; None when it has one rank."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        if expert:
            group = parallel_state.get_expert_data_parallel_group()
        else:
            group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return group if group is not None and group.size() > 1 else None


def _find_layers(
    model_chunks: Iterable[nn.Module], config: RedoConfig
) -> list[tuple[Declaration, list[MLPLayer]]]:
    """(declaring module, its layers) for every module that declares ``neurons``."""
    found = []
    for chunk in model_chunks:
        names = global_names(chunk)
        modules = dict(chunk.named_modules())
        for d in declarations(chunk):
            if "neurons" in d.parts:
                found.append((d, _layers(names[d.name], d, modules, config)))
    return found


def _rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)


@dataclass
class Redo:
    """Activation statistics (hooks) and recycling for every MLP / expert of the model."""

    config: RedoConfig = field(default_factory=RedoConfig)
    seed: int = 0
    group: dist.ProcessGroup | None = None  # data-parallel group without megatron's parallel state
    layers: list[MLPLayer] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _grouped: dict[str, GroupedStats] = field(default_factory=dict, repr=False)  # by fc2's name

    def attach(self, model_chunks: Sequence[nn.Module]) -> None:
        """Hook every declared MLP's activations; the hooks update the EMA during training forwards."""
        self.detach()
        self.layers = []
        self._grouped = {}
        for d, layers in _find_layers(model_chunks, self.config):
            for layer in layers:
                layer.replicas = _replica_group(layer.expert is not None, self.group)
            self.layers += layers
            grouped = layers[0].expert is not None
            hook = self._grouped_hook(d.module, layers) if grouped else self._hook(d.module, layers[0])
            self._handles.append(d.parts["neurons"]["activations"](hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, layer: MLPLayer):
        beta = self.config.beta

        def hook(act: torch.Tensor, _counts: torch.Tensor | None) -> None:
            if not module.training or not torch.is_grad_enabled():
                return
            x = act.detach()
            if x.numel() == 0:
                return
            stat = x.reshape(-1, x.shape[-1]).abs().float().mean(0)
            layer.ema = stat if layer.ema is None else layer.ema.mul_(beta).add_(stat, alpha=1 - beta)

        return hook

    def _grouped_hook(self, module: nn.Module, experts: list[MLPLayer]):
        """Per-expert means of |activation| over the expert's tokens, folded into its EMA on the
        device; an expert without tokens keeps its EMA, its first tokens initialise it."""
        beta = self.config.beta

        def hook(act: torch.Tensor, counts: torch.Tensor) -> None:
            if not module.training or not torch.is_grad_enabled():
                return
            x = act.detach().abs().float()
            counts = counts.to(x.device)
            stats = self._grouped.get(experts[0].tensors[1])
            if stats is None:
                stats = GroupedStats(
                    torch.zeros(len(experts), x.shape[-1], device=x.device),
                    torch.zeros(len(experts), dtype=torch.bool, device=x.device),
                )
                self.set_grouped(experts, stats)
            ids = torch.repeat_interleave(
                torch.arange(len(experts), device=x.device), counts, output_size=x.shape[0]
            )
            sums = torch.zeros_like(stats.ema).index_add_(0, ids, x)
            mean = sums / counts.clamp_min(1)[:, None].float()
            has = (counts > 0)[:, None]
            mixed = stats.ema * beta + mean * (1 - beta)
            stats.ema.copy_(torch.where(has & ~stats.seen[:, None], mean, torch.where(has, mixed, stats.ema)))
            stats.seen |= has[:, 0]

        return hook

    def set_grouped(self, experts: list[MLPLayer], stats: GroupedStats) -> None:
        """Make ``stats`` the statistics of the local experts of one grouped module (each expert's
        ``ema`` and ``seen`` are views of its row)."""
        self._grouped[experts[0].tensors[1]] = stats
        for i, layer in enumerate(experts):
            layer.ema, layer.seen = stats.ema[i], stats.seen[i]

    @staticmethod
    def replica_ema(layer: MLPLayer) -> torch.Tensor | None:
        """The layer's EMA averaged over its data-parallel replicas that have statistics (None
        when none has). Every replica must call this: it is a collective over ``layer.replicas``."""
        has = layer.ema is not None and (layer.seen is None or bool(layer.seen))
        if layer.replicas is None:
            return layer.ema if has else None
        device = layer.fc2.device if layer.ema is None else layer.ema.device
        local = layer.ema if has else torch.zeros(layer.neurons, device=device)
        total = torch.cat([local.float(), torch.ones(1, device=device) * float(has)])
        dist.all_reduce(total, group=layer.replicas)
        return total[:-1] / total[-1] if total[-1] > 0 else None

    @staticmethod
    def _mean(layer: MLPLayer, ema: torch.Tensor) -> torch.Tensor:
        """Mean EMA over all neurons of the layer, every tensor-parallel rank included."""
        total = torch.stack([ema.sum(), torch.tensor(float(layer.neurons), device=ema.device)])
        if layer.group is not None:
            dist.all_reduce(total, group=layer.group)
        return total[0] / total[1]

    def _scored(self, layer: MLPLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(replica-averaged EMA, its normalised scores) of the local neurons; None before the
        layer's first forward on any replica."""
        ema = self.replica_ema(layer)
        if ema is None:
            return None
        return ema, ema / self._mean(layer, ema).clamp_min(torch.finfo(torch.float32).tiny)

    def scores(self, layer: MLPLayer) -> torch.Tensor | None:
        """Normalised scores of the local neurons (None before the first forward)."""
        scored = self._scored(layer)
        return None if scored is None else scored[1]

    @staticmethod
    def _norm(layer: MLPLayer, w1: torch.Tensor, w2: torch.Tensor) -> float:
        sq = w1.float().square().sum() + w2.float().square().sum()
        if layer.group is not None:
            dist.all_reduce(sq, group=layer.group)
        return float(sq.sqrt())

    def measure(self, metrics: dict[str, float]) -> None:
        """Dormant fraction per layer into ``metrics``, without touching weights."""
        for layer in self.layers:
            s = self.scores(layer)
            if s is None:
                continue
            count = torch.stack([(s <= self.config.tau).sum().float(), torch.tensor(float(s.numel()))])
            if layer.group is not None:
                dist.all_reduce(count, group=layer.group)
            metrics[f"redo/dormant_fraction/{layer.name}"] = float(count[0] / count[1])

    def _draw(self, layer: MLPLayer, step: int, which: str, std: float) -> torch.Tensor:
        """Normal(0, std) values for this rank's part of the gathered layer: "in" gives fc1-shaped
        rows ([gate; up] for SwiGLU), "out" fc2-shaped columns. Seeded by (seed, step, layer)."""
        rank, size = _rank(layer.group)
        local = layer.neurons
        digest = hashlib.sha256(f"{self.seed}/{step}/{layer.name}/{which}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        mine = slice(rank * local, (rank + 1) * local)
        if which == "out":
            return (torch.randn(layer.fc2.shape[-2], local * size, generator=gen) * std)[:, mine]
        parts = 2 if layer.gated else 1
        full = torch.randn(parts, local * size, layer.fc1.shape[-1], generator=gen) * std
        return full[:, mine].reshape(parts * local, -1)

    def apply(self, step: int, optimizer: Any, metrics: dict[str, float]) -> list[Record]:
        """Recycle the dormant neurons of every layer; returns one record per layer recycled."""
        records = []
        for layer in self.layers:
            scored = self._scored(layer)
            if scored is None:
                continue
            ema, s = scored
            if layer.replicas is not None:  # replicas continue from the averaged statistic
                if layer.ema is None:
                    layer.ema = ema.clone()
                else:
                    layer.ema.copy_(ema)
                if layer.seen is not None:
                    layer.seen.fill_(True)
            dormant = s <= self.config.tau
            count = torch.stack([dormant.sum().float(), torch.tensor(float(s.numel()))])
            if layer.group is not None:
                dist.all_reduce(count, group=layer.group)
            metrics[f"redo/dormant_fraction/{layer.name}"] = float(count[0] / count[1])
            if count[0] == 0:  # the same decision on every rank of the layer: counts are global
                continue
            mean = self._mean(layer, layer.ema)
            idx = torch.nonzero(dormant).reshape(-1)
            fc1, fc2 = resolve(layer.fc1, optimizer), resolve(layer.fc2, optimizer)
            full1, full2 = fc1.read(), fc2.read()
            w1, w2 = layer.local(full1), layer.local(full2)  # views: edits land in full1 / full2
            before = self._norm(layer, w1, w2)

            rows = torch.cat([idx + k * layer.neurons for k in range(2 if layer.gated else 1)])
            mask1 = torch.zeros_like(full1, dtype=torch.bool)
            layer.local(mask1)[rows] = True
            w1[rows] = self._draw(layer, step, "in", layer.init_std)[rows].to(w1.device)
            fc1.write(full1, mask1)
            fc1.reset_state(mask1)

            mask2 = torch.zeros_like(full2, dtype=torch.bool)
            layer.local(mask2)[:, idx] = True
            std = self.config.noise_std
            w2[:, idx] = self._draw(layer, step, "out", std).to(w2.device)[:, idx] if std > 0 else 0.0
            fc2.write(full2, mask2)
            fc2.reset_state(mask2)

            layer.ema[idx] = mean
            records.append(
                Record(
                    step=step,
                    kind="redo",
                    block=layer.name,
                    tensors=list(layer.tensors),
                    rows=(idx + _rank(layer.group)[0] * layer.neurons).tolist(),
                    norm_before=before,
                    norm_after=self._norm(layer, w1, w2),
                    extra={"dormant_fraction": float(count[0] / count[1]), "tau": self.config.tau},
                )
            )
        return records
