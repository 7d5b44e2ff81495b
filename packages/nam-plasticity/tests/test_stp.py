"""STP through the hidden-state hook protocol, on a small residual stack that implements it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from nam_plasticity import STP, STPConfig, stp_loss
from nam_plasticity.stp import lambda_at, sample_triples


class Stack(nn.Module):
    """Residual layers that offer the hidden-state hook protocol; ``head`` adds an output layer."""

    def __init__(self, depth: int = 4, width: int = 16, head: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.output_layer = nn.Linear(width, 11) if head else None
        self._hooks: OrderedDict[int, object] = OrderedDict()

    def register_hidden_state_hook(self, hook) -> RemovableHandle:
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for number, layer in enumerate(self.layers, start=1):
            x = x + torch.tanh(layer(x))
            for hook in self._hooks.values():
                x = hook(number, "-", x)
        return self.output_layer(x) if self.output_layer is not None else x


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def run(model: Stack, x: torch.Tensor, stp: STP | None, doc_ids: torch.Tensor | None = None) -> dict:
    model.zero_grad()
    handle = stp.register(model) if stp is not None else None
    if stp is not None:
        stp.set_documents(doc_ids)
        stp.set_step(10)
    model(x).square().mean().backward()
    if handle is not None:
        handle.remove()
    return grads(model)


def test_gradients_stay_at_and_below_the_deepest_selected_layer() -> None:
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(12, 3, 16)
    plain = run(model, x, None)
    with_stp = run(model, x, STP(STPConfig(layers=(1, 2), lam=0.5, samples=32)))
    changed = {n for n in plain if not torch.equal(plain[n], with_stp[n])}
    assert {"layers.0.weight", "layers.1.weight"} <= changed
    assert not any(n.startswith(("layers.2", "layers.3", "output_layer")) for n in changed)


def test_lambda_zero_leaves_every_gradient_bit_identical() -> None:
    torch.manual_seed(1)
    model, x = Stack(), torch.randn(12, 3, 16)
    plain = run(model, x, None)
    off = run(model, x, STP(STPConfig(layers=(2, 3), lam=0.0)))
    assert all(torch.equal(plain[n], off[n]) for n in plain)
    before_start = run(model, x, STP(STPConfig(layers=(2, 3), lam=1.0, start=100)))
    assert all(torch.equal(plain[n], before_start[n]) for n in plain)


def test_the_added_gradient_is_lambda_times_the_gradient_of_the_loss_on_an_earlier_stage() -> None:
    # A pipeline stage without the output layer: backward starts from the gradient it receives.
    torch.manual_seed(2)
    stage, x = Stack(depth=2, head=False), torch.randn(10, 2, 16)
    doc_ids = torch.tensor([[0] * 6 + [1] * 4, [5] * 10])
    received = torch.randn(10, 2, 16)
    config = STPConfig(layers=(2,), lam=0.3, samples=40, seed=3)

    stp = STP(config)
    handle = stp.register(stage)
    stp.set_documents(doc_ids)
    stp.set_step(4)
    stage(x).backward(received)
    handle.remove()
    got = grads(stage)

    stage.zero_grad()
    h = stage(x)
    replay = STP(config)  # same seed and step: draws the samples the hook drew
    replay.set_documents(doc_ids)
    replay.set_step(4)
    loss = stp_loss(h, *replay.draw(2, batch=2, seq=10))
    (h * received).sum().add(0.3 * loss).backward()
    want = grads(stage)
    for n in got:
        assert torch.allclose(got[n], want[n], atol=1e-6), n


def test_loss_is_one_minus_cosine_of_consecutive_displacements() -> None:
    h = torch.randn(8, 2, 5)
    row, s, r, t = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([3, 4]), torch.tensor([7, 5])
    want = torch.stack(
        [
            1
            - F.cosine_similarity(h[r[i], row[i]] - h[s[i], row[i]], h[t[i], row[i]] - h[r[i], row[i]], dim=0)
            for i in range(2)
        ]
    ).mean()
    assert torch.allclose(stp_loss(h, row, s, r, t), want)
    straight = torch.arange(8.0)[:, None, None] * torch.ones(8, 2, 5)  # a straight line
    assert float(stp_loss(straight, row, s, r, t)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("form", ["straight", "span"])
def test_samples_stay_inside_one_document(form: str) -> None:
    doc_ids = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2], [7] * 12])
    row, s, r, t = sample_triples(doc_ids, 500, form, torch.Generator().manual_seed(0))
    assert len(row) > 300  # documents of length 2 cannot hold a triple and are skipped
    assert ((s < r) & (r < t)).all()
    assert (doc_ids[row, s] == doc_ids[row, t]).all()
    if form == "span":
        last = torch.tensor([[3, 3, 3, 3, 5, 5, 11, 11, 11, 11, 11, 11], [11] * 12])
        assert (t == last[row, s]).all()


def test_lambda_schedule_and_config_errors() -> None:
    cfg = STPConfig(layers=(1,), lam=0.1, start=10, warmup=4)
    assert [lambda_at(cfg, s) for s in (9, 10, 11, 13, 50)] == pytest.approx([0, 0.025, 0.05, 0.1, 0.1])
    with pytest.raises(ValueError, match="1-based"):
        STPConfig(layers=(0,))
    with pytest.raises(ValueError, match="form"):
        STPConfig(layers=(1,), form="tube")  # type: ignore[arg-type]


def test_document_ids_must_match_the_hidden_states() -> None:
    stp = STP(STPConfig(layers=(1,), lam=1.0))
    stp.set_documents(torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="document ids"):
        stp(1, "A", torch.randn(8, 3, 4, requires_grad=True))


def test_a_sequence_shard_samples_its_own_slice_of_the_document_ids() -> None:
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])  # two ranks see positions 0..5 and 6..11
    stp = STP(STPConfig(layers=(1,), lam=1.0, samples=200))
    stp.set_documents(doc_ids)
    rows, draws = {}, {}
    for rank in (0, 1):
        stp.set_step(4)
        row, s, r, t = stp.draw(1, batch=2, seq=6, shard=(rank, 2))
        assert ((s < r) & (r < t) & (t < 6)).all()
        mine = doc_ids[:, 6 * rank : 6 * rank + 6]
        assert (mine[row, s] == mine[row, t]).all()
        rows[rank], draws[rank] = row, (s, r, t)
    assert not torch.equal(draws[0][0], draws[1][0])  # each slice draws its own samples
    with pytest.raises(ValueError, match="sequence_group"):
        stp.draw(1, batch=2, seq=6)  # ids of 12 positions, hidden states of 6, no group given
