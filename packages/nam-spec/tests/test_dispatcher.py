"""model.moe.dispatcher = "local": the same numbers as megatron's all-to-all dispatcher, without an op
that reads a device value back to the host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import pytest
import torch
from helpers import tiny
from torch.utils._python_dispatch import TorchDispatchMode

from nam_layout import Layout
from nam_spec.config import ModelConfig
from nam_spec.model import build_model

if TYPE_CHECKING:
    from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

# ops whose output size or value the host must read from the device: each one is a sync on CUDA
HOST_READS = {"nonzero", "masked_select", "_local_scalar_dense", "item"}
# ops that add rows into a tensor by index: atomics on CUDA (slow in bf16, order-dependent sums)
ROW_ADDS = frozenset({"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_"})


def _config(dispatcher: str) -> ModelConfig:
    config = tiny()
    return config.replace(moe=replace(config.moe, dispatcher=dispatcher))


def _e_layer(dispatcher: str) -> torch.nn.Module:
    from megatron.core.transformer.spec_utils import build_module

    from nam_spec.backends import local_backend
    from nam_spec.letters import LETTERS
    from nam_spec.transformer_config import transformer_config

    config = _config(dispatcher)
    tc = transformer_config(config, Layout.tile("E", 1), letter="E")
    torch.manual_seed(0)
    return build_module(LETTERS["E"].spec(local_backend(), config), config=tc, layer_number=1)


@contextmanager
def _own_tracker() -> Iterator[MoEMetricsTracker]:
    """A metrics tracker of the test's own: megatron's global one is sized by the first model that
    records into it, and the other tests' models are 52 layers deep."""
    from megatron.core.transformer.moe import moe_logging

    previous, tracker = moe_logging.get_moe_metrics_tracker(), moe_logging.MoEMetricsTracker()
    moe_logging.set_moe_metrics_tracker(tracker)
    try:
        yield tracker
    finally:
        moe_logging.set_moe_metrics_tracker(previous)


def _run(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Output, input gradient, parameter gradients and the recorded load-balancing loss."""
    x = torch.randn(8, 3, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with _own_tracker() as tracker:
        out = layer(x)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads, tracker.metrics["load_balancing_loss"].values


def test_local_dispatcher_matches_megatrons_alltoall(megatron_single_rank: None) -> None:
    from nam_spec.local.dispatcher import LocalTokenDispatcher

    reference, local = _e_layer("alltoall"), _e_layer("local")
    local.load_state_dict(reference.state_dict())
    assert isinstance(local.mlp.token_dispatcher, LocalTokenDispatcher)
    assert local.mlp.shared_experts is not None
    out_a, dx_a, grads_a, aux_a = _run(reference)
    out_b, dx_b, grads_b, aux_b = _run(local)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_b, dx_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert grad is not None, name
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert aux_a.abs().sum() > 0
    torch.testing.assert_close(aux_b, aux_a, rtol=1e-5, atol=0.0)


def test_local_experts_on_their_triton_kernels_match_the_reference(
    megatron_single_rank: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local E layer with nam-mixers' weighted-SwiGLU and pair-sum kernels (the CUDA path, here
    under the Triton interpreter) against the same layer on their PyTorch references."""
    from nam_mixers.ops import moe

    layer = _e_layer("local")
    reference = _run(layer)
    layer.zero_grad(set_to_none=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are first compiled
    kernels = {"weighted_swiglu": partial(moe.weighted_swiglu, path="triton")}
    monkeypatch.setattr("nam_spec.local.experts.weighted_swiglu", kernels["weighted_swiglu"])
    monkeypatch.setattr("nam_spec.local.dispatcher.sum_pairs", partial(moe.sum_pairs, path="triton"))
    ours = _run(layer)
    for name, a, b in zip(("output", "input grad"), ours[:2], reference[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for name, grad in reference[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops_of_a_step(layer: torch.nn.Module) -> set[str]:
    x = torch.randn(8, 3, 32, requires_grad=True)
    with _own_tracker(), _AtenOps() as ops:
        layer(x)[0].sum().backward()
    return ops.names


def test_local_dispatcher_never_reads_device_values(megatron_single_rank: None) -> None:
    # the recorder sees the count megatron's allgather dispatcher reads back (tokens_per_expert.sum().item())
    assert "_local_scalar_dense" in _ops_of_a_step(_e_layer("allgather"))
    ops = _ops_of_a_step(_e_layer("local"))
    assert "silu_backward" in ops  # the backward was recorded too
    assert ops & HOST_READS == set()


class _RowAdds(TorchDispatchMode):
    """ROW_ADDS on 2-d tensors of rows ``width`` wide (the hidden states, not the router's scores)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ROW_ADDS and args[0].dim() == 2 and args[0].shape[-1] == self.width:
            self.found.add(name)
        return func(*args, **(kwargs or {}))


def test_local_dispatcher_moves_hidden_rows_by_gathers_only(megatron_single_rank: None) -> None:
    hidden = _config("local").hidden_size
    for dispatcher, expected in (("alltoall", True), ("local", False)):
        x = torch.randn(8, 3, hidden, requires_grad=True)
        layer = _e_layer(dispatcher)
        with _own_tracker(), _RowAdds(hidden) as adds:
            layer(x)[0].sum().backward()
        assert bool(adds.found) == expected, (dispatcher, adds.found)


def test_a_tiny_model_trains_the_same_with_either_dispatcher(megatron_single_rank: None) -> None:
    from nam_spec.local.dispatcher import LocalTokenDispatcher

    layout = Layout.tile("AEMEAEMEAEMR", 12)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8).expand(2, 8)
    reference = build_model(layout, _config("alltoall"))
    local = build_model(layout, _config("local"))
    local.load_state_dict(reference.state_dict())
    e_layers = [layer for kind, layer in zip(layout.kinds, local.decoder.layers, strict=True) if kind == "E"]
    assert [type(layer.mlp.token_dispatcher) for layer in e_layers] == [LocalTokenDispatcher] * layout.counts[
        "E"
    ]
    results = []
    for model in (reference, local):
        with _own_tracker():
            loss = model(ids, pos, labels=ids).mean()
            loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0.0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)
