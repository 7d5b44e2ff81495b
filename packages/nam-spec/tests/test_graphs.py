"""CUDA graphs per layer (nam_spec.graphs): what a capture needs holds on CPU, the capture itself
runs on the GPU machine (bench/trainer.py's `cuda_graphs` lever: ten steps' losses against eager).

A graphed M or R layer reads the micro-batch's boundaries as a static [b, s] segment-id input
(``PackedSeqParams.seq_idx``), all zeros when the micro-batch has none; both must give the layer
exactly what the boundaries themselves give."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import tiny
from megatron.core.packed_seq_params import PackedSeqParams

from nam_layout import Layout
from nam_spec.config import ParallelConfig, SpecConfigError
from nam_spec.documents import document_boundaries, segment_ids
from nam_spec.graphs import WARMUP_CALLS, GraphPool, LayerGraph, _into_main_grad, layer_graphs
from nam_spec.letters import LETTERS
from nam_spec.model import build_model
from nam_spec.moe_metrics import MoECounter
from nam_spec.validation import environment_problems, problems

SEQ = 16
DOCS = torch.tensor([[3] * 5 + [4] * 7 + [5] * 4, [5] * 6 + [6] * 6 + [-1] * 4])


def _layer_output_and_input_grad(
    layer: torch.nn.Module, hidden: torch.Tensor, packed: PackedSeqParams | None
) -> tuple[torch.Tensor, torch.Tensor]:
    x = hidden.clone().requires_grad_(True)
    out = layer(x, packed_seq_params=packed)
    out = out[0] if isinstance(out, tuple) else out
    out.square().sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("letter", ["M", "R"])
def test_segment_ids_as_static_input_equal_the_boundaries(letter: str, megatron_single_rank: None) -> None:
    torch.manual_seed(0)
    layer = build_model(Layout.tile(letter, 1), tiny(seq_length=SEQ)).decoder.layers[0]
    hidden = torch.randn(SEQ, 2, 32)
    boundaries = document_boundaries(DOCS)
    static = PackedSeqParams(seq_idx=segment_ids(boundaries, 2, SEQ, hidden.device).clone())
    for got, want in zip(
        _layer_output_and_input_grad(layer, hidden, static),
        _layer_output_and_input_grad(layer, hidden, boundaries),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    no_boundaries = PackedSeqParams(seq_idx=torch.zeros(2, SEQ, dtype=torch.int32))
    for got, want in zip(
        _layer_output_and_input_grad(layer, hidden, no_boundaries),
        _layer_output_and_input_grad(layer, hidden, None),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"seq_idx must be \[batch, seq\] = \[2, 16\], got \(1, 32\)"):
        layer(hidden, packed_seq_params=PackedSeqParams(seq_idx=torch.zeros(1, 2 * SEQ, dtype=torch.int32)))


@pytest.mark.parametrize("letter", ["M", "R", "E"])
def test_warm_up_calls_run_the_captures_inputs_and_equal_eager(
    letter: str, megatron_single_rank: None
) -> None:
    """Before its capture a LayerGraph runs the layer itself, with segment ids as the capture will
    read them (so the kernels a capture records are the ones its warm-up autotuned); the results
    are eager's, with boundaries and without."""
    torch.manual_seed(0)
    layer = build_model(Layout.tile(letter, 1), tiny(seq_length=SEQ)).decoder.layers[0]
    hidden = torch.randn(SEQ, 2, 32)
    graph = LayerGraph(layer, segments=LETTERS[letter].reads_segments, pool=GraphPool())

    def not_eager() -> torch.Tensor:
        raise AssertionError("a warm-up call must run the capture's path")

    for packed in (document_boundaries(DOCS), None):
        want = layer(hidden, packed_seq_params=packed)
        want = want[0] if isinstance(want, tuple) else want
        torch.testing.assert_close(graph(hidden, packed, not_eager), want, rtol=1e-6, atol=1e-6)
    assert graph.eager_calls == WARMUP_CALLS and graph.shape is None


def test_layers_capture_into_one_pool_in_the_order_they_replay(
    monkeypatch: pytest.MonkeyPatch, megatron_single_rank: None
) -> None:
    """All graphed layers of a model capture into one pool, in the order their graphs replay: the
    forwards in layer order during one micro-batch, the backwards in reverse as that micro-batch's
    backward reaches them, and nothing after. CUDA is faked: a capture runs its code eagerly and
    records its graph and pool, a replay does nothing; so the capturing micro-batch computes what
    eager does, which its gradients must equal."""
    captures: list[tuple[object, object]] = []  # (graph, pool) per capture, in order

    class FakeGraph:
        def replay(self) -> None:
            pass

    @contextmanager
    def capture(graph: FakeGraph, pool: object, stream: object) -> Iterator[None]:
        captures.append((graph, pool))
        yield

    pools = itertools.count()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(pools))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "training stream")
    monkeypatch.setattr(torch.cuda, "default_stream", lambda: "default stream")

    torch.manual_seed(0)
    config = tiny(seq_length=SEQ, moe=dataclasses.replace(tiny().moe, dispatcher="local"))
    model = build_model(Layout.tile("MRAE", 4), config)  # A stays eager between the graphed layers
    graphs = layer_graphs(model.decoder.kinds, model.decoder.layers, "MRE")
    ids = torch.randint(0, 64, (2, SEQ))
    pos = torch.arange(SEQ).expand(2, SEQ)

    def micro_batch() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(ids, pos, packed_seq_params=document_boundaries(DOCS)).float().square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model.decoder.graphs = {}
    eager = micro_batch()
    model.decoder.graphs = graphs
    for _ in range(WARMUP_CALLS):
        micro_batch()
    assert captures == []
    graphed = micro_batch()
    names = {id(g.forward_graph): f"F{i}" for i, g in graphs.items()}
    names |= {id(g.backward_graph): f"B{i}" for i, g in graphs.items()}
    assert [names[id(graph)] for graph, _ in captures] == ["F0", "F1", "F3", "B3", "B1", "B0"]
    assert len({pool for _, pool in captures}) == 1
    assert graphed.keys() == eager.keys()
    errors = {n: float((graphed[n] - g).abs().max()) for n, g in eager.items()}
    assert max(errors.values()) < 1e-6, errors
    micro_batch()
    assert len(captures) == 6


def test_settings_a_capture_cannot_serve_are_refused() -> None:
    config = tiny(cuda_graphs="MREA")
    layout = Layout.tile("AEMR", 4)
    found = problems(config.replace(recompute={"M": "full"}), layout, ParallelConfig(pipeline=2))
    assert any("['A'] cannot be captured; accepted letters: 'EMR'" in p for p in found), found
    assert any(
        "a CUDA graph of E needs model.moe.dispatcher = 'local' (got 'allgather'" in p for p in found
    ), found
    assert any("needs parallel.pipeline = 1 and parallel.tensor = 1 (got 2 and 1)" in p for p in found), found
    assert any("letter(s) ['M'] have model.recompute 'full'" in p for p in found), found
    local = tiny(cuda_graphs="MRE", moe=dataclasses.replace(tiny().moe, dispatcher="local"))
    assert problems(local, layout) == []
    assert problems(tiny(cuda_graphs=["M"]), layout) == [  # type: ignore[arg-type]
        "model.cuda_graphs ['M'] must be a string of letters from 'EMR'"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_graphs_without_cuda_are_refused_in_one_line(megatron_single_rank: None) -> None:
    with pytest.raises(
        SpecConfigError, match=r"model.cuda_graphs = 'MR' needs a CUDA device; set it to '' here"
    ):
        build_model(Layout.tile("MR", 2), tiny(cuda_graphs="MR"))


def test_weights_under_ddp_take_their_gradient_into_main_grad_inside_the_graph() -> None:
    """What a backward capture records and returns per weight: under DDP (``main_grad``) the
    gradient is added to main_grad (unless megatron's fused accumulation did) and none leaves the
    graph; without DDP the gradient is returned."""
    plain, ddp, fused, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(4))
    for p in (ddp, fused, unused):
        p.main_grad = torch.ones(3)
        p.grad_added_to_main_grad = False
    fused.grad_added_to_main_grad = True  # its main_grad took the gradient in the GEMM already
    grads = [torch.full((3,), 2.0), torch.full((3,), 3.0), torch.full((3,), float("nan")), None]
    returned = _into_main_grad([plain, ddp, fused, unused], grads)
    assert returned[0] is grads[0] and returned[1:] == [None, None, None]
    torch.testing.assert_close(ddp.main_grad, torch.full((3,), 4.0))
    torch.testing.assert_close(fused.main_grad, torch.ones(3))  # its placeholder is never read
    torch.testing.assert_close(unused.main_grad, torch.ones(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without CUDA lacks")
def test_environment_problems_say_what_this_machine_lacks() -> None:
    assert environment_problems(tiny()) == []
    assert environment_problems(tiny(cuda_graphs="MR")) == [
        "model.cuda_graphs = 'MR' needs a CUDA device; set it to '' here"
    ]
    # the configuration alone is fine: a GPU run can be planned here
    assert problems(tiny(cuda_graphs="MR"), Layout.tile("MR", 2)) == []
    (te,) = environment_problems(tiny(backend="te"))
    assert te.startswith("model.backend = 'te': Transformer Engine is not usable here (") and te.endswith(
        "; use 'local'"
    )


def test_moe_counter_adds_into_the_same_tensors(megatron_single_rank: None) -> None:
    """A graphed E layer replays the counter's add into the tensor it captured: the counter must
    keep adding into that tensor, and its reset must zero it in place."""
    config = tiny(seq_length=SEQ)
    model = build_model(Layout.tile("E", 2), config)
    counter = MoECounter([model], config, depth=2)
    ids = torch.randint(0, 64, (2, SEQ))
    pos = torch.arange(SEQ).expand(2, SEQ)
    model(ids, pos)
    kept = dict(counter._counts)
    first = counter.collect(reset=True)
    model(ids, pos)
    assert all(counter._counts[n] is t for n, t in kept.items())
    second = counter.collect(reset=True)
    assert torch.equal(first.tokens, second.tokens) and first.tokens.sum() == 2 * 2 * SEQ * config.moe.top_k
    assert all(int(t.sum()) == 0 for t in kept.values())
    counter.remove()
