"""A bf16 megatron MLP under megatron's DDP wrapper and mixed-precision optimizer at lr=0, and the
check that an intervention's edit survives the optimizer's master-to-model copy.

Building the DDP wrapper and megatron's optimizers on CPU needs nam-runtime's patches
(``nam_runtime.cpu``): megatron allocates its buffers with device='cuda' and checks for
torch.cuda tensor types."""

from __future__ import annotations

import torch
from megatron_models import config, mlp_submodules
from torch import nn


class Chunk(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        from megatron.core.transformer.mlp import MLP

        self.config = cfg
        self.mlp = MLP(cfg, mlp_submodules())


def bf16_model_and_optimizer(distributed: bool, lr: float = 0.0):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    # hidden 36, ffn 47: the data-parallel shard boundary falls inside an fc1 row
    cfg = config(bf16=True, params_dtype=torch.bfloat16, hidden_size=36, kv_channels=9, ffn_hidden_size=47)
    chunk = Chunk(cfg).to(torch.bfloat16)
    ddp = DistributedDataParallel(
        cfg,
        DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed),
        chunk,
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=lr,
            min_lr=0.0,
            weight_decay=0.0,
            bf16=True,
            clip_grad=0.0,
            use_distributed_optimizer=distributed,
        ),
        [ddp],
    )
    return ddp, opt


def train_step(ddp, opt, seed: int) -> None:
    """One step on this rank's micro-batch (different on each data-parallel rank)."""
    ddp.zero_grad_buffer()
    opt.zero_grad()
    rank = torch.distributed.get_rank()
    x = torch.randn(
        8, 2, ddp.module.config.hidden_size, generator=torch.Generator().manual_seed(seed + 100 * rank)
    ).to(torch.bfloat16)
    out, _ = ddp.module.mlp(x)
    out.float().square().mean().backward()
    ddp.finish_grad_sync()
    opt.step()


def check_edit_lands_in_masters(distributed: bool) -> None:
    """FIRE on the fc1 blocks after a step; the next step at lr=0 must keep it, and nothing
    untouched may move: masters, model parameters and optimizer state."""
    from nam_plasticity import FireConfig, apply_fire, find_blocks, resolve

    ddp, opt = bf16_model_and_optimizer(distributed)
    train_step(ddp, opt, 0)
    params = dict(ddp.module.named_parameters())
    masters = {n: resolve(p, opt) for n, p in params.items()}
    main_before = {n: m.read() for n, m in masters.items()}
    model_before = {n: p.detach().clone() for n, p in params.items()}
    state_before = {
        n: {k: v.clone() for k, v in (m.optimizer.state.get(m.state_key) or {}).items()}
        for n, m in masters.items()
    }

    blocks = [b for b in find_blocks([ddp.module]) if "linear_fc1" in b.name]
    assert blocks and all(b.param.dtype == torch.bfloat16 for b in blocks)
    apply_fire(1, blocks, opt, FireConfig(bulk="fp32", tol=1e-6))
    touched = "mlp.linear_fc1.weight"
    expected = masters[touched].read()  # the intervention's fp32 output, gathered
    assert not torch.equal(expected, main_before[touched])
    assert torch.equal(params[touched].detach(), expected.to(torch.bfloat16))

    m = masters[touched]
    for key, value in (m.optimizer.state.get(m.state_key) or {}).items():
        if isinstance(value, torch.Tensor) and value.shape == m.state_key.shape:
            assert (value == 0).all(), key  # FIRE touched every entry of fc1
    for n, mm in masters.items():
        if n == touched:
            continue
        for key, value in (mm.optimizer.state.get(mm.state_key) or {}).items():
            assert torch.equal(value, state_before[n][key]), (n, key)

    train_step(ddp, opt, 1)  # lr=0: the optimizer copies masters over the model parameters
    assert torch.equal(masters[touched].read(), expected)
    assert torch.equal(params[touched].detach(), expected.to(torch.bfloat16))
    for n in params:
        if n != touched:
            assert torch.equal(masters[n].read(), main_before[n]), n  # bit-identical masters
            assert torch.equal(params[n].detach(), model_before[n]), n


def reduced_grad(master) -> torch.Tensor:
    """The data-parallel-reduced gradient of the whole parameter: each rank's main_grad is reduced
    only on the slice it owns under the distributed optimizer, so the slices are summed."""
    g = master.param.main_grad.detach().float()
    if not master.sharded:
        return g.clone()
    flat = torch.zeros(g.numel())
    flat[master.shard[0] : master.shard[1]] = g.reshape(-1)[master.shard[0] : master.shard[1]]
    torch.distributed.all_reduce(flat, group=master.group)
    return flat.view_as(g)


def check_dash_reads_reduced_main_grad(distributed: bool) -> None:
    """DASH after a step equals the row formula on the gathered master and the reduced gradient."""
    from nam_plasticity import DashConfig, dash_scale, find_blocks, resolve
    from nam_plasticity.dash import Dash

    ddp, opt = bf16_model_and_optimizer(distributed)
    train_step(ddp, opt, 0)
    params = dict(ddp.module.named_parameters())
    masters = {n: resolve(p, opt) for n, p in params.items()}
    if distributed:  # a row split between two ranks: its sums come from both
        fc1 = masters["mlp.linear_fc1.weight"]
        assert any(0 < b < fc1.tensor.numel() and b % fc1.tensor.shape[-1] for b in fc1.shard), fc1.shard
    want = {}
    for n, m in masters.items():
        w = m.read()
        want[n] = w * dash_scale(w, reduced_grad(m), 0.3)[:, None] if w.dim() == 2 else w
    Dash(DashConfig(lam=0.3)).apply(1, find_blocks([ddp.module]), opt)
    for n, m in masters.items():
        assert torch.allclose(m.read(), want[n], rtol=1e-6, atol=1e-7), n
        assert torch.equal(params[n].detach(), m.read().to(torch.bfloat16)), n
