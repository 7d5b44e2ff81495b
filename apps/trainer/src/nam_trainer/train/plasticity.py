"""[plasticity] as nam-plasticity's Plan: FIRE, DASH, ReDo schedules and the STP regulariser.

The loop calls ``plan.step(step, model_chunks, optimizer, metrics)`` once per optimizer step, after
``optimizer.step()`` (DESIGN.md), and gives STP each micro-batch's document ids before its forward.
"""

from __future__ import annotations

from typing import Any

from nam_layout import Layout
from nam_plasticity import STP, DashConfig, Plan, RedoConfig, Schedule, STPConfig
from nam_trainer.config.schema import PlasticityConfig


def _schedule(at: list[int], every: int, start: int) -> Schedule | None:
    if not at and not every:
        return None
    return Schedule(at=tuple(at), every=every or None, start=start)


def build_plan(cfg: PlasticityConfig, layout: Layout, seed: int, sequence_group: Any = None) -> Plan | None:
    """The plan, or None when every lever is off. ``sequence_group``: the tensor-parallel group
    under sequence parallelism (STP slices the document ids to this rank's positions), else None."""
    stp = None
    if cfg.stp:
        layers = tuple(cfg.stp_layers) or tuple(layout.positions("R"))
        stp = STP(
            STPConfig(
                layers=layers,
                lam=cfg.stp_lambda,
                start=cfg.stp_start,
                warmup=cfg.stp_warmup,
                form=cfg.stp_form,  # type: ignore[arg-type]
                samples=cfg.stp_samples,
                seed=seed,
            ),
            sequence_group=sequence_group,
            step=1,  # the first forward belongs to step 1; plan.step moves it on
        )
    plan = Plan(
        fire=_schedule(cfg.fire_at, cfg.fire_every, cfg.fire_start),
        fire_mode=cfg.fire_mode,  # type: ignore[arg-type]
        dash=_schedule(cfg.dash_at, cfg.dash_every, cfg.dash_start),
        dash_config=DashConfig(lam=cfg.dash_lambda, alpha=cfg.dash_alpha or None),
        redo=_schedule(cfg.redo_at, cfg.redo_every, cfg.redo_start),
        redo_config=RedoConfig(tau=cfg.redo_tau),
        stp=stp,
        seed=seed,
    )
    if plan.fire is None and plan.dash is None and plan.redo is None and stp is None:
        return None
    return plan


def attach(plan: Plan, chunks: list[Any]) -> list[Any]:
    """Install the plan's hooks on the model chunks (ReDo's activation hooks, STP on each stack).
    Returns the STP hook handles."""
    plan.attach(chunks)
    handles = []
    if plan.stp is not None:
        for chunk in chunks:
            handles.append(plan.stp.register(chunk.module.decoder))
    return handles


def before_forward(plan: Plan | None) -> Any:
    """What the step calls with each micro-batch before its forward: STP's document boundaries."""
    if plan is None or plan.stp is None:
        return lambda _batch: None
    stp = plan.stp
    return lambda batch: stp.set_documents(batch["document_ids"])
