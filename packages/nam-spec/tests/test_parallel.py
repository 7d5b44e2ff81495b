"""Two gloo processes: TP=2 with sequence parallelism (E layers included) and PP=2 (one stage
without E) give the loss of the single-process model with the same weights; the weights travel
through megatron's dist_checkpointing, so the same runs prove that a checkpoint saved at TP=2
(or split over two stages) loads at TP=1 and reproduces the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import run_ranks
from helpers import tiny

from nam_layout import Layout

TP_LAYOUT = "AEMERM-"  # every letter, two E layers
PP_LAYOUT = "AEM|R-M"  # stage 1 has no E layer
REPLICATED = ("qk_weight", "qk_conv_weight", "final_norm.weight", ".norm.weight")  # .norm: M and R pre-norms


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 64, (1, 8), generator=g), torch.arange(8)[None]


def _save(model: torch.nn.Module, path: Path) -> None:
    from megatron.core import dist_checkpointing

    path.mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(path))


def _load(model: torch.nn.Module, path: Path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(path))
    model.load_state_dict(state)


def _tp2_rank(rank: int, tmp: Path, layout: str = TP_LAYOUT) -> None:
    from megatron.core import parallel_state

    from nam_spec.model import build_model

    torch.manual_seed(1)  # one seed on every rank, as megatron seeds the default generator
    model = build_model(Layout.tile(layout, len(layout)), tiny(tensor_parallel=2, sequence_parallel=True))
    ids, pos = _batch()
    loss = model(ids, pos, labels=ids).mean()
    loss.backward()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False):  # what megatron's finalize_model_grads sums over TP
            torch.distributed.all_reduce(p.grad, group=tp_group)
        if name.endswith(REPLICATED):
            grads[name] = p.grad.tolist()
    _save(model, tmp / "ckpt-tp2")
    if rank == 0:
        (tmp / "tp2.json").write_text(json.dumps({"loss": loss.item(), "grads": grads}))


def _tp1_rank(rank: int, tmp: Path, layout: str, ckpt: str) -> None:
    from nam_spec.model import build_model

    torch.manual_seed(99)  # different initial weights: everything must come from the checkpoint
    model = build_model(Layout.tile(layout, len(layout)), tiny())
    _load(model, tmp / ckpt)
    ids, pos = _batch()
    loss = model(ids, pos, labels=ids).mean()
    loss.backward()
    grads = {n: p.grad.tolist() for n, p in model.named_parameters() if n.endswith(REPLICATED)}
    (tmp / f"tp1-{ckpt}.json").write_text(json.dumps({"loss": loss.item(), "grads": grads}))


def test_tp2_sequence_parallel_equals_tp1_and_checkpoint_reshards(tmp_path: Path) -> None:
    run_ranks(_tp2_rank, 2, tmp_path, tmp_path, tp=2)
    run_ranks(_tp1_rank, 1, tmp_path, tmp_path, TP_LAYOUT, "ckpt-tp2")
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    tp1 = json.loads((tmp_path / "tp1-ckpt-tp2.json").read_text())
    assert abs(tp2["loss"] - tp1["loss"]) < 1e-5 * abs(tp1["loss"])
    assert tp2["grads"].keys() == tp1["grads"].keys() and len(tp1["grads"]) >= 4
    for name, grad in tp1["grads"].items():  # replicated weights: the TP=2 partial grads sum to TP=1's
        torch.testing.assert_close(
            torch.tensor(tp2["grads"][name]), torch.tensor(grad), rtol=1e-4, atol=1e-6, msg=name
        )


def _pp2_rank(rank: int, tmp: Path) -> None:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from nam_spec.model import build_model
    from nam_spec.moe_metrics import MoECounter, init_megatron_tracker

    torch.manual_seed(1)
    layout = Layout.tile(PP_LAYOUT, 6)
    config = tiny(pipeline_parallel=2)
    model = build_model(layout, config)
    assert model.decoder.kinds == ("AEM", "R-M")[rank] and model.decoder.offset == 3 * rank
    counter = MoECounter([model], config, depth=layout.depth)
    ids, pos = _batch()
    if rank == 0:
        hidden = model(ids, pos)
        torch.distributed.send(hidden.detach().contiguous(), dst=1)
    else:
        hidden = torch.empty(8, 1, 32)
        torch.distributed.recv(hidden, src=0)
        model.set_input_tensor(hidden)
        loss = model(None, pos, labels=ids).mean()
        (tmp / "pp2.json").write_text(json.dumps({"loss": loss.item()}))
    # metric reductions must not hang on the stage without E layers
    stats = counter.collect()
    assert stats.layers == [2] and int(stats.tokens[1].sum()) == 8 * config.moe.top_k
    init_megatron_tracker(config, layout.depth, device="cpu")
    get_moe_metrics_tracker().report(
        loss_scale=1.0, iteration=1, num_layers=layout.depth, track_names=["load_balancing_loss"]
    )
    _save(model, tmp / "ckpt-pp2")


def test_pp2_stage_without_experts_equals_single_process(tmp_path: Path) -> None:
    run_ranks(_pp2_rank, 2, tmp_path, tmp_path, pp=2)
    run_ranks(_tp1_rank, 1, tmp_path, tmp_path, PP_LAYOUT.replace("|", ""), "ckpt-pp2")
    pp2 = json.loads((tmp_path / "pp2.json").read_text())["loss"]
    single = json.loads((tmp_path / "tp1-ckpt-pp2.json").read_text())["loss"]
    assert abs(pp2 - single) < 1e-5 * abs(single)
