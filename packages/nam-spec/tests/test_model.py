"""A small model with the NAM56R pattern and depth: builds, trains one step's worth, describes itself."""

import pytest
import torch
from helpers import tiny

from nam_layout import get_family
from nam_spec.description import describe
from nam_spec.model import build_model
from nam_spec.moe_metrics import MoECounter, init_megatron_tracker
from nam_spec.param_groups import no_weight_decay, param_groups

FAMILY = get_family("NAM56R")


def _batch(seed: int = 0, b: int = 2, s: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s)


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids, pos = _batch()
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, labels=ids).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_nam56r_pattern_builds_and_every_parameter_gets_a_gradient(megatron_single_rank: None) -> None:
    torch.manual_seed(0)
    model = build_model(FAMILY.layout(), tiny())
    assert model.decoder.kinds == FAMILY.layout().kinds and len(model.decoder.layers) == 52
    assert [layer.layer_number for layer in model.decoder.layers] == list(range(1, 53))
    loss, grads = _loss_and_grads(model)
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if n not in grads]
    assert missing == []
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_recomputation_changes_memory_not_results(policy: str, megatron_single_rank: None) -> None:
    torch.manual_seed(0)
    plain = build_model(FAMILY.layout(), tiny())
    torch.manual_seed(0)
    recomputed = build_model(FAMILY.layout(), tiny(recompute=dict.fromkeys("AEMR-", policy)))
    recomputed.load_state_dict(plain.state_dict())
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(recomputed)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    saved = _saved_activation_bytes(plain), _saved_activation_bytes(recomputed)
    assert saved[1] < saved[0], saved


def _saved_activation_bytes(model: torch.nn.Module) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    ids, pos = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, pos, labels=ids).mean()
    return total


def test_hidden_state_hook_sees_every_layer_output(megatron_single_rank: None) -> None:
    model = build_model(FAMILY.layout(), tiny())
    seen: list[tuple[int, str, tuple[int, ...]]] = []
    handle = model.decoder.register_hidden_state_hook(lambda n, k, h: seen.append((n, k, tuple(h.shape))))
    ids, pos = _batch(b=2, s=8)
    model(ids, pos)
    assert [(n, k) for n, k, _ in seen] == [(i + 1, k) for i, k in enumerate(FAMILY.layout().kinds)]
    assert {shape for _, _, shape in seen} == {(8, 2, 32)}  # sequence-first
    handle.remove()
    model(ids, pos)
    assert len(seen) == 52


def test_a_hidden_state_hook_may_replace_the_hidden_states(megatron_single_rank: None) -> None:
    model = build_model(FAMILY.layout(), tiny())
    ids, pos = _batch(b=1, s=8)
    plain = model(ids, pos)
    handle = model.decoder.register_hidden_state_hook(lambda n, k, h: h * 0 if n == 52 else None)
    zeroed = model(ids, pos)  # the final norm of zeros is zero: logits are the output bias, none
    handle.remove()
    assert plain.abs().sum() > 0 and torch.equal(zeroed, torch.zeros_like(zeroed))


def test_describe_lists_layers_and_totals(megatron_single_rank: None) -> None:
    model = build_model(FAMILY.layout(), tiny())
    d = describe(model)
    assert [r.letter for r in d.rows] == list(FAMILY.layout().kinds)
    assert d.total == sum(p.numel() for p in model.parameters()) == d.formula_total
    assert d.rows[11].core == "nam_mixers.modules.m2rnn.M2RNNCore" and d.rows[11].layer == 12
    assert d.rows[0].core == "nam_spec.local.attention.SDPAttention"
    assert d.active < d.total
    assert "R" in d.table() and d.as_dict()["by_letter"]["R"] == 4 * d.rows[11].params
    from_layout = describe(FAMILY.layout(), tiny())
    assert from_layout.total == d.total


def test_parameter_groups_policy(megatron_single_rank: None) -> None:
    model = build_model(FAMILY.layout(), tiny())
    names = dict(model.named_parameters())
    exempt = {n for n, p in names.items() if no_weight_decay(n, p)}
    for suffix in ("core.A_log", "core.D", "core.dt_bias", "input_layernorm.weight", "final_norm.weight"):
        assert any(n.endswith(suffix) for n in exempt), suffix
    for n in exempt:
        assert "linear_qkv" not in n and "fc1_weight" not in n and "word_embeddings" not in n
    groups = param_groups(model.named_parameters(), 0.1)
    assert sum(len(g["params"]) for g in groups) == len(names)
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == len(exempt)


def test_moe_counter_counts_every_routed_token(megatron_single_rank: None) -> None:
    config = tiny()
    model = build_model(FAMILY.layout(), config)
    counter = MoECounter([model], config, depth=52)
    ids, pos = _batch(b=2, s=8)
    model(ids, pos)
    stats = counter.collect()
    e_layers = [n for n in FAMILY.layout().positions("E")]
    assert stats.layers == e_layers
    assert (stats.tokens[[n - 1 for n in e_layers]].sum(dim=1) == 16 * config.moe.top_k).all()
    imbalance, dead = stats.imbalance(), stats.dead()
    assert all(v >= 1.0 for v in imbalance.values()) and set(dead) == set(e_layers)
    metrics = stats.as_metrics()
    assert metrics["moe/dead_experts"] == sum(dead.values())
    counter.remove()


def test_megatron_tracker_initialised_on_a_stage_without_experts(megatron_single_rank: None) -> None:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    init_megatron_tracker(tiny(), depth=52, device="cpu")
    entry = get_moe_metrics_tracker().metrics["load_balancing_loss"]
    assert entry.values.shape == (52,)


def test_tied_output_layer_shares_the_word_embedding(megatron_single_rank: None) -> None:
    from nam_layout import Layout
    from nam_spec.accounting import model_params

    config, layout = tiny(untie_output=False), Layout.tile("AE", 2)
    model = build_model(layout, config)
    assert model.output_layer.weight is None
    assert sum(p.numel() for p in model.parameters()) == model_params(config, layout).total
    ids, pos = _batch()
    model(ids, pos, labels=ids).mean().backward()
    assert model.embedding.word_embeddings.weight.grad is not None


def test_megatron_schedule_runs_a_step(megatron_single_rank: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """megatron's forward/backward schedule reads the model type and gets the same loss as a call."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    # a plain backward through E layers (earlier tests) leaves a 0-d aux-loss scale that the
    # schedule cannot copy its [1] scale into; the schedule creates its own from None
    monkeypatch.setattr(MoEAuxLossAutoScaler, "main_loss_backward_scale", None)

    torch.manual_seed(0)
    model = build_model(FAMILY.layout(), tiny())
    ids, pos = _batch()

    def forward_step(data, chunk):
        ids, pos = next(data)
        return chunk(ids, pos, labels=ids), lambda out: (out.mean(), {"loss": out.mean().detach().clone()})

    (stats,) = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([(ids, pos)]),
        model=[model],
        num_microbatches=1,
        seq_length=ids.shape[1],
        micro_batch_size=ids.shape[0],
    )
    scheduled = {n: p.grad.clone() for n, p in model.named_parameters()}
    expect, grads = _loss_and_grads(model)
    assert torch.allclose(stats["loss"], expect)
    for n, g in grads.items():
        assert torch.allclose(scheduled[n], g, rtol=1e-5, atol=1e-6), n
