"""The plan's running state (DASH's gradient EMA, ReDo's activation EMA) through a real
dist_checkpointing save and load: a second plan on the same model continues exactly as the first."""

import copy
from pathlib import Path

import torch
from megatron_models import config, mlp_submodules
from torch import nn

from nam_plasticity import DashConfig, Plan, RedoConfig, Schedule


class Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from megatron.core.transformer.mlp import MLP

        self.mlp = MLP(config(), mlp_submodules())

    def sharded_state_dict(self) -> dict:
        return self.mlp.sharded_state_dict(prefix="mlp.")


def _plan() -> Plan:
    return Plan(
        dash=Schedule(at=(4,)),
        dash_config=DashConfig(lam=0.5, alpha=0.3),
        redo=Schedule(at=(4,)),
        redo_config=RedoConfig(tau=0.5),
    )


def _train(chunk: Chunk, opt: torch.optim.Optimizer, plan: Plan, steps: range) -> list[dict[str, float]]:
    out = []
    for step in steps:
        torch.manual_seed(step)
        opt.zero_grad()
        y, _ = chunk.mlp(torch.randn(8, 2, 32))
        y.square().mean().backward()
        opt.step()
        metrics: dict[str, float] = {}
        plan.step(step, [chunk], opt, metrics)
        out.append(metrics)
    return out


def test_dash_and_redo_state_round_trip_through_a_checkpoint(megatron_tp1: None, tmp_path: Path) -> None:
    """Steps 1-2, save, steps 3-5 (DASH and ReDo act at 4); then back to step 2 with a new plan
    loaded from the checkpoint: the same metrics and weights, bit for bit; without the load, not."""
    from megatron.core import dist_checkpointing

    torch.manual_seed(0)
    chunk = Chunk()
    opt = torch.optim.AdamW(chunk.parameters(), lr=1e-3)
    plan = _plan()
    plan.attach([chunk])
    _train(chunk, opt, plan, range(1, 3))
    assert plan.stateful() == ("dash", "redo")
    model = chunk.sharded_state_dict()
    saved = plan.sharded_state_dict([chunk], opt, model)
    assert sorted(saved) == [
        f"plasticity.{k}"
        for k in ("dash.mlp.linear_fc1.weight", "dash.mlp.linear_fc2.weight", "redo.mlp.linear_fc2.weight")
    ]
    assert saved["plasticity.redo.mlp.linear_fc2.weight"].global_shape == (1, 48)  # one value per neuron
    (tmp_path / "ckpt").mkdir()
    dist_checkpointing.save(saved, str(tmp_path / "ckpt"))
    snapshot = copy.deepcopy((chunk.state_dict(), opt.state_dict()))
    expected = _train(chunk, opt, plan, range(3, 6))
    weights = [p.detach().clone() for p in chunk.parameters()]

    def again(load: bool) -> tuple[list[dict[str, float]], list[torch.Tensor]]:
        chunk.load_state_dict(snapshot[0])
        opt.load_state_dict(copy.deepcopy(snapshot[1]))
        resumed = _plan()
        resumed.attach([chunk])
        if load:
            template = resumed.sharded_state_dict([chunk], opt, model)
            resumed.load_state_dict(
                dist_checkpointing.load(template, str(tmp_path / "ckpt")), [chunk], opt, model
            )
        return _train(chunk, opt, resumed, range(3, 6)), [p.detach().clone() for p in chunk.parameters()]

    metrics, params = again(load=True)
    assert metrics == expected
    assert all(torch.equal(a, b) for a, b in zip(params, weights, strict=True))
    metrics, params = again(load=False)
    assert metrics != expected or not all(torch.equal(a, b) for a, b in zip(params, weights, strict=True))
