"""FIRE, DASH and ReDo on a real megatron layer under a torch optimizer, against direct references."""

import copy

import pytest
import torch
import torch.nn.functional as F
from megatron_models import config, transformer_layer

from nam_plasticity import DashConfig, FireConfig, Redo, RedoConfig, apply_fire, dash_scale, find_blocks
from nam_plasticity.dash import Dash
from nam_plasticity.fire import fire_matrices


def adam_with_state(module: torch.nn.Module) -> torch.optim.Adam:
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


def snapshot(module: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        n: (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
        for n, p in module.named_parameters()
    }


@pytest.mark.parametrize("mode", ["all", "qk"])
def test_fire_writes_each_block_and_resets_only_its_state(megatron_tp1: None, mode: str) -> None:
    torch.manual_seed(0)
    layer = transformer_layer(config())
    opt = adam_with_state(layer)
    before = snapshot(layer, opt)
    cfg = FireConfig(bulk="fp32", tol=1e-5)
    blocks = find_blocks([layer], mode=mode)
    records = apply_fire(7, blocks, opt, cfg)
    assert len(records) == len(blocks) and all(r.residual < 1e-5 and r.kind == "fire" for r in records)

    touched = {}
    for b in blocks:
        ref, _ = fire_matrices(b.matrix(before[b.param_name][0]), cfg)
        assert torch.allclose(b.matrix(b.param.detach()), ref, atol=1e-5), b.name
        touched.setdefault(b.param_name, torch.zeros(b.param.shape, dtype=torch.bool))
        touched[b.param_name] |= b.mask()
    for name, p in layer.named_parameters():
        old, old_state = before[name]
        mask = touched.get(name, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p.detach()[~mask], old[~mask]), name  # untouched entries bit-identical
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][key]
            assert torch.equal(state[~mask], old_state[key][~mask]), (name, key)
            assert (state[mask] == 0).all(), (name, key)
    if mode == "qk":
        assert {b.part for b in blocks} == {"q", "k"}


def test_dash_matches_the_row_formula(megatron_tp1: None) -> None:
    torch.manual_seed(1)
    layer = transformer_layer(config())
    opt = adam_with_state(layer)
    for p in layer.parameters():
        p.grad = torch.randn_like(p)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    blocks = find_blocks([layer])
    records = Dash(DashConfig(lam=0.3)).apply(3, blocks, opt)
    assert len(records) == len(blocks)
    for name, p in layer.named_parameters():
        w, g = before[name], p.grad
        if name.endswith("layer_norm_weight") or p.dim() != 2:
            assert torch.equal(p.detach(), w), name
            continue
        s = dash_scale(w, g, 0.3)
        assert ((s >= 0.3) & (s <= 1)).all()
        assert torch.allclose(p.detach(), w * s[:, None], atol=1e-7), name
        shrunk = s < 1
        assert (opt.state[p]["exp_avg"][shrunk] == 0).all()
        assert (opt.state[p]["exp_avg"][~shrunk] != 0).all()


def test_dash_reference_formula() -> None:
    w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    g = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    # aligned with -g: kept; opposed: clamped to lambda; orthogonal: lambda; no gradient: kept
    assert dash_scale(w, g, 0.3).tolist() == pytest.approx([1.0, 0.3, 0.3, 1.0])
    w2 = torch.tensor([[1.0, 1.0]])
    g2 = torch.tensor([[-1.0, 0.0]])
    assert dash_scale(w2, g2, 0.3).item() == pytest.approx(2**-0.5)


def test_redo_scores_recycles_and_reports(megatron_tp1: None) -> None:
    torch.manual_seed(2)
    from megatron.core.transformer.mlp import MLP
    from megatron_models import mlp_submodules

    class Chunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = MLP(config(), mlp_submodules())

    chunk = Chunk()
    mlp = chunk.mlp
    dead = torch.tensor([3, 17, 40])
    with torch.no_grad():
        mlp.linear_fc1.weight[dead] = 0  # gate rows at zero: silu(0) * up = 0, a dormant neuron
    opt = adam_with_state(chunk)
    before = snapshot(chunk, opt)
    redo = Redo(RedoConfig(tau=0.1, beta=0.5))
    redo.attach([chunk])
    xs = [torch.randn(6, 2, 32) for _ in range(3)]
    ema = None
    for x in xs:
        mlp(x)
        h = F.linear(x, before["mlp.linear_fc1.weight"][0]).chunk(2, dim=-1)
        act = (F.silu(h[0]) * h[1]).abs().reshape(-1, 48).mean(0)
        ema = act if ema is None else 0.5 * ema + 0.5 * act
    assert torch.allclose(redo.layers[0].ema, ema, atol=1e-6)
    score = ema / ema.mean()
    expected = torch.nonzero(score <= 0.1).reshape(-1)
    assert set(dead.tolist()) <= set(expected.tolist())

    metrics: dict[str, float] = {}
    redo.measure(metrics)
    assert metrics == {"redo/dormant_fraction/mlp": pytest.approx(len(expected) / 48)}
    records = redo.apply(11, opt, metrics)
    assert records[0].rows == expected.tolist()

    w1, w2 = mlp.linear_fc1.weight.detach(), mlp.linear_fc2.weight.detach()
    old1, old2 = before["mlp.linear_fc1.weight"][0], before["mlp.linear_fc2.weight"][0]
    rows = torch.cat([expected, expected + 48])
    keep = torch.ones(96, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(w1[keep], old1[keep])
    assert (w1[rows] != 0).all() and 0.01 < float(w1[rows].std()) < 0.04  # init std 0.02
    assert (w2[:, expected] == 0).all()
    other = torch.ones(48, dtype=torch.bool)
    other[expected] = False
    assert torch.equal(w2[:, other], old2[:, other])
    assert (opt.state[mlp.linear_fc1.weight]["exp_avg"][rows] == 0).all()
    assert torch.equal(
        opt.state[mlp.linear_fc1.weight]["exp_avg"][keep], before["mlp.linear_fc1.weight"][1]["exp_avg"][keep]
    )
    assert (opt.state[mlp.linear_fc2.weight]["exp_avg_sq"][:, expected] == 0).all()

    # Same seed, same step: the same fresh rows (what a tensor-parallel rank relies on).
    twin = copy.deepcopy(redo)
    assert torch.equal(twin._draw(twin.layers[0], 11, "in", 0.02), redo._draw(redo.layers[0], 11, "in", 0.02))
