from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nam_trainer.data import pack, write_rows
from nam_trainer.data.dataset import PackedSplit

EOS, PAD = 0, 1


def test_two_documents_by_hand() -> None:
    rows = pack([np.array([5, 6, 7]), np.array([8, 9])], seq_length=4, eos_id=EOS, pad_id=PAD)
    # stream 5 6 7 E 8 9 E, rows of 5 with stride 4 (one shared token), padded
    assert rows.tokens.tolist() == [[5, 6, 7, EOS, 8], [8, 9, EOS, PAD, PAD]]
    assert rows.document_ids.tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, -1, -1]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 0]]
    assert rows.loss_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert rows.structure is None


def test_structure_is_carried_with_zero_for_eos_and_pad() -> None:
    s0 = np.array([[1, 2], [3, 4]], dtype=np.uint16)
    s1 = np.array([[5], [6]], dtype=np.uint16)
    rows = pack([np.array([5, 6]), np.array([7])], 3, EOS, PAD, structure=[s0, s1])
    assert rows.structure is not None and rows.structure.shape == (2, 2, 4)
    assert rows.structure[0].tolist() == [[1, 2, 0, 5], [3, 4, 0, 6]]
    assert rows.structure[1].tolist() == [[5, 0, 0, 0], [6, 0, 0, 0]]
    with pytest.raises(ValueError, match="structure of shape \\(2, 1\\) for a document of 2 tokens"):
        pack([np.array([5, 6])], 3, EOS, PAD, structure=[s1])


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    seq_length=st.integers(1, 17),
)
def test_every_token_after_the_first_is_a_label_exactly_once(lengths: list[int], seq_length: int) -> None:
    rng = np.random.default_rng(len(lengths) * 100 + seq_length)
    docs = [rng.integers(2, 50, size=n) for n in lengths]
    rows = pack(docs, seq_length, EOS, PAD)
    stream = np.concatenate([np.append(d, EOS) for d in docs])
    labels = rows.tokens[:, 1:][rows.loss_mask[:, 1:] == 1]
    assert labels.tolist() == stream[1:].tolist()
    assert rows.tokens.shape[1] == seq_length + 1
    assert (rows.tokens[1:, 0] == rows.tokens[:-1, -1]).all()  # consecutive rows share one token
    doc_of_label = rows.document_ids[:, 1:][rows.loss_mask[:, 1:] == 1]
    assert doc_of_label.tolist() == np.repeat(np.arange(len(docs)), np.array(lengths) + 1)[1:].tolist()


def test_rows_round_trip_through_megatron_indexed_datasets(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 60000, size=n) for n in (30, 1, 77)]
    structure = [rng.integers(0, 300, size=(5, len(d))).astype(np.uint16) for d in docs]
    rows = pack(docs, 16, EOS, PAD, structure, tokens_dtype=np.uint16)
    written = write_rows(rows, tmp_path / "train")
    assert written == ["tokens", "document_ids", "position_ids", "loss_mask", "structure"]
    split = PackedSplit(tmp_path / "train", 16, ("a", "b", "c", "d", "e"))
    assert len(split) == rows.num_rows
    for i in range(len(split)):
        sample = split[i]
        assert sample["tokens"].tolist() == rows.tokens[i, :-1].tolist()
        assert sample["labels"].tolist() == rows.tokens[i, 1:].tolist()
        assert sample["loss_mask"].tolist() == rows.loss_mask[i, 1:].tolist()
        assert sample["document_ids"].tolist() == rows.document_ids[i, :-1].tolist()
        assert sample["position_ids"].tolist() == rows.position_ids[i, :-1].tolist()
        assert sample["structure"]["c"].tolist() == rows.structure[i, 2, :-1].tolist()
    with pytest.raises(IndexError):
        split[len(split)]
    with pytest.raises(ValueError, match="rows are not 33 long"):
        PackedSplit(tmp_path / "train", 32, ("a", "b", "c", "d", "e"))
