"""STP (Semantic Tube Prediction): a regulariser on the hidden states the forward pass already made.

Consumer protocol (what the stack must offer; nam-spec provides it):

    stack.register_hidden_state_hook(hook) -> handle with .remove()
    hook(layer_number: int, letter: str, hidden: Tensor) -> Tensor | None

called once per layer per forward with the layer's output hidden states (global 1-based layer
number, the layer's letter, sequence-first [s, b, h], this rank's shard); the stack continues
with the tensor the hook returns (equal to ``hidden`` in value), or ``hidden`` when it returns
None (nam-spec's NamStack). Document boundaries of packed rows come from
``STP.set_documents(doc_ids)`` ([b, s] integer ids of the whole sequence, called by the trainer
before the forward); without them every row is one document.

Sequence parallelism: the hidden states are this rank's contiguous slice of the sequence
(megatron's scatter along dim 0 of the tensor-parallel group), so STP needs that group
(``STP(config, sequence_group=tp_group)``) to slice the document ids to the same positions;
samples stay inside the rank's slice, are drawn per rank, and each rank's loss is weighted
1 / group size so that lambda means the same at any tensor-parallel size (the gradients of the
ranks add up over the group).

Forms, over samples drawn within one document of one row, averaged over samples and layers:
- "straight" (default): positions s < r < t; loss = 1 - cos(h_r - h_s, h_t - h_r), a
  straightness penalty on the trajectory.
- "span": a random span s < r and the rest of the document, t = its last position;
  loss = 1 - cos(h_r - h_s, h_t - h_r) (Huang, LeCun, Balestriero, "Semantic Tube Prediction",
  2026: a span's direction predicts the rest of the trajectory).

Weight: lambda(step) = 0 before ``start``, then rising linearly to ``lam`` over ``warmup`` steps.
The loss enters backward the way megatron's MoE aux loss does: the returned hidden state carries
it through ``MoEAuxLossAutoScaler``, so on any pipeline stage the gradient of lambda * loss flows
into the layers at and below the selected ones when the stage's output gradient arrives, scaled
like the main loss. At lambda 0 nothing is attached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

Form = Literal["straight", "span"]
HiddenStateHook = Callable[[int, str, torch.Tensor], torch.Tensor | None]


class HiddenStateHooks(Protocol):
    """What STP needs from the stack."""

    def register_hidden_state_hook(self, hook: HiddenStateHook) -> torch.utils.hooks.RemovableHandle: ...


@dataclass(frozen=True)
class STPConfig:
    layers: tuple[int, ...]
    lam: float = 0.02
    start: int = 0
    warmup: int = 0
    form: Form = "straight"
    samples: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 1:
            raise ValueError(f"STPConfig.layers: need global 1-based layer numbers, got {self.layers}")
        if self.form not in ("straight", "span"):
            raise ValueError(f"STPConfig.form must be 'straight' or 'span', got {self.form!r}")
        if self.lam < 0 or self.start < 0 or self.warmup < 0 or self.samples < 1:
            raise ValueError(f"STPConfig: lam, start, warmup >= 0 and samples >= 1 required, got {self}")


def lambda_at(config: STPConfig, step: int) -> float:
    if step < config.start:
        return 0.0
    if config.warmup == 0:
        return config.lam
    return config.lam * min(1.0, (step - config.start + 1) / config.warmup)


def _document_bounds(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last position of each token's document, both [b, s]."""
    b, s = doc_ids.shape
    pos = torch.arange(s, device=doc_ids.device).expand(b, s)
    new = torch.ones_like(doc_ids, dtype=torch.bool)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(new, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last_flag = torch.ones_like(new)
    last_flag[:, :-1] = new[:, 1:]
    last = torch.where(last_flag, pos, torch.full_like(pos, s)).flip(1).cummin(dim=1).values.flip(1)
    return first, last


def sample_triples(
    doc_ids: torch.Tensor, samples: int, form: Form, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, s, r, t) index vectors with s < r < t inside one document; rows per sample."""
    b, n = doc_ids.shape
    first, last = _document_bounds(doc_ids.cpu())
    row = torch.randint(b, (samples,), generator=gen)
    anchor = torch.randint(n, (samples,), generator=gen)
    lo, hi = first[row, anchor], last[row, anchor]
    keep = hi - lo >= 2
    row, lo, hi = row[keep], lo[keep], hi[keep]
    u = torch.rand(3, row.numel(), generator=gen)
    s = lo + (u[0] * (hi - lo - 1)).long()  # leaves room for r and t
    if form == "span":
        t = hi
        r = s + 1 + (u[1] * (t - s - 1)).long()
    else:
        r = s + 1 + (u[1] * (hi - s - 1)).long()
        t = r + 1 + (u[2] * (hi - r)).long()
    return row, s, r, t


def stp_loss(
    hidden: torch.Tensor, row: torch.Tensor, s: torch.Tensor, r: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Mean of 1 - cos(h_r - h_s, h_t - h_r) over the samples; ``hidden`` is [s, b, h]."""
    if row.numel() == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    dev = hidden.device
    row, s, r, t = row.to(dev), s.to(dev), r.to(dev), t.to(dev)
    hs, hr, ht = hidden[s, row].float(), hidden[r, row].float(), hidden[t, row].float()
    return (1 - F.cosine_similarity(hr - hs, ht - hr, dim=-1, eps=1e-8)).mean()


@dataclass
class STP:
    """The hook STP registers with the stack; ``step`` sets the schedule's step.
    ``sequence_group``: the tensor-parallel group when sequence parallelism is on, else None."""

    config: STPConfig
    sequence_group: dist.ProcessGroup | None = None
    step: int = 0
    _doc_ids: torch.Tensor | None = field(default=None, repr=False)
    _calls: int = 0
    _loss_sum: torch.Tensor | None = field(default=None, repr=False)
    _loss_count: int = 0

    def register(self, stack: HiddenStateHooks) -> torch.utils.hooks.RemovableHandle:
        return stack.register_hidden_state_hook(self)

    def set_documents(self, doc_ids: torch.Tensor | None) -> None:
        """Document ids [b, s] of the coming micro-batch (None: each row is one document).
        Sampling runs on the CPU: ids already there cost no device synchronisation."""
        self._doc_ids = None if doc_ids is None else doc_ids.cpu()

    def set_step(self, step: int) -> None:
        self.step = step
        self._calls = 0

    def _replica_groups(self) -> list[dist.ProcessGroup]:
        from megatron.core import parallel_state

        groups = [self.sequence_group]
        if parallel_state.model_parallel_is_initialized():
            groups.append(parallel_state.get_data_parallel_group(with_context_parallel=True))
        return [g for g in groups if g is not None and g.size() > 1]

    def shard(self) -> tuple[int, int]:
        """(rank, size) of this rank's slice of the sequence; (0, 1) without sequence parallelism."""
        g = self.sequence_group
        return (0, 1) if g is None or g.size() == 1 else (dist.get_rank(g), g.size())

    def draw(
        self, layer_number: int, batch: int, seq: int, shard: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The (row, s, r, t) samples (local positions) of the next call at this layer, for the
        slice ``shard`` = (rank, size) of the sequence (default: this rank's). Seeded by (seed,
        step, call, layer, rank), so the tensor-parallel ranks of one slice draw the same ones."""
        rank, size = self.shard() if shard is None else shard
        doc_ids = self._doc_ids
        if doc_ids is None:
            doc_ids = torch.zeros(batch, seq * size, dtype=torch.long)
        elif tuple(doc_ids.shape) != (batch, seq * size):
            raise ValueError(
                f"STP: document ids have shape {tuple(doc_ids.shape)}, hidden states [b, s] = {[batch, seq]} "
                f"on sequence slice {rank} of {size}; accepted ids of the whole sequence [{batch}, {seq * size}] "
                "(under sequence parallelism construct STP with sequence_group=<tensor-parallel group>)"
            )
        key = f"{self.config.seed}/{self.step}/{self._calls}/{layer_number}" + (
            f"/{rank}" if size > 1 else ""
        )
        self._calls += 1
        gen = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1
        )
        local_ids = doc_ids[:, rank * seq : (rank + 1) * seq]
        return sample_triples(local_ids, self.config.samples, self.config.form, gen)

    def __call__(self, layer_number: int, letter: str, hidden: torch.Tensor) -> torch.Tensor:
        lam = lambda_at(self.config, self.step)
        if layer_number not in self.config.layers or lam == 0 or not torch.is_grad_enabled():
            return hidden
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        loss = stp_loss(hidden, *self.draw(layer_number, hidden.shape[1], hidden.shape[0]))
        # Kept on the device: a host sync per layer would cost more than the loss itself.
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_count += 1
        weight = lam / (len(self.config.layers) * self.shard()[1])
        return MoEAuxLossAutoScaler.apply(hidden, loss * weight)

    def pop_metrics(self, metrics: dict[str, float]) -> None:
        """Mean STP loss (unweighted) since the last call into ``metrics``, averaged over the
        ranks that compute it: megatron's data-parallel group (with context parallel) when its
        parallel state is initialised, and the sequence group. Every rank of those groups holds
        the same layers, so all of them reach the all-reduce or none does."""
        if self._loss_sum is not None:
            total = torch.stack([self._loss_sum.float(), torch.ones_like(self._loss_sum) * self._loss_count])
            for group in self._replica_groups():
                dist.all_reduce(total, group=group)
            metrics["stp/loss"] = float(total[0] / total[1])
            metrics["stp/lambda"] = lambda_at(self.config, self.step)
        self._loss_sum, self._loss_count = None, 0
