"""Data: corpus discovery, split, tokenizer, structure channels, packing and the verified cache."""

from nam_trainer.data.cache import cache_key, load_or_build, problem
from nam_trainer.data.corpus import Corpus, CorpusError, Document, Source, fingerprint, scan_corpus
from nam_trainer.data.packing import PackedRows, RowPacker, RowWriter, pack, write_rows
from nam_trainer.data.prepare import (
    CorpusPlan,
    PreparedData,
    SourceData,
    cache_status,
    plan_corpus,
    prepare_data,
)
from nam_trainer.data.split import split_documents
from nam_trainer.data.tokenizer import (
    LoadedTokenizer,
    TokenizerError,
    load_tokenizer,
    prepare_tokenizer,
    train_bpe,
)
from nam_trainer.data.toolchain import ToolchainError, cxx_header_dirs

__all__ = [
    "Corpus",
    "CorpusError",
    "CorpusPlan",
    "Document",
    "LoadedTokenizer",
    "PackedRows",
    "PreparedData",
    "RowPacker",
    "RowWriter",
    "Source",
    "SourceData",
    "TokenizerError",
    "ToolchainError",
    "cache_key",
    "cache_status",
    "cxx_header_dirs",
    "fingerprint",
    "load_or_build",
    "load_tokenizer",
    "pack",
    "plan_corpus",
    "prepare_data",
    "prepare_tokenizer",
    "problem",
    "scan_corpus",
    "split_documents",
    "train_bpe",
    "write_rows",
]
