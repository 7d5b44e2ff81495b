"""Multi-token prediction: the depths' losses against a hand-written computation at the same weights
(forward and every gradient), the main head alone in eval mode, the masks, the accounting, and the
configuration's limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny

from nam_layout import Layout
from nam_runtime import dist
from nam_runtime.testing import run_ranks
from nam_spec import ParallelConfig, build_model, describe, model_flops_per_token, model_params, problems
from nam_spec.config import EmbeddingConfig
from nam_spec.letters import MTP_LETTERS
from nam_spec.memory import memory_estimate

LAYOUT = Layout.tile("AM", 4)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _left(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)


def _reference(
    model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """DeepSeek-V3's MTP written out: depth k embeds the tokens k ahead, normalises it and h_{k-1},
    projects [embedding, hidden], runs its layers and scores the labels k ahead with the shared
    output layer. The trunk, the embedding and each depth's layers are the model's modules."""
    b, s = ids.shape
    eps = model.config.layernorm_epsilon
    rotary = model.rotary_pos_emb(s)
    hidden = model.decoder(model.embedding(ids, pos), None, rotary, None)  # [s, b, h], final norm in

    def loss(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = h.transpose(0, 1) @ model.output_layer.weight.t()
        return F.cross_entropy(logits.reshape(b * s, -1), target.reshape(-1), reduction="none").view(b, s)

    out = [loss(hidden, labels)]
    for depth in model.mtp.layers:
        ids, pos, labels = _left(ids), _left(pos), _left(labels)
        embedded = model.embedding(ids, pos)
        x = torch.cat([_rms(embedded, depth.enorm.weight, eps), _rms(hidden, depth.hnorm.weight, eps)], -1)
        hidden = depth.mtp_model_layer(x @ depth.eh_proj.weight.t(), None, rotary, None)
        out.append(loss(hidden, labels))
    return torch.stack(out)


def test_depths_match_the_written_out_computation_forward_and_gradients(megatron_single_rank: None) -> None:
    torch.manual_seed(0)
    model = build_model(LAYOUT, tiny(mtp_depth=2, embedding=EmbeddingConfig(ngram=True, ngram_table_size=31)))
    model.train()
    b, s = 2, 8
    ids = torch.randint(0, 64, (b, s))
    pos = torch.arange(s).expand(b, s)
    labels = torch.randint(0, 64, (b, s))
    got = model(ids, pos, labels=labels)
    want = _reference(model, ids, pos, labels)
    assert got.shape == (3, b, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the depths differ from the main head and from each other: their inputs are shifted
    assert not torch.allclose(got[1], got[0]) and not torch.allclose(got[2], got[1])
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.rand_like(got)
    g_got = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * weights).sum(), params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, w in zip(names, g_got, g_want, strict=True):
        assert a is not None and w is not None, name
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6, msg=name)
    mtp_grads = [g for n, g in zip(names, g_got, strict=True) if n.startswith("mtp.")]
    assert mtp_grads and all(g.abs().sum() > 0 for g in mtp_grads)

    model.eval()  # evaluation (and generation) run the main head alone
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pos, labels=labels), got[0].detach())


def test_masks_shift_and_stay_inside_the_document() -> None:
    from nam_spec.mtp import mtp_loss_masks

    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert mtp_loss_masks(mask, 2).tolist() == [[[1, 0, 1, 1, 1, 0]], [[0, 1, 1, 1, 0, 0]]]
    assert mtp_loss_masks(mask, 2, docs).tolist() == [[[1, 0, 0, 1, 1, 0]], [[0, 0, 0, 1, 0, 0]]]


def test_accounting_counts_the_depths(megatron_single_rank: None) -> None:
    config = tiny(mtp_depth=2)
    built = describe(build_model(LAYOUT, config))
    assert built.total == built.formula_total == model_params(config, LAYOUT).total
    off = tiny()
    h, v = config.hidden_size, config.vocab_size
    depth = 3 * h + 2 * h * h + sum(model_params(off, Layout.tile(k, 1)).layers_total for k in MTP_LETTERS)
    assert (
        built.extra["mtp"]
        == 2 * depth
        == model_params(config, LAYOUT).total - model_params(off, LAYOUT).total
    )
    # per depth: eh_proj, its layers' matmuls and the output layer again, plus its attention's scores
    layers = Layout.tile(MTP_LETTERS, len(MTP_LETTERS))
    per_depth = model_flops_per_token(off, layers) - 6 * v * h + 6 * (2 * h * h + v * h)
    assert model_flops_per_token(config, LAYOUT) == pytest.approx(
        model_flops_per_token(off, LAYOUT) + 2 * per_depth
    )
    with_mtp, without = (memory_estimate(c, LAYOUT, micro_batch_size=1) for c in (config, off))
    assert with_mtp.activations["mtp"] > 0 and "mtp" not in without.activations
    assert with_mtp.weights - without.weights == 2 * depth * 4  # fp32


def _losses_at(tmp: Path, tensor: int) -> torch.Tensor:
    """[3, b, s] training-mode losses at ``tensor`` ranks with sequence parallelism; TP=2 saves its
    weights, TP=1 (other seeds) loads them through megatron's dist_checkpointing."""
    from megatron.core import dist_checkpointing

    dist.initialize(tensor_parallel=tensor, seed=tensor)
    parallel = ParallelConfig(tensor=tensor, sequence_parallel=tensor > 1)
    model = build_model(Layout.tile("AM", 2), tiny(mtp_depth=2), parallel)
    path = tmp / "ckpt"
    if tensor > 1:
        path.mkdir(exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(path))
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(path)))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.train()(ids, torch.arange(8).expand(2, 8), labels=ids)


def test_tp2_sequence_parallel_depths_equal_tp1(tmp_path: Path) -> None:
    """eh_proj's column shards gathered, then scattered back to the sequence shard."""
    tp2 = run_ranks(_losses_at, 2, tmp_path, 2)
    (tp1,) = run_ranks(_losses_at, 1, tmp_path, 1)
    assert tp1.shape == (3, 2, 8)
    torch.testing.assert_close(tp2[0], tp2[1], rtol=0, atol=0)
    torch.testing.assert_close(tp2[0], tp1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mtp_depth": 8}, "model.mtp_depth 8 must be an integer from 0 (off) to model.seq_length - 1 = 7"),
        ({"mtp_depth": -1}, "model.mtp_depth -1 must be an integer from 0 (off)"),
        ({"mtp_loss_weight": -0.5}, "model.mtp_loss_weight -0.5 must be a finite number >= 0"),
    ],
)
def test_bad_depth_or_weight_is_one_problem(changes: dict[str, object], message: str) -> None:
    (problem,) = problems(tiny(**changes), LAYOUT)
    assert message in problem
