"""The plan a trainer runs once per optimizer step: which lever to pull, at which steps.

plan = Plan(fire=Schedule(at=(1000,)), redo=Schedule(every=500), ...)
plan.attach(model_chunks)                      # before the first forward (ReDo hooks)
...
optimizer.step()
records = plan.step(step, model_chunks, optimizer, metrics)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nam_plasticity.blocks import Mode, find_blocks
from nam_plasticity.dash import Dash, DashConfig
from nam_plasticity.fire import FireConfig, apply_fire
from nam_plasticity.records import Record
from nam_plasticity.redo import Redo, RedoConfig
from nam_plasticity.stp import STP


@dataclass(frozen=True)
class Schedule:
    """Steps at which an intervention runs: the listed ones, and every ``every`` steps after
    ``start`` (``every`` None: only the listed ones)."""

    at: tuple[int, ...] = ()
    every: int | None = None
    start: int = 0

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"Schedule.every must be >= 1 or None, got {self.every}")

    def due(self, step: int) -> bool:
        if step in self.at:
            return True
        return self.every is not None and step >= self.start and (step - self.start) % self.every == 0


@dataclass
class Plan:
    """FIRE, DASH, ReDo (each with its schedule and settings) and the STP schedule."""

    fire: Schedule | None = None
    fire_config: FireConfig = field(default_factory=FireConfig)
    fire_mode: Mode = "all"
    dash: Schedule | None = None
    dash_config: DashConfig = field(default_factory=DashConfig)
    redo: Schedule | None = None
    redo_config: RedoConfig = field(default_factory=RedoConfig)
    redo_group: Any = None  # ReDo's data-parallel group without megatron's parallel state
    stp: STP | None = None
    seed: int = 0
    _dash: Dash | None = field(default=None, repr=False)
    _redo: Redo | None = field(default=None, repr=False)

    def attach(self, model_chunks: Sequence[nn.Module]) -> None:
        """Install what must watch the forward pass (ReDo's activation hooks)."""
        if self.redo is not None:
            self._redo = Redo(self.redo_config, seed=self.seed, group=self.redo_group)
            self._redo.attach(model_chunks)

    def step(
        self, step: int, model_chunks: Sequence[nn.Module], optimizer: Any, metrics: dict[str, float]
    ) -> list[Record]:
        """Run what is due after optimizer step ``step``; fills ``metrics``; returns the records."""
        records: list[Record] = []
        if self.dash is not None:
            self._dash = self._dash or Dash(self.dash_config)
            due = self.dash.due(step)
            if due or self.dash_config.alpha is not None:  # the gradient EMA sees every step
                blocks = find_blocks(model_chunks)
                self._dash.observe(blocks, optimizer)
                if due:
                    records += self._dash.apply(step, blocks, optimizer)
        if self.fire is not None and self.fire.due(step):
            records += apply_fire(
                step, find_blocks(model_chunks, self.fire_mode), optimizer, self.fire_config
            )
        if self._redo is not None:
            if self.redo is not None and self.redo.due(step):
                records += self._redo.apply(step, optimizer, metrics)
            else:
                self._redo.measure(metrics)
        elif self.redo is not None:
            raise RuntimeError("Plan.step: ReDo is scheduled but Plan.attach(model_chunks) was not called")
        if self.stp is not None:
            self.stp.pop_metrics(metrics)
            self.stp.set_step(step + 1)  # the next forward belongs to the next step
        return records
