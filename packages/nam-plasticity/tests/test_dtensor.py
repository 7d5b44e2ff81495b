"""FIRE and DASH on DTensor weights sharded over a 1-D mesh of two gloo ranks equal the
single-process result on the full weights, under a torch optimizer (whose state is reset)."""

from __future__ import annotations

import torch
from torch import nn

from nam_runtime.testing import run_ranks

WORLD = 2


def _run() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from nam_plasticity import DashConfig, FireConfig, apply_fire, dash_scale, find_blocks
    from nam_plasticity.dash import Dash
    from nam_plasticity.fire import fire_matrices
    from nam_runtime import dist

    dist.initialize()  # two data-parallel ranks: the default group spans both
    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)  # the same full weights on both ranks
    full = {"up.weight": torch.randn(24, 16), "down.weight": torch.randn(16, 24)}
    model = nn.ModuleDict({"up": nn.Linear(16, 24, bias=False), "down": nn.Linear(24, 16, bias=False)})
    model["up"].weight = nn.Parameter(distribute_tensor(full["up.weight"], mesh, [Shard(0)]))
    model["down"].weight = nn.Parameter(distribute_tensor(full["down.weight"], mesh, [Shard(1)]))
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    full = {n: p.full_tensor() for n, p in model.named_parameters()}  # after the step

    blocks = find_blocks([model])
    assert sorted((b.name, b.split, b.global_shape) for b in blocks) == [
        ("down.weight", "cols", (16, 24)),
        ("up.weight", "rows", (24, 16)),
    ]
    cfg = FireConfig(bulk="fp32", tol=1e-6)
    apply_fire(0, blocks, opt, cfg)
    for name, p in model.named_parameters():
        ref, _ = fire_matrices(full[name], cfg)
        assert torch.allclose(p.full_tensor(), ref, atol=1e-5), name
        assert (opt.state[p]["exp_avg"].to_local() == 0).all()

    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    grads = {
        n: torch.randn(p.shape, generator=torch.Generator().manual_seed(7))
        for n, p in model.named_parameters()
    }
    for name, p in model.named_parameters():
        p.grad = distribute_tensor(grads[name], mesh, p.placements)
    Dash(DashConfig(lam=0.3)).apply(1, find_blocks([model]), opt)
    for name, p in model.named_parameters():
        want = weights[name] * dash_scale(weights[name], grads[name], 0.3)[:, None]
        assert torch.allclose(p.full_tensor(), want, atol=1e-6), name


def test_fire_and_dash_on_dtensor_shards_equal_single_process() -> None:
    run_ranks(_run, WORLD, timeout_s=300)
