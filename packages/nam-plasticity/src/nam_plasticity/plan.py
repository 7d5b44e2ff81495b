"""The plan a trainer runs once per optimizer step: which lever to pull, at which steps.

plan = Plan(fire=Schedule(at=(1000,)), redo=Schedule(every=500), ...)
plan.attach(model_chunks)                      # before the first forward (ReDo hooks)
...
optimizer.step()
records = plan.step(step, model_chunks, optimizer, metrics)

A checkpoint holds the plan's running state (``sharded_state_dict``, ``load_state_dict``: DASH's
gradient EMA, ReDo's activation EMAs) beside the model, sharded as the parameters it belongs to.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nam_plasticity.blocks import Mode, find_blocks
from nam_plasticity.dash import Dash, DashConfig
from nam_plasticity.fire import FireConfig, apply_fire
from nam_plasticity.records import Record
from nam_plasticity.redo import Redo, RedoConfig
from nam_plasticity.sharded import dash_state, load_dash, load_redo, parameter_entries, redo_state
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

    def __post_init__(self) -> None:
        if self.dash is not None:
            self._dash = Dash(self.dash_config)

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

    def stateful(self) -> tuple[str, ...]:
        """The levers that keep running state between steps: "dash" (with a gradient average),
        "redo" (once attached)."""
        dash = self._dash is not None and self.dash_config.alpha is not None
        return tuple(name for name, on in (("dash", dash), ("redo", self._redo is not None)) if on)

    def sharded_state_dict(
        self,
        model_chunks: Sequence[nn.Module],
        optimizer: Any,
        model_sharded: dict[str, Any],
        levers: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """The running state of ``levers`` (default: all of ``stateful()``) as megatron sharded
        tensors, each the twin of its parameter's entry in ``model_sharded`` (the chunks' sharded
        state dicts; nam_plasticity.sharded says how). A collective over the data-parallel groups.
        Saving stores it; loading passes it to dist_checkpointing as the template, then the result
        to ``load_state_dict``."""
        wanted = self.stateful() if levers is None else tuple(levers)
        entries = parameter_entries(model_sharded)
        out: dict[str, Any] = {}
        if "dash" in wanted and self._dash is not None:
            out |= dash_state(self._dash, model_chunks, optimizer, entries)
        if "redo" in wanted and self._redo is not None:
            out |= redo_state(self._redo, entries)
        return out

    def load_state_dict(
        self,
        loaded: dict[str, Any],
        model_chunks: Sequence[nn.Module],
        optimizer: Any,
        model_sharded: dict[str, Any],
    ) -> None:
        """Restore the running state from what dist_checkpointing loaded for ``sharded_state_dict``'s
        template; the levers absent from ``loaded`` keep theirs."""
        entries = parameter_entries(model_sharded)
        if self._dash is not None and any(k.startswith("plasticity.dash.") for k in loaded):
            load_dash(self._dash, model_chunks, optimizer, loaded, entries)
        if self._redo is not None and any(k.startswith("plasticity.redo.") for k in loaded):
            load_redo(self._redo, loaded, entries)
