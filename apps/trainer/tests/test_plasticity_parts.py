"""nam-plasticity on nam-spec's real modules (both packages meet only here, in the trainer):
the logical blocks of every letter, FIRE on each kind of block, TP=2 with sequence parallelism
against TP=1 on the same weights (FIRE, ReDo on grouped experts, STP), ReDo recycling one unit
of one grouped expert."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nam_runtime.testing import run_ranks

LAYOUT = "AEMR-"  # one layer of every letter: numbers 1..5, indices 0..4
STP_LAYERS = (2, 4)
SEQ = 16


def tiny():
    """Hidden 32, every letter, megatron's allgather dispatcher, reference mixer paths."""
    from nam_spec import AttentionConfig, M2RNNConfig, MambaConfig, ModelConfig, MoEConfig

    return ModelConfig(
        hidden_size=32,
        vocab_size=64,
        seq_length=SEQ,
        ffn_hidden_size=64,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2),
        moe=MoEConfig(
            num_experts=4, top_k=2, ffn_hidden_size=16, shared_ffn_hidden_size=16, dispatcher="allgather"
        ),
        mamba=MambaConfig(d_state=8, head_dim=8, ngroups=2, chunk_size=8, path="reference"),
        m2rnn=M2RNNConfig(num_heads=4, head_dim_v=4, head_dim_k=8, path="reference"),
    )


def build(tensor: int = 1) -> torch.nn.Module:
    from nam_layout import Layout
    from nam_spec import ParallelConfig, build_model

    parallel = ParallelConfig(tensor=tensor, sequence_parallel=tensor > 1)
    return build_model(Layout.tile(LAYOUT, len(LAYOUT)), tiny(), parallel)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (1, SEQ), generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 11])  # the second document crosses the TP=2 shard boundary
    return ids, torch.arange(SEQ)[None], docs


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    from nam_runtime import dist

    dist.initialize(seed=3)
    yield
    dist.teardown()


def expected_blocks() -> dict[str, tuple[int, int]]:
    """Block name -> gathered shape at hidden 32: what each letter must offer."""
    a, e, m, r, d = (f"decoder.layers.{i}" for i in range(5))
    out = {
        f"{a}.self_attention.linear_qkv.weight[q]": (32, 32),  # 4 heads of 8
        f"{a}.self_attention.linear_qkv.weight[k]": (16, 32),  # 2 query groups
        f"{a}.self_attention.linear_qkv.weight[v]": (16, 32),
        f"{a}.self_attention.linear_proj.weight": (32, 32),
        f"{e}.mlp.shared_experts.linear_fc1.weight[gate]": (16, 32),
        f"{e}.mlp.shared_experts.linear_fc1.weight[up]": (16, 32),
        f"{e}.mlp.shared_experts.linear_fc2.weight": (32, 16),
        # Mamba: d_inner 64, 2 groups of state 8, 8 heads
        **{
            f"{m}.mixer.in_proj.weight[{p}]": (n, 32)
            for p, n in (("z", 64), ("x", 64), ("B", 16), ("C", 16), ("dt", 8))
        },
        f"{m}.mixer.out_proj.weight": (32, 64),
        # M2RNN: one shared q/k head of 8, 4 value heads of 4
        f"{r}.mixer.qk_weight[q]": (8, 32),
        f"{r}.mixer.qk_weight[k]": (8, 32),
        **{f"{r}.mixer.in_proj.weight[{p}]": (n, 32) for p, n in (("v", 16), ("g", 16), ("f", 4))},
        f"{r}.mixer.out_proj.weight": (32, 16),
        f"{d}.mlp.linear_fc1.weight[gate]": (64, 32),
        f"{d}.mlp.linear_fc1.weight[up]": (64, 32),
        f"{d}.mlp.linear_fc2.weight": (32, 64),
    }
    for x in range(4):  # every expert separately, fc1 as gate and up
        out[f"{e}.mlp.experts.fc1_weight[{x}][gate]"] = (16, 32)
        out[f"{e}.mlp.experts.fc1_weight[{x}][up]"] = (16, 32)
        out[f"{e}.mlp.experts.fc2_weight[{x}]"] = (32, 16)
    return out


def test_blocks_of_every_letter(one_rank: None) -> None:
    from nam_plasticity import find_blocks

    model = build()
    blocks = {b.name: b for b in find_blocks([model])}
    assert {n: b.global_shape for n, b in blocks.items()} == expected_blocks()
    assert not any(k in n for n in blocks for k in ("router", "embedding", "output_layer", "norm", "core."))
    qk = sorted(b.name for b in find_blocks([model], mode="qk"))
    assert qk == [f"decoder.layers.0.self_attention.linear_qkv.weight[{p}]" for p in "kq"]


def test_m2rnn_parts_are_the_v_g_and_forget_inputs_the_core_splits(one_rank: None) -> None:
    from nam_plasticity import find_blocks

    model = build()
    mixer = model.decoder.layers[3].mixer
    seen = {}
    handle = mixer.core.register_forward_pre_hook(lambda _, args: seen.update(qk=args[0], vgf=args[1]))
    x = torch.randn(SEQ, 1, 32)
    mixer(x)
    handle.remove()
    blocks = {b.part: b for b in find_blocks([mixer])}
    heads, dv = 4, 4
    v, g, f = seen["vgf"].view(1, SEQ, heads, 2 * dv + 1).split([dv, dv, 1], dim=-1)
    q, k = seen["qk"].view(1, SEQ, 2, 8).unbind(2)
    for part, ref, weight in (
        ("v", v, mixer.in_proj.weight),
        ("g", g, mixer.in_proj.weight),
        ("f", f, mixer.in_proj.weight),
        ("q", q, mixer.qk_weight),
        ("k", k, mixer.qk_weight),
    ):
        mine = x.transpose(0, 1) @ blocks[part].matrix(weight.detach()).T
        torch.testing.assert_close(mine, ref.reshape(1, SEQ, -1), msg=part)


KINDS = (
    "decoder.layers.0.self_attention.linear_qkv.weight[k]",
    "decoder.layers.1.mlp.experts.fc1_weight[2][gate]",
    "decoder.layers.1.mlp.experts.fc2_weight[1]",
    "decoder.layers.2.mixer.in_proj.weight[dt]",
    "decoder.layers.2.mixer.in_proj.weight[z]",
    "decoder.layers.3.mixer.qk_weight[q]",
    "decoder.layers.3.mixer.in_proj.weight[f]",
    "decoder.layers.3.mixer.in_proj.weight[v]",
    "decoder.layers.4.mlp.linear_fc1.weight[up]",
)


@pytest.mark.parametrize("name", KINDS)
def test_fire_on_one_block_is_a_scaled_isometry_there_and_nothing_else_moves(
    one_rank: None, name: str
) -> None:
    from nam_plasticity import FireConfig, apply_fire, find_blocks

    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    block = next(b for b in find_blocks([model]) if b.name == name)
    (record,) = apply_fire(1, [block], None, FireConfig(bulk="fp32", tol=1e-6))
    w = block.matrix(block.param.detach()).double()
    rows, cols = block.global_shape
    gram = w.T @ w if rows >= cols else w @ w.T
    torch.testing.assert_close(
        gram, torch.eye(min(rows, cols), dtype=torch.float64) * rows / cols, atol=1e-5, rtol=0
    )
    assert record.residual < 1e-6 and record.block == name
    for n, p in model.named_parameters():
        keep = ~block.mask() if n == block.param_name else torch.ones(p.shape, dtype=torch.bool)
        assert torch.equal(p.detach()[keep], before[n][keep]), n  # bit-identical outside the block
        if n == block.param_name:
            assert not torch.equal(p.detach(), before[n])


def test_dash_shrinks_the_rows_of_each_declared_block_by_its_own_gradient(one_rank: None) -> None:
    from nam_plasticity import Dash, DashConfig, dash_scale, find_blocks

    model = build()
    gen = torch.Generator().manual_seed(2)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = [b for b in find_blocks([model]) if b.role == "declared"]
    Dash(DashConfig(alpha=None)).apply(1, blocks, None)
    for b in blocks:
        w, g = b.matrix(before[b.param_name]), b.matrix(b.param.grad)
        want = w * dash_scale(w, g, 0.3)[:, None]
        torch.testing.assert_close(b.matrix(b.param.detach()), want, msg=b.name)


def test_redo_recycles_one_unit_of_one_grouped_expert(one_rank: None) -> None:
    from nam_plasticity import Redo, RedoConfig

    model = build()
    experts = model.decoder.layers[1].mlp.experts
    ffn = experts.fc2_weight.shape[2]
    with torch.no_grad():
        experts.fc1_weight[2, 5] = 0.0  # unit 5 of expert 2: silu(0) * up = 0, dormant
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    redo = Redo(RedoConfig(tau=0.02), seed=1)
    redo.attach([model])
    names = [layer.name for layer in redo.layers]
    assert [f"decoder.layers.1.mlp.experts.{x}" for x in range(4)] == [n for n in names if ".experts." in n]
    routed = []
    handle = experts.register_activation_hook(lambda act, counts: routed.append(counts.clone()))
    model.train()
    ids, pos, _ = batch()
    model(ids, pos, labels=ids).mean().backward()
    handle.remove()
    assert int(routed[0].sum()) == SEQ * 2  # top-2 routing: each expert scored over its own tokens
    assert int(routed[0][2]) > 0  # expert 2 was routed tokens in this batch
    opt.step()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics: dict[str, float] = {}
    records = redo.apply(7, opt, metrics)
    assert [(r.block, r.rows) for r in records] == [("decoder.layers.1.mlp.experts.2", [5])]
    assert metrics["redo/dormant_fraction/decoder.layers.1.mlp.experts.2"] == pytest.approx(1 / ffn)
    fc1, fc2 = (f"decoder.layers.1.mlp.experts.{w}" for w in ("fc1_weight", "fc2_weight"))
    touched1 = torch.zeros_like(before[fc1], dtype=torch.bool)
    touched1[2, [5, ffn + 5]] = True  # gate row and up row of unit 5
    touched2 = torch.zeros_like(before[fc2], dtype=torch.bool)
    touched2[2, :, 5] = True
    params = dict(model.named_parameters())
    for n, p in params.items():
        mask = {fc1: touched1, fc2: touched2}.get(n, torch.zeros(p.shape, dtype=torch.bool))
        assert torch.equal(p.detach()[~mask], before[n][~mask]), n
    assert (params[fc1].detach()[touched1] != 0).all() and (params[fc2].detach()[touched2] == 0).all()
    assert (opt.state[params[fc1]]["exp_avg"][touched1] == 0).all()


def _replicated(name: str) -> bool:
    """Parameters every TP rank holds whole (megatron sums their gradients over TP under SP)."""
    return name.endswith(
        ("qk_weight", "qk_conv_weight", "final_norm.weight", ".norm.weight", "layernorm.weight")
    )


def _stp_config():
    from nam_plasticity import STPConfig

    return STPConfig(layers=STP_LAYERS, lam=0.5, samples=32, seed=4)


def _tp2_rank(tmp: Path) -> dict:
    """TP=2, sequence parallel: STP and ReDo on one training forward/backward, then FIRE on every
    block; the weights before and after FIRE are saved as checkpoints for the TP=1 run."""
    from megatron.core import dist_checkpointing, parallel_state

    from nam_plasticity import STP, FireConfig, Redo, RedoConfig, apply_fire, find_blocks
    from nam_runtime import dist

    dist.initialize(tensor_parallel=2, seed=1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    model = build(tensor=2)
    (tmp / "before").mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "before"))

    ids, pos, docs = batch()
    redo = Redo(RedoConfig())
    redo.attach([model])
    stp = STP(_stp_config(), sequence_group=group)
    handle = stp.register(model.decoder)
    stp.set_documents(docs)
    stp.set_step(3)
    model.train()
    loss = model(ids, pos, labels=ids).mean()
    stp_loss = float(stp._loss_sum) / stp._loss_count
    loss.backward()
    handle.remove()
    grads = {}
    for name, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False):  # what megatron's finalize_model_grads sums over TP
            torch.distributed.all_reduce(p.grad, group=group)
        if _replicated(name):
            grads[name] = p.grad.clone()
    ema = {layer.name: layer.ema.clone() for layer in redo.layers if ".experts." in layer.name}

    blocks = find_blocks([model])
    records = apply_fire(1, blocks, None, FireConfig(bulk="fp32", tol=1e-6))
    (tmp / "after").mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "after"))
    return {
        "rank": rank,
        "stp_loss": stp_loss,
        "grads": grads,
        "ema": ema,
        "blocks": {b.name: (b.global_shape, b.split) for b in blocks},
        "residual": max(r.residual for r in records),
    }


def _load(tmp: Path, which: str) -> torch.nn.Module:
    from megatron.core import dist_checkpointing

    model = build()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp / which)))
    return model


def _tp1_rank(tmp: Path) -> dict:
    """The same weights at TP=1: the STP loss of each TP rank's sequence slice with that rank's
    samples, the gradients with it, ReDo's statistics, and FIRE compared with the TP=2 result."""
    from nam_plasticity import STP, FireConfig, Redo, RedoConfig, apply_fire, find_blocks, stp_loss
    from nam_runtime import dist

    dist.initialize(seed=99)  # other initial weights: everything comes from the checkpoints
    model = _load(tmp, "before")
    ids, pos, docs = batch()
    redo = Redo(RedoConfig())
    redo.attach([model])
    hidden = {}
    handle = model.decoder.register_hidden_state_hook(
        lambda n, _, h: hidden.update({n: h}) if n in STP_LAYERS else None
    )
    model.train()
    loss = model(ids, pos, labels=ids).mean()
    handle.remove()
    per_rank, half = [], SEQ // 2
    for r in range(2):  # what TP rank r samples and computes on its slice
        replay = STP(_stp_config())
        replay.set_documents(docs)
        replay.set_step(3)
        per_rank.append(
            [
                stp_loss(hidden[n][r * half : (r + 1) * half], *replay.draw(n, 1, half, shard=(r, 2)))
                for n in STP_LAYERS
            ]
        )
    cfg = _stp_config()
    total = loss + cfg.lam / len(cfg.layers) * sum(sum(ls) for ls in per_rank) / 2
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if _replicated(n)}
    ema = {layer.name: layer.ema.clone() for layer in redo.layers if ".experts." in layer.name}
    stp_losses = [float(sum(ls) / len(ls)) for ls in per_rank]

    blocks = find_blocks([model])
    apply_fire(1, blocks, None, FireConfig(bulk="fp32", tol=1e-6))
    after = dict(_load(tmp, "after").named_parameters())
    diff = {n: float((p.detach() - after[n].detach()).abs().max()) for n, p in model.named_parameters()}
    return {
        "stp_losses": stp_losses,
        "grads": grads,
        "ema": ema,
        "blocks": {b.name: b.global_shape for b in blocks},
        "fire_diff": diff,
    }


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], dict]:
    tmp = tmp_path_factory.mktemp("tp")
    tp2 = run_ranks(_tp2_rank, 2, tmp)
    (tp1,) = run_ranks(_tp1_rank, 1, tmp)
    return tp2, tp1


def test_tp2_blocks_are_the_tp1_blocks_and_fire_equals_fire_on_the_gathered_weights(tp_runs) -> None:
    tp2, tp1 = tp_runs
    assert {n: shape for n, (shape, _) in tp2[0]["blocks"].items()} == tp1["blocks"] == expected_blocks()
    splits = {n: split for n, (_, split) in tp2[0]["blocks"].items()}
    assert splits["decoder.layers.1.mlp.experts.fc1_weight[3][up]"] == "rows"  # expert TP = 2
    assert splits["decoder.layers.1.mlp.experts.fc2_weight[3]"] == "cols"
    assert splits["decoder.layers.2.mixer.in_proj.weight[B]"] == "rows"
    assert splits["decoder.layers.3.mixer.in_proj.weight[f]"] == "rows"
    assert splits["decoder.layers.3.mixer.qk_weight[q]"] is None  # the shared head is replicated
    assert tp2[0]["residual"] < 1e-6
    moved = [n for n, d in tp1["fire_diff"].items() if d > 2e-5]
    assert not moved, {n: tp1["fire_diff"][n] for n in moved}


def test_redo_statistics_of_grouped_experts_at_tp2_are_slices_of_tp1(tp_runs) -> None:
    tp2, tp1 = tp_runs
    assert sorted(tp1["ema"]) == [f"decoder.layers.1.mlp.experts.{x}" for x in range(4)]
    for name, full in tp1["ema"].items():
        got = torch.cat([tp2[r]["ema"][name] for r in range(2)])  # expert TP: rank r holds units slice r
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-6, msg=name)


def test_stp_under_sequence_parallelism_equals_tp1_on_each_slice(tp_runs) -> None:
    tp2, tp1 = tp_runs
    for r in range(2):
        assert tp2[r]["rank"] == r
        assert math.isclose(tp2[r]["stp_loss"], tp1["stp_losses"][r], rel_tol=1e-4), r
    assert tp1["stp_losses"][0] != tp1["stp_losses"][1]  # the slices sample different positions
    assert tp2[0]["grads"].keys() == tp1["grads"].keys() and len(tp1["grads"]) >= 5
    for name, grad in tp1["grads"].items():
        torch.testing.assert_close(tp2[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
