"""``nam-train eval``: loss, perplexity and bits per byte of a checkpoint on a prepared split.

Rows come from ``prepare_data`` (the same cache as training, with the checkpoint's tokenizer), are
dealt round-robin to the data-parallel ranks and scored by the model's own loss; sums of nats,
tokens and bytes are kept per document and all-reduced. A document's tokens are the labels
predicted from it (its EOS included; EOS and pad stand for 0 bytes). Bits per byte = nats /
(ln 2 x UTF-8 bytes of the scored tokens): it does not depend on the tokenizer, so runs with
different vocabularies compare. Documents group into sources by ``source_of`` (today the corpus
is one source).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

from nam_trainer.data.dataset import PackedSplit
from nam_trainer.train.batches import collate
from nam_trainer.use.loader import Loaded
from nam_trainer.use.token_bytes import token_bytes


@dataclass(frozen=True)
class Score:
    nats: float
    tokens: int
    bytes: int

    @property
    def loss(self) -> float:
        return self.nats / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * max(self.bytes, 1))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
            "bytes": self.bytes,
        }


def score_rows(loaded: Loaded, split: PackedSplit, rows: list[int], num_documents: int) -> np.ndarray:
    """[num_documents, 3] float64 (nats, tokens, bytes) over ``rows`` of ``split``, summed over the
    data-parallel ranks (each scores its share of the rows)."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    device, micro = loaded.device, loaded.config.training.micro_batch_size
    masking = loaded.config.data.document_masking  # score the rows as the model was trained on them
    nbytes = torch.from_numpy(token_bytes(loaded.tokenizer)).to(device)
    sums = torch.zeros(num_documents, 3, dtype=torch.float64, device=device)
    mine = rows[rank::dp]
    with torch.no_grad():
        for i in range(0, len(mine), micro):
            rows_here = [(0, r) for r in mine[i : i + micro]]
            batch = collate([split], rows_here, device, bool(split.channels), masking)
            mask, docs = batch.pop("loss_mask"), batch.pop("document_ids")
            nats = loaded.model(**batch).double() * mask
            scored = mask > 0
            d = docs[scored]
            sums[:, 0].index_add_(0, d, nats[scored])
            sums[:, 1].index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
            sums[:, 2].index_add_(0, d, nbytes[batch["labels"][scored]].double())
    torch_dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return sums.cpu().numpy()


def report(
    sums: np.ndarray, names: list[str], source_of: Callable[[str], str], extremes: int = 3
) -> dict[str, Any]:
    """Overall, per source, and the ``extremes`` worst and best documents by bits per byte."""

    def score(part: np.ndarray) -> Score:
        return Score(float(part[:, 0].sum()), int(part[:, 1].sum()), int(part[:, 2].sum()))

    scored = [i for i in range(len(names)) if sums[i, 1] > 0]
    by_doc = sorted(scored, key=lambda i: score(sums[i : i + 1]).bits_per_byte)
    sources: dict[str, list[int]] = {}
    for i in scored:
        sources.setdefault(source_of(names[i]), []).append(i)
    doc = lambda i: {"document": names[i], **score(sums[i : i + 1]).as_dict()}  # noqa: E731
    return {
        "overall": score(sums[scored]).as_dict(),
        "sources": {s: score(sums[ix]).as_dict() for s, ix in sources.items()},
        "worst": [doc(i) for i in reversed(by_doc[-extremes:])],
        "best": [doc(i) for i in by_doc[:extremes]],
        "documents": len(scored),
    }


def format_report(result: dict[str, Any]) -> str:
    def line(name: str, s: dict[str, Any]) -> str:
        return (
            f"{name}: loss {s['loss']:.4f} | perplexity {s['perplexity']:.2f} | "
            f"{s['bits_per_byte']:.4f} bits/byte | {s['tokens']:,} tokens, {s['bytes']:,} bytes"
        )

    out = [line(f"{result['split']} ({result['documents']} documents)", result["overall"])]
    out += [line(f"  source {name}", s) for name, s in result["sources"].items()]
    out += [line(f"  worst {d['document']}", d) for d in result["worst"]]
    out += [line(f"  best  {d['document']}", d) for d in result["best"]]
    return "\n".join(out)
