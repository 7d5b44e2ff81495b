"""Document boundaries: a packed micro-batch of 2 rows, each holding several documents (the first
row starting mid-document, the second with a pad tail), gives for every letter, token for token,
the losses and input gradients of each document run alone (each pad token alone too) — in one
process, and at TP=2 with sequence parallelism over two gloo ranks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import tiny

from nam_layout import Layout
from nam_runtime import dist
from nam_runtime.testing import run_ranks
from nam_spec.config import ParallelConfig
from nam_spec.documents import document_boundaries, has_boundaries, segment_ids

SEQ = 16
TP_LAYOUT = Layout.tile("AEMR-L", 6)  # one layer of every letter
# row 1 starts with the document row 0 ends with: a row start is a boundary all the same
DOCS = torch.tensor([[3] * 5 + [4] * 7 + [5] * 4, [5] * 6 + [6] * 6 + [-1] * 4])
# (row, start, end) of every segment, each pad token its own
SEGMENTS = [
    (0, 0, 5),
    (0, 5, 12),
    (0, 12, 16),
    (1, 0, 6),
    (1, 6, 12),
    *((1, t, t + 1) for t in range(12, 16)),
]


def _config():
    config = tiny(seq_length=SEQ)
    # the load-balancing loss couples every token of the micro-batch in backward (by design: the
    # router sees the same tokens as without boundaries), so it is off to compare with documents alone
    return config.replace(moe=dataclasses.replace(config.moe, load_balancing="none", aux_loss_coeff=0.0))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(11))
    pos = torch.zeros_like(ids)  # the position within each document, as the packer writes them
    for row, a, b in SEGMENTS:
        pos[row, a:b] = torch.arange(b - a)
    return ids, pos


def test_boundaries_of_a_micro_batch() -> None:
    params = document_boundaries(DOCS)
    assert params.cu_seqlens_q.tolist() == [0, 5, 12, 16, 22, 28, 29, 30, 31, 32]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.cu_seqlens_kv is params.cu_seqlens_q
    assert params.max_seqlen_q == params.max_seqlen_kv == SEQ and params.qkv_format is None
    seg = segment_ids(params, 2, SEQ, torch.device("cpu"))
    assert seg.dtype == torch.int32 and seg.shape == (2, SEQ)
    for i, (row, a, b) in enumerate(SEGMENTS):
        assert (seg[row, a:b] == i).all()
    with pytest.raises(ValueError, match=r"document_ids must be an integer tensor \[batch, seq\]"):
        document_boundaries(DOCS[0])
    with pytest.raises(ValueError, match="covers 32 tokens but the micro-batch has 1 x 16 = 16"):
        segment_ids(params, 1, SEQ, torch.device("cpu"))


def test_segment_ids_made_once_per_micro_batch() -> None:
    """Every M and R layer asks for the same ids: the first call makes them, the others get that
    tensor; boundaries set anew (another cu_seqlens_q) or another shape get their own."""
    params = document_boundaries(DOCS)
    cpu = torch.device("cpu")
    seg = segment_ids(params, 2, SEQ, cpu)
    assert segment_ids(params, 2, SEQ, cpu) is seg
    assert segment_ids(dataclasses.replace(params), 2, SEQ, cpu) is not seg  # a new micro-batch's
    params.cu_seqlens_q = torch.tensor([0, 16, 32], dtype=torch.int32)
    assert segment_ids(params, 2, SEQ, cpu).tolist() == [[0] * SEQ, [1] * SEQ]
    assert segment_ids(params, 4, SEQ // 2, cpu).shape == (4, SEQ // 2)


def test_has_boundaries() -> None:
    assert has_boundaries(DOCS)
    one_each = torch.tensor([[3, 3, 3, 3], [7, 7, 7, 7]])
    assert not has_boundaries(one_each)  # each row one piece of one document: plain causal is exact
    assert has_boundaries(torch.tensor([[3, 3, 4, 4], [7, 7, 7, 7]]))  # a start inside a row
    assert has_boundaries(torch.tensor([[3, 3, 3, 3], [7, 7, -1, -1]]))  # pad tokens


def _losses_and_input_grads(
    model: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor, docs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses [b, s] and the gradient of their sum at the embedding output [s_local, b, h]."""
    seen: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: object, out: torch.Tensor) -> None:
        out.retain_grad()
        seen.append(out)

    handle = model.embedding.register_forward_hook(keep)
    model.zero_grad(set_to_none=True)
    params = None if docs is None else document_boundaries(docs)
    losses = model(ids, pos, labels=ids, packed_seq_params=params)
    losses.sum().backward()
    handle.remove()
    return losses.detach(), seen[0].grad


def _alone(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every segment run as a micro-batch of its own, laid back at its place: losses [b, s], grads [s, b, h]."""
    losses = torch.zeros(ids.shape)
    grads = torch.zeros(ids.shape[1], ids.shape[0], model.config.hidden_size)
    for row, a, b in SEGMENTS:
        seg_ids = ids[row : row + 1, a:b]
        loss, grad = _losses_and_input_grads(model, seg_ids, torch.arange(b - a)[None], None)
        losses[row, a:b], grads[a:b, row] = loss[0], grad[:, 0]
    return losses, grads


def _assert_documents_alone(
    packed: tuple[torch.Tensor, torch.Tensor], alone: tuple[torch.Tensor, torch.Tensor]
) -> None:
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-5, atol=1e-5, msg="per-token losses")
    torch.testing.assert_close(packed[1], alone[1], rtol=1e-4, atol=1e-6, msg="input gradients")


@pytest.mark.parametrize("letter", ["A", "E", "M", "R", "-", "L"])
def test_packed_micro_batch_equals_documents_alone(letter: str, megatron_single_rank: None) -> None:
    from nam_spec.model import build_model

    torch.manual_seed(0)
    model = build_model(Layout.tile(letter, 2), _config())
    ids, pos = _batch()
    packed = _losses_and_input_grads(model, ids, pos, DOCS)
    alone = _alone(model, ids)
    _assert_documents_alone(packed, alone)
    if letter in "AMRL":  # the mixing letters: without boundaries the documents do leak
        leaky = _losses_and_input_grads(model, ids, pos, None)
        assert not torch.allclose(leaky[0], alone[0], rtol=1e-5, atol=1e-5)


def test_te_backend_refuses_boundaries_in_one_line(megatron_single_rank: None) -> None:
    from types import SimpleNamespace

    from nam_spec.model import NamModel

    fake = SimpleNamespace(backend=SimpleNamespace(name="te"))  # TE cannot be installed here
    with pytest.raises(ValueError, match=r"need model\.backend = 'local'; the 'te' backend's attention"):
        NamModel.forward(fake, None, None, packed_seq_params=document_boundaries(DOCS))


def _tp2_rank(tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from nam_spec.model import build_model

    dist.initialize(tensor_parallel=2, seed=1)
    model = build_model(TP_LAYOUT, _config(), ParallelConfig(tensor=2, sequence_parallel=True))
    ids, pos = _batch()
    out = _losses_and_input_grads(model, ids, pos, DOCS)
    (tmp / "ckpt").mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp / "ckpt"))
    return out


def _tp1_alone_rank(tmp: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron.core import dist_checkpointing

    from nam_spec.model import build_model

    dist.initialize(seed=99)  # other initial weights: everything must come from the checkpoint
    model = build_model(TP_LAYOUT, _config())
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(tmp / "ckpt")))
    return _alone(model, _batch()[0])


def test_tp2_sequence_parallel_packed_micro_batch_equals_documents_alone(tmp_path: Path) -> None:
    """Every letter at TP=2 with sequence parallelism (each rank holds half the sequence, so documents
    cross the shard boundary) against each document alone at TP=1 on the same weights."""
    tp2 = run_ranks(_tp2_rank, 2, tmp_path)
    (alone,) = run_ranks(_tp1_alone_rank, 1, tmp_path)
    torch.testing.assert_close(tp2[0][0], tp2[1][0], rtol=0, atol=0)
    input_grads = torch.cat([tp2[0][1], tp2[1][1]], dim=0)  # each rank's sequence half
    _assert_documents_alone((tp2[0][0], input_grads), alone)
