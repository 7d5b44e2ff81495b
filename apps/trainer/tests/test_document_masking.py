"""The trainer feeds each micro-batch's document boundaries to the model: through the step's own
forward, a micro-batch of two packed rows of the real data cache gives, token for token, the
losses of each document run alone; with data.document_masking = false it gives the loss of the
model called without boundaries, as before."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import slice_config

from nam_trainer.data import PreparedData
from nam_trainer.train.batches import collate
from nam_trainer.train.step import _forward_step


@pytest.fixture(scope="module")
def one_rank() -> Iterator[None]:
    from nam_runtime import dist

    dist.initialize(seed=3)
    yield
    dist.teardown()


def _rows(prepared: PreparedData) -> list[tuple[int, int]]:
    """A row with a document boundary inside and the split's last row (the pad tail), of source 0."""
    split = prepared.sources[0].train
    inside = next(i for i in range(len(split)) if split[i]["document_ids"].unique().numel() > 1)
    last = len(split) - 1
    assert (split[last]["document_ids"] < 0).any() and inside != last
    return [(0, inside), (0, last)]


def _segments(document_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each document piece of each row, every pad token alone."""
    out = []
    for row, ids in enumerate(document_ids.tolist()):
        start = 0
        for t in range(1, len(ids) + 1):
            if t == len(ids) or ids[t] != ids[t - 1] or ids[t] < 0:
                out.append((row, start, t))
                start = t
    return out


def _step_losses(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Per-token losses of the micro-batch through the training step's forward."""
    with torch.no_grad():
        losses, _ = _forward_step(torch.ones(1), 0, lambda _b: None, iter([batch]), model)
    return losses


def test_step_passes_document_boundaries_and_masking_off_is_the_old_forward(
    prepared: PreparedData, header_slice: list[Path], tmp_path: Path, one_rank: None
) -> None:
    from nam_layout import Layout
    from nam_spec import build_model

    config = slice_config(tmp_path, header_slice).model  # the model of the prepared cache
    torch.manual_seed(0)
    model = build_model(Layout.tile("AEMR-", 5), config)
    rows, cpu = _rows(prepared), torch.device("cpu")

    masked = collate([prepared.sources[0].train], rows, cpu, structure=True, document_masking=True)
    assert "packed_seq_params" in masked
    losses = _step_losses(model, masked)
    segments = _segments(masked["document_ids"])
    assert any(b - a > 1 and a > 0 for _, a, b in segments)  # a document starts inside a row
    with torch.no_grad():
        for row, a, b in segments:
            alone = model(
                masked["input_ids"][row : row + 1, a:b],
                masked["position_ids"][row : row + 1, a:b],
                labels=masked["labels"][row : row + 1, a:b],
                structure={k: v[row : row + 1, a:b] for k, v in masked["structure"].items()},
            )
            torch.testing.assert_close(losses[row : row + 1, a:b], alone, rtol=1e-5, atol=1e-5)

    plain = collate([prepared.sources[0].train], rows, cpu, structure=True, document_masking=False)
    assert "packed_seq_params" not in plain
    old = _step_losses(model, plain)
    with torch.no_grad():
        called = model(
            plain["input_ids"], plain["position_ids"], labels=plain["labels"], structure=plain["structure"]
        )
    assert torch.equal(old, called)
    assert not torch.allclose(old, losses, rtol=1e-5, atol=1e-5)  # the boundaries change the loss
