"""Two gloo ranks with megatron-core tensor parallelism (TP=2): FIRE, DASH and ReDo on the shards
give what a single process gives on the gathered weights.

Gathered weights are the rank shards concatenated (rows for column-parallel, columns for
row-parallel); the three interventions commute with row permutations, so this order is as good
as megatron's own global layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nam_runtime.testing import run_ranks

WORLD = 2


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def split_dim(p: torch.Tensor) -> int:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else -1


def check_fire(layer: nn.Module) -> None:
    from nam_plasticity import FireConfig, apply_fire, find_blocks
    from nam_plasticity.fire import fire_matrices

    cfg = FireConfig(bulk="fp32", tol=1e-6)
    blocks = find_blocks([layer])
    assert {b.split for b in blocks} == {"rows", "cols"}
    before = {b.name: b.matrix(b.param.detach()) for b in blocks}
    records = apply_fire(0, blocks, None, cfg)
    for b, rec in zip(blocks, records, strict=True):
        dim = 0 if b.split == "rows" else 1
        ref, _ = fire_matrices(gather(before[b.name], dim), cfg)  # one process, gathered
        got = gather(b.matrix(b.param.detach()), dim)
        assert tuple(ref.shape) == b.global_shape
        assert torch.allclose(got, ref, atol=2e-5), (b.name, float((got - ref).abs().max()))
        assert abs(rec.norm_before - float(gather(before[b.name], dim).norm())) < 1e-4
        assert rec.residual < 1e-6


def check_dash(layer: nn.Module, rank: int) -> None:
    from nam_plasticity import DashConfig, dash_scale, find_blocks
    from nam_plasticity.dash import Dash

    gen = torch.Generator().manual_seed(100 + rank)
    for p in layer.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    Dash(DashConfig(lam=0.3)).apply(0, find_blocks([layer]), None)
    for n, p in layer.named_parameters():
        if p.dim() != 2:
            continue
        dim = split_dim(p)
        w, g, got = (gather(t, dim) for t in (before[n], p.grad, p.detach()))
        assert torch.allclose(got, w * dash_scale(w, g, 0.3)[:, None], atol=1e-7), n


class PlainMLP(nn.Module):
    """The single-process reference: the same MLP as plain torch modules."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, cfg) -> None:
        super().__init__()
        self.config = cfg
        self.linear_fc1 = nn.Linear(fc1.shape[1], fc1.shape[0], bias=False)
        self.linear_fc2 = nn.Linear(fc2.shape[1], fc2.shape[0], bias=False)
        with torch.no_grad():
            self.linear_fc1.weight.copy_(fc1)
            self.linear_fc2.weight.copy_(fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.linear_fc1.weight).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class Chunk(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


def single_layout(fc1_local: torch.Tensor) -> torch.Tensor:
    """Gathered fc1 as one process holds it, [gate; up], from per-rank [gate_r; up_r] shards."""
    gate, up = fc1_local.chunk(2)
    return torch.cat([gather(gate, 0), gather(up, 0)])


def check_redo(layer: nn.Module, rank: int) -> None:
    from nam_plasticity import Redo, RedoConfig

    mlp = layer.mlp
    dead = [1, 5] if rank == 0 else [2]
    with torch.no_grad():
        mlp.linear_fc1.weight[dead] = 0
    fc1, fc2 = single_layout(mlp.linear_fc1.weight.detach()), gather(mlp.linear_fc2.weight.detach(), 1)
    ref_chunk = Chunk(PlainMLP(fc1, fc2, mlp.config))
    tp_chunk = Chunk(mlp)
    cfg = RedoConfig(tau=0.05, beta=0.9, noise_std=1e-3)
    tp, ref = Redo(cfg, seed=5), Redo(cfg, seed=5)
    tp.attach([tp_chunk])
    ref.attach([ref_chunk])
    for i in range(3):
        x = torch.randn(4, 2, mlp.config.hidden_size, generator=torch.Generator().manual_seed(i))
        tp_chunk.mlp(x)
        ref_chunk.mlp(x)
    m_tp: dict[str, float] = {}
    m_ref: dict[str, float] = {}
    rec_tp, rec_ref = tp.apply(9, None, m_tp), ref.apply(9, None, m_ref)
    assert m_tp == m_ref and m_tp["redo/dormant_fraction/mlp"] > 0
    rows: list[list[int]] = [[] for _ in range(WORLD)]
    dist.all_gather_object(rows, rec_tp[0].rows)
    assert sorted(r for part in rows for r in part) == rec_ref[0].rows
    assert abs(rec_tp[0].norm_after - rec_ref[0].norm_after) < 1e-5
    assert torch.equal(
        single_layout(mlp.linear_fc1.weight.detach()), ref_chunk.mlp.linear_fc1.weight.detach()
    )
    assert torch.equal(gather(mlp.linear_fc2.weight.detach(), 1), ref_chunk.mlp.linear_fc2.weight.detach())


def _run() -> None:
    from megatron_models import config, transformer_layer

    from nam_runtime import dist as runtime

    world = runtime.initialize(tensor_parallel=WORLD, seed=0)
    check_fire(transformer_layer(config(tp=WORLD)))
    check_dash(transformer_layer(config(tp=WORLD)), world.rank)
    check_redo(transformer_layer(config(tp=WORLD)), world.rank)


def test_fire_dash_redo_on_tensor_parallel_shards_equal_single_process() -> None:
    run_ranks(_run, WORLD, timeout_s=300)
