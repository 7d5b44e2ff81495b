"""The document lengths of the default corpus, for benchmarks on a machine without it.

    uv run --frozen python bench/document_lengths.py      # on the CPU machine; writes the JSON below

The default corpus is the machine's C++ standard library headers; each document's length is its
token count under the tiny preset's tokenizer plus its EOS, read from the training split that
``nam-train`` packs (its own data path and cache). The GPU machine lacks the headers and the
cache, so bench/attention_documents.py and bench/trainer_documents.py read the lengths from
``document_lengths.json`` beside this file, and ``packed_document_ids`` lays them out as the packer
does: documents end to end, cut into rows with a stride of the sequence length.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

LENGTHS = Path(__file__).with_name("document_lengths.json")
PRESET = "nam56r-tiny"


def measure() -> dict:
    """Token counts (EOS included) of the default corpus's training documents under the preset's tokenizer."""
    from nam_trainer.config import load_config
    from nam_trainer.data import prepare_data

    cfg = load_config(PRESET)
    split = prepare_data(cfg, log=lambda m: print(m, file=sys.stderr)).sources[0].train
    ids = np.concatenate([split[i]["document_ids"].numpy() for i in range(len(split))])  # inputs: no overlap
    lengths = np.bincount(ids[ids >= 0])
    return {
        "corpus": "C++ standard library headers (nam-train's default corpus), training split",
        "tokenizer": f"{PRESET} preset's byte-level BPE of {cfg.model.vocab_size} tokens",
        "documents": len(lengths),
        "median": float(np.median(lengths)),
        "mean": float(lengths.mean()),
        "lengths": sorted(int(n) for n in lengths),
    }


def load_lengths() -> np.ndarray:
    return np.asarray(json.loads(LENGTHS.read_text())["lengths"], dtype=np.int64)


def packed_document_ids(lengths: np.ndarray, rows: int, seq: int, seed: int = 0) -> np.ndarray:
    """Document ids [rows, seq] of ``rows`` consecutive packed rows of a stream of documents drawn
    (with replacement) from ``lengths``, starting at a random offset, so a row may begin mid-document."""
    rng = np.random.default_rng(seed)
    need = (rows + 1) * seq
    drawn: list[int] = []
    while sum(drawn) < need:
        drawn.append(int(rng.choice(lengths)))
    stream = np.repeat(np.arange(len(drawn)), drawn)
    start = int(rng.integers(0, seq))
    return stream[start : start + rows * seq].reshape(rows, seq)


if __name__ == "__main__":
    facts = measure()
    LENGTHS.write_text(json.dumps(facts) + "\n")
    print(
        f"{LENGTHS}: {facts['documents']} documents, median {facts['median']:.0f} tokens, "
        f"mean {facts['mean']:.0f}"
    )
