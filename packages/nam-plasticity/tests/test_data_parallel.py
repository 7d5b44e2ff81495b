"""ReDo under data parallelism: two gloo ranks (DP=2) with megatron's DDP and distributed
optimizer see different tokens, so their local statistics would pick different neurons. The
averaged statistic gives one decision on both ranks, the one a single rank would take on the
concatenated batch, and the replicas stay bit-identical through the next optimizer step."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nam_runtime.testing import run_ranks

WORLD = 2
TAU, BETA, STEPS = 0.1, 0.5, 3
# hidden units whose gate row reads only the second half of the hidden dims (silent on rank 0's
# tokens), only the first half (silent on rank 1's), or nothing (silent everywhere)
SILENT_ON_0, SILENT_ON_1, SILENT = 3, 7, 11


def tokens(step: int, rank: int, hidden: int) -> torch.Tensor:
    """Rank 0's tokens live in the first half of the hidden dims, rank 1's in the second."""
    x = torch.randn(8, 2, hidden, generator=torch.Generator().manual_seed(10 * step + rank))
    half = torch.arange(hidden) < hidden // 2
    return (x * (half if rank == 0 else ~half)).to(torch.bfloat16)


def dormant(batches: list[torch.Tensor]) -> list[int]:
    """The decision of one rank that saw ``batches`` (fc2 inputs per step): EMA of mean |a|."""
    ema = None
    for a in batches:
        stat = a.reshape(-1, a.shape[-1]).abs().float().mean(0)
        ema = stat if ema is None else ema * BETA + stat * (1 - BETA)
    return torch.nonzero(ema / ema.mean() <= TAU).reshape(-1).tolist()


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return parts


def _rank() -> None:
    from megatron_training import bf16_model_and_optimizer, train_step

    from nam_plasticity import Redo, RedoConfig, resolve
    from nam_runtime import dist as runtime

    world = runtime.initialize(tensor_parallel=1)
    ddp, opt = bf16_model_and_optimizer(distributed=True, lr=1e-2)
    mlp, hidden = ddp.module.mlp, ddp.module.config.hidden_size
    fc1 = resolve(mlp.linear_fc1.weight, opt)
    w = fc1.read()
    w[SILENT_ON_0, : hidden // 2] = 0
    w[SILENT_ON_1, hidden // 2 :] = 0
    w[SILENT] = 0
    fc1.write(w, torch.ones_like(w, dtype=torch.bool))

    redo = Redo(RedoConfig(tau=TAU, beta=BETA), seed=1)
    redo.attach([ddp.module])
    seen: list[torch.Tensor] = []
    mlp.linear_fc2.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    for step in range(STEPS):
        out, _ = mlp(tokens(step, world.rank, hidden))
        out.float().square().mean().backward()

    local = dormant(seen)
    assert {SILENT, SILENT_ON_0 if world.rank == 0 else SILENT_ON_1} <= set(local), local
    concatenated = dormant([torch.cat(gathered(a), dim=0) for a in seen])  # DP=1 on both batches
    assert SILENT in concatenated and SILENT_ON_0 not in concatenated and SILENT_ON_1 not in concatenated

    records = redo.apply(STEPS, opt, {})
    rows = records[0].rows if records else []
    both: list[list[int]] = [[] for _ in range(WORLD)]
    dist.all_gather_object(both, rows)
    assert both[0] == both[1] == concatenated, both

    train_step(ddp, opt, STEPS)
    for name, p in ddp.module.named_parameters():
        a, b = gathered(p.detach())
        assert torch.equal(a, b), name
    assert not torch.equal(w, fc1.read())  # the step moved the weights


def test_redo_decides_once_for_all_data_parallel_replicas() -> None:
    run_ranks(_rank, WORLD, timeout_s=300)


def _plain_rank() -> None:
    from test_declared_parts import GroupedMLP, _route
    from torch import nn

    from nam_plasticity import Redo, RedoConfig

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same experts on both ranks
    experts = nn.ModuleDict({"moe": GroupedMLP()})
    shared, local = Redo(RedoConfig(tau=0.0, beta=0.5), group=dist.group.WORLD), Redo(RedoConfig(beta=0.5))
    shared.attach([experts])
    local.attach([experts])
    # expert 0 is routed on both ranks, expert 1 on rank 1 only, expert 2 on rank 0 only
    experts["moe"](*_route([4, 0, 3] if rank == 0 else [2, 5, 0], seed=1 + rank))
    scores = [shared.scores(layer) for layer in shared.layers]
    shared.apply(1, None, {})  # tau 0 recycles nothing; every replica continues from the average
    for e, on in ((0, (0, 1)), (1, (1,)), (2, (0,))):
        ema = local.layers[e].ema if rank in on else torch.zeros(5)
        per_rank = gathered(ema)
        want = sum(per_rank[r] for r in on) / len(on)  # replicas without tokens do not count
        assert torch.allclose(shared.layers[e].ema, want, atol=1e-6), e
        assert torch.allclose(scores[e], want / want.mean(), atol=1e-6), e
        mine = local.scores(local.layers[e])  # without a group: this rank's statistic only
        assert (mine is None) == (rank not in on), e
    dist.destroy_process_group()


def test_plain_torch_group_averages_grouped_experts_over_replicas_that_saw_tokens() -> None:
    run_ranks(_plain_rank, WORLD, timeout_s=120)


def _stp_rank() -> None:
    from test_stp import Stack

    from nam_plasticity import STP, STPConfig
    from nam_runtime import dist as runtime

    world = runtime.initialize(tensor_parallel=1)
    torch.manual_seed(0)
    model = Stack(head=False)
    stp = STP(STPConfig(layers=(2, 3), lam=0.1, samples=4))
    stp.register(model)
    stp.set_step(1)
    x = torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(world.rank))
    model(x).sum().backward()
    local = float(stp._loss_sum) / stp._loss_count
    metrics: dict[str, float] = {}
    stp.pop_metrics(metrics)
    per_rank = gathered(torch.tensor([local], dtype=torch.float64))
    assert not torch.equal(per_rank[0], per_rank[1]), per_rank
    assert abs(metrics["stp/loss"] - float(sum(per_rank)) / WORLD) < 1e-6, (metrics, per_rank)


def test_stp_loss_is_averaged_over_data_parallel_ranks() -> None:
    run_ranks(_stp_rank, WORLD, timeout_s=120)
