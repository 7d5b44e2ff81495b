"""From configuration to datasets: corpus -> split -> tokenizer -> packed rows in the cache.

Every rank may call it: on one host the first caller builds what is missing while the others
wait on the cache's lock, then verify and open it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nam_trainer.config.schema import Config, DataConfig
from nam_trainer.data.cache import FORMAT, cache_key, load_or_build, problem, read_manifest
from nam_trainer.data.corpus import Corpus, Document, fingerprint, load_corpus
from nam_trainer.data.dataset import PackedSplit
from nam_trainer.data.packing import pack, token_dtype, write_rows
from nam_trainer.data.split import split_documents
from nam_trainer.data.structure import CHANNELS, cpp_structure, extractor_version
from nam_trainer.data.tokenizer import FILE as TOKENIZER_FILE
from nam_trainer.data.tokenizer import (
    LoadedTokenizer,
    load_tokenizer,
    prepare_tokenizer,
    tokenizer_key_inputs,
)

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class CorpusPlan:
    """The documents and their split: everything that is cheap to know before building."""

    corpus: Corpus
    train: tuple[Document, ...]
    validation: tuple[Document, ...]


@dataclass(frozen=True)
class PreparedData:
    tokenizer: LoadedTokenizer
    entry: Path  # the packed cache entry
    train: PackedSplit
    validation: PackedSplit | None
    info: dict[str, Any]  # the manifest's facts: documents, tokens and rows per split, corpus origin

    @property
    def channels(self) -> tuple[str, ...]:
        return self.train.channels

    def trained_on(self) -> dict[str, Any]:
        """What weights trained on this data depend on besides the model, for the checkpoints: the
        tokenizer (its file's sha256, vocabulary and special ids; its path for messages only) and the
        packed rows (the key inputs of their cache entry: each split's documents, row length, structure
        channels, the tokenizer; the configured sources for messages only)."""
        tok = self.tokenizer
        return {
            "tokenizer": {
                "sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id,
                "pad_id": tok.pad_id,
                "path": str(tok.path),
            },
            "data": {"rows": read_manifest(self.entry)["key_inputs"], "sources": self.info["corpus"]},
        }


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser()


def plan_corpus(cfg: DataConfig) -> CorpusPlan:
    corpus = load_corpus(cfg.sources, compiler=cfg.compiler, jsonl_text_key=cfg.jsonl_text_key)
    train, validation = split_documents(corpus.documents, cfg.validation_fraction, cfg.split_seed)
    return CorpusPlan(corpus, train, validation)


def packed_key_inputs(
    cfg: DataConfig, seq_length: int, plan: CorpusPlan, tokenizer: LoadedTokenizer
) -> dict[str, Any]:
    """Everything the packed rows depend on; any change gives another cache entry."""
    return {
        "kind": "packed rows",
        "format": FORMAT,
        "train": fingerprint(plan.train),
        "validation": fingerprint(plan.validation),
        "tokenizer": tokenizer.sha256,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "seq_length": seq_length,
        "structure": extractor_version() if cfg.structure == "cpp" else "none",
    }


def prepare_data(cfg: Config, log: Callable[[str], None] = print) -> PreparedData:
    """Build what is missing or bad in the cache, verify the rest, and open the packed splits: a
    tokenizer of at most ``model.vocab_size`` tokens, rows of ``model.seq_length``."""
    data, seq_length = cfg.data, cfg.model.seq_length
    plan = plan_corpus(data)
    root = cache_root(data)
    log(
        f"corpus: {len(plan.corpus.documents)} documents, {plan.corpus.num_bytes:,} bytes from {plan.corpus.origin}"
        + (f" (skipped {plan.corpus.skipped})" if plan.corpus.skipped else "")
    )
    tokenizer = prepare_tokenizer(cfg.tokenizer, cfg.model.vocab_size, plan.train, root, log)
    key_inputs = packed_key_inputs(data, seq_length, plan, tokenizer)
    channels = CHANNELS if data.structure == "cpp" else ()

    def build(out: Path) -> dict[str, Any]:
        info: dict[str, Any] = {"corpus": plan.corpus.origin, "skipped": plan.corpus.skipped}
        for split, docs in zip(SPLITS, (plan.train, plan.validation), strict=True):
            if docs:
                log(f"data: tokenizing and packing {len(docs)} {split} documents")
                info[split] = _write_split(docs, out / split, seq_length, tokenizer, channels)
        return info

    entry = load_or_build(root, "packed", key_inputs, build, log)
    info = read_manifest(entry)["info"]
    splits = {s: PackedSplit(entry / s, seq_length, channels) if s in info else None for s in SPLITS}
    assert splits["train"] is not None
    return PreparedData(tokenizer, entry, splits["train"], splits["validation"], info)


def _write_split(
    docs: tuple[Document, ...],
    prefix: Path,
    seq_length: int,
    tokenizer: LoadedTokenizer,
    channels: tuple[str, ...],
) -> dict[str, Any]:
    texts = [d.text for d in docs]
    encodings = tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False)
    dtype = token_dtype(tokenizer.vocab_size)
    ids = [np.asarray(e.ids, dtype=dtype) for e in encodings]
    structure = (
        [cpp_structure(t, e.offsets) for t, e in zip(texts, encodings, strict=True)] if channels else None
    )
    rows = pack(ids, seq_length, tokenizer.eos_id, tokenizer.pad_id, structure, tokens_dtype=dtype)
    write_rows(rows, prefix)
    return {
        "documents": [d.name for d in docs],
        "tokens": int(sum(len(i) for i in ids)),
        "rows": rows.num_rows,
    }


def cache_status(cfg: Config, plan: CorpusPlan) -> list[str]:
    """What ``prepare_data`` would reuse and what it would build, without building anything."""
    tokenizer_cfg, vocab_size = cfg.tokenizer, cfg.model.vocab_size
    root = cache_root(cfg.data)
    if tokenizer_cfg.path:
        tokenizer = load_tokenizer(Path(tokenizer_cfg.path).expanduser(), tokenizer_cfg, vocab_size)
        lines = [f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} tokens)"]
    else:
        tok_inputs = tokenizer_key_inputs(tokenizer_cfg, vocab_size, plan.train)
        tok_entry = root / "tokenizer" / cache_key(tok_inputs)
        why = problem(tok_entry, tok_inputs)
        if why is not None:
            return [
                f"tokenizer: to train into {tok_entry} ({why})",
                "packed rows: to build after the tokenizer",
            ]
        tokenizer = load_tokenizer(tok_entry / TOKENIZER_FILE, tokenizer_cfg, vocab_size)
        lines = [f"tokenizer: cached in {tok_entry} ({tokenizer.vocab_size} tokens)"]
    inputs = packed_key_inputs(cfg.data, cfg.model.seq_length, plan, tokenizer)
    entry = root / "packed" / cache_key(inputs)
    why = problem(entry, inputs)
    lines.append(
        f"packed rows: {'cached in' if why is None else 'to build into'} {entry}"
        + (f" ({why})" if why else "")
    )
    return lines
