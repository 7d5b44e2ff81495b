"""Two gloo processes: TP=2 with sequence parallelism (E and L layers included) and PP=2 (one
stage without E) give the loss of the single-process model with the same weights; the weights
travel through megatron's dist_checkpointing, so the same runs prove that a checkpoint saved at
TP=2 (or split over two stages) loads at TP=1 and reproduces the outputs: per-token losses and
logits for TP=2, the loss for PP=2. An L layer alone at TP=2, with and without sequence
parallelism, gives TP=1's output and every gradient (its shared rotary key is summed over ranks)."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import latent_layer, tiny

from nam_layout import Layout
from nam_runtime import dist
from nam_runtime.testing import run_ranks
from nam_spec.config import ParallelConfig

TP_LAYOUT = "AEMERM-L"  # every letter, two E layers
PP_LAYOUT = "AEM|R-M"  # stage 1 has no E layer
# .norm: M and R pre-norms; q_/kv_layernorm: L's latent norms
REPLICATED = (
    "qk_weight",
    "qk_conv_weight",
    "final_norm.weight",
    ".norm.weight",
    "q_layernorm.weight",
    "kv_layernorm.weight",
)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (1, 8), generator=g), torch.arange(8)[None]


def _save(model: torch.nn.Module, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(path))


def _outputs(model: torch.nn.Module) -> dict:
    """Per-token losses [b, s] and this rank's logits [b, s, vocab / TP] on the test batch."""
    ids, pos = _batch()
    with torch.no_grad():
        logits = model(ids, pos)
    losses = model(ids, pos, labels=ids)
    return {"loss": losses.mean(), "losses": losses.detach(), "logits": logits}


def _tp2_rank(tmp: Path, backward: bool) -> dict:
    """TP=2 with sequence parallelism: per-token losses, this rank's vocabulary shard of the logits
    (and with ``backward`` the TP-summed gradients of the replicated weights); the weights are saved
    as a checkpoint for the TP=1 run."""
    from megatron.core import parallel_state

    from nam_spec.model import build_model

    dist.initialize(tensor_parallel=2, seed=1)
    model = build_model(
        Layout.tile(TP_LAYOUT, len(TP_LAYOUT)), tiny(), ParallelConfig(tensor=2, sequence_parallel=True)
    )
    out = _outputs(model)
    _save(model, tmp / ("ckpt-tp2-grads" if backward else "ckpt-tp2"))
    grads = {}
    if not backward:
        return {**out, "loss": out["loss"].item(), "grads": grads}
    out["loss"].backward()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False):  # what megatron's finalize_model_grads sums over TP
            torch.distributed.all_reduce(p.grad, group=tp_group)
        if name.endswith(REPLICATED):
            grads[name] = p.grad.clone()
    return {**out, "loss": out["loss"].item(), "grads": grads}


def _tp1_rank(tmp: Path, layout: str, ckpt: str) -> dict:
    from megatron.core import dist_checkpointing

    from nam_spec.model import build_model

    dist.initialize(seed=99)  # other initial weights: everything must come from the checkpoint
    model = build_model(Layout.tile(layout, len(layout)), tiny())
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp / ckpt)))
    out = _outputs(model)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if n.endswith(REPLICATED)}
    return {**out, "loss": out["loss"].item(), "grads": grads}


def test_tp2_sequence_parallel_equals_tp1_and_checkpoint_reshards(tmp_path: Path) -> None:
    tp2 = run_ranks(_tp2_rank, 2, tmp_path, False)
    (tp1,) = run_ranks(_tp1_rank, 1, tmp_path, TP_LAYOUT, "ckpt-tp2")
    assert tp2[0]["loss"] == tp2[1]["loss"]
    assert abs(tp2[0]["loss"] - tp1["loss"]) < 1e-5 * abs(tp1["loss"])
    # not only the mean: every token's loss, and the logits (each TP rank holds half the vocabulary)
    torch.testing.assert_close(tp2[0]["losses"], tp2[1]["losses"], rtol=0, atol=0)
    torch.testing.assert_close(tp2[0]["losses"], tp1["losses"], rtol=1e-5, atol=1e-6)
    logits_tp2 = torch.cat([tp2[0]["logits"], tp2[1]["logits"]], dim=-1)
    assert logits_tp2.shape == tp1["logits"].shape == (1, 8, 64)
    torch.testing.assert_close(logits_tp2, tp1["logits"], rtol=1e-5, atol=1e-6)


def test_tp2_sequence_parallel_gradients_of_replicated_weights(tmp_path: Path) -> None:
    """The shared q/k head, the mixers' pre-norms and the final norm: partial per TP rank, their
    sequence-parallel sums equal the single-process gradients."""
    tp2 = run_ranks(_tp2_rank, 2, tmp_path, True)
    (tp1,) = run_ranks(_tp1_rank, 1, tmp_path, TP_LAYOUT, "ckpt-tp2-grads")
    assert tp2[0]["grads"].keys() == tp1["grads"].keys() and len(tp1["grads"]) >= 5
    for name, grad in tp1["grads"].items():  # replicated weights: the TP=2 partial grads sum to TP=1's
        torch.testing.assert_close(tp2[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _split_dim(p: torch.nn.Parameter) -> int | None:
    return p.partition_dim if getattr(p, "tensor_model_parallel", False) else None


def _latent_rank(tmp: Path, tp: int) -> list[dict]:
    """An L layer on one fixed input: at TP=1 it saves its weights; at TP=2 (SP off, then on) it
    loads this rank's shard of them. Returns, per run, the output, the input gradient and the
    parameter gradients of this rank (the SP-partial ones summed over TP, as finalize_model_grads
    does) with the dimension each is split along (None: replicated)."""
    from megatron.core import parallel_state

    dist.initialize(tensor_parallel=tp, seed=1)
    rank = parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(3)
    x_full, dout_full = (torch.randn(8, 2, 32, generator=g) for _ in range(2))
    runs = []
    for sp in (False, True) if tp > 1 else (False,):
        layer = latent_layer(tiny(), ParallelConfig(tensor=tp, sequence_parallel=sp))
        if tp == 1:
            torch.save(layer.state_dict(), tmp / "latent.pt")
        else:
            full = torch.load(tmp / "latent.pt")
            with torch.no_grad():
                for name, p in layer.named_parameters():
                    split = _split_dim(p)
                    p.copy_(full[name] if split is None else full[name].chunk(tp, split)[rank])
        x, dout = ((t.chunk(tp, 0)[rank] if sp else t).clone() for t in (x_full, dout_full))
        x.requires_grad_(True)
        out, _ = layer(x, attention_mask=None)
        out.backward(dout)
        grads = {}
        for name, p in layer.named_parameters():
            if getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=parallel_state.get_tensor_model_parallel_group())
            grads[name] = (p.grad, _split_dim(p))
        runs.append({"sp": sp, "out": out.detach(), "x": x.grad, "grads": grads})
    return runs


def test_tp2_latent_attention_equals_tp1_output_and_gradients(tmp_path: Path) -> None:
    ((tp1,),) = run_ranks(_latent_rank, 1, tmp_path, 1)
    ranks = run_ranks(_latent_rank, 2, tmp_path, 2)
    for run in zip(*ranks, strict=True):
        sp = run[0]["sp"]
        for key in ("out", "x"):  # under SP each rank holds half the sequence
            got = torch.cat([r[key] for r in run]) if sp else run[0][key]
            torch.testing.assert_close(got, tp1[key], rtol=1e-5, atol=1e-6, msg=f"{key}, SP {sp}")
        assert run[0]["grads"].keys() == tp1["grads"].keys()
        for name, (want, _) in tp1["grads"].items():
            shards, split = [r["grads"][name][0] for r in run], run[0]["grads"][name][1]
            got = shards[0] if split is None else torch.cat(shards, split)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name}, SP {sp}")


def _pp2_rank(tmp: Path) -> float | None:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from nam_spec.model import build_model
    from nam_spec.moe_metrics import MoECounter, init_megatron_tracker

    dist.initialize(pipeline_parallel=2, seed=1)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    layout = Layout.tile(PP_LAYOUT, 6)
    config = tiny()
    model = build_model(layout, config, ParallelConfig(pipeline=2))
    assert model.decoder.kinds == ("AEM", "R-M")[rank] and model.decoder.offset == 3 * rank
    counter = MoECounter([model], config, depth=layout.depth)
    ids, pos = _batch()
    loss = None
    if rank == 0:
        hidden = model(ids, pos)
        torch.distributed.send(hidden.detach().contiguous(), dst=1)
    else:
        hidden = torch.empty(8, 1, 32)
        torch.distributed.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        loss = model(None, pos, labels=ids).mean().item()
    # metric reductions must not hang on the stage without E layers
    stats = counter.collect()
    assert stats.layers == [2] and int(stats.tokens[1].sum()) == 8 * config.moe.top_k
    init_megatron_tracker(config, layout.depth)
    get_moe_metrics_tracker().report(
        loss_scale=1.0, iteration=1, num_layers=layout.depth, track_names=["load_balancing_loss"]
    )
    _save(model, tmp / "ckpt-pp2")
    return loss


def test_pp2_stage_without_experts_equals_single_process(tmp_path: Path) -> None:
    _, pp2 = run_ranks(_pp2_rank, 2, tmp_path)
    (single,) = run_ranks(_tp1_rank, 1, tmp_path, PP_LAYOUT.replace("|", ""), "ckpt-pp2")
    assert abs(pp2 - single["loss"]) < 1e-5 * abs(single["loss"])
