"""Plan.step as the trainer calls it, on a real megatron MLP trained with a torch optimizer."""

import pytest
import torch
from megatron_models import config, mlp_submodules
from torch import nn

from nam_plasticity import DashConfig, FireConfig, Plan, RedoConfig, Schedule, find_blocks


class Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from megatron.core.transformer.mlp import MLP

        self.mlp = MLP(config(), mlp_submodules())


def test_plan_runs_what_is_due_and_reports_metrics(megatron_tp1: None) -> None:
    torch.manual_seed(0)
    chunk = Chunk()
    opt = torch.optim.AdamW(chunk.parameters(), lr=1e-3)
    plan = Plan(
        fire=Schedule(at=(2,)),
        fire_config=FireConfig(bulk="fp32", tol=1e-5),
        dash=Schedule(every=3, start=3),
        dash_config=DashConfig(lam=0.5, alpha=0.3),
        redo=Schedule(at=(4,)),
        redo_config=RedoConfig(tau=0.5),
    )
    plan.attach([chunk])
    kinds = {}
    for step in range(1, 7):
        opt.zero_grad()
        out, _ = chunk.mlp(torch.randn(8, 2, 32))
        out.square().mean().backward()
        opt.step()
        metrics: dict[str, float] = {}
        records = plan.step(step, [chunk], opt, metrics)
        kinds[step] = sorted({r.kind for r in records})
        assert "redo/dormant_fraction/mlp" in metrics
    assert kinds == {1: [], 2: ["fire"], 3: ["dash"], 4: ["redo"], 5: [], 6: ["dash"]}
    for b in find_blocks([chunk]):
        assert torch.isfinite(b.param).all()


def test_schedule_and_missing_attach() -> None:
    s = Schedule(at=(5,), every=10, start=100)
    assert [t for t in range(0, 125) if s.due(t)] == [5, 100, 110, 120]
    with pytest.raises(ValueError, match="every"):
        Schedule(every=0)
    with pytest.raises(RuntimeError, match="attach"):
        Plan(redo=Schedule(at=(1,))).step(1, [], None, {})
