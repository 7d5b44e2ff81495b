"""The tokenizer: a byte-level BPE trained with `tokenizers` on the training split and cached,
or a ``tokenizer.json`` given by path. Nothing is downloaded.

Byte-level means every byte sequence encodes (no unknown token), and the offsets it reports
map each token back to characters of the source, which the structure channels need.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nam_trainer.config.schema import TokenizerConfig
from nam_trainer.data.cache import file_sha256, load_or_build
from nam_trainer.data.corpus import Document, fingerprint

FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: unreadable, or without the configured special tokens."""


@dataclass(frozen=True)
class LoadedTokenizer:
    tokenizer: Tokenizer
    path: Path
    sha256: str  # of the tokenizer.json: the packed cache's key depends on it
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int, special_tokens: Sequence[str]
) -> Tokenizer:
    """A byte-level BPE with ``special_tokens`` first (ids 0, 1, ...), then the 256 bytes, then merges;
    ``texts`` are read once, as they come (a generator keeps one text in memory at a time)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: Path, cfg: TokenizerConfig, vocab_size: int) -> LoadedTokenizer:
    """A tokenizer.json, checked for the configured special tokens and to fit the model's
    ``vocab_size`` (embedding rows beyond its tokens stay unused)."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for missing and malformed files
        raise TokenizerError(
            f"tokenizer.path = {str(path)!r}: cannot load it as a tokenizers JSON file ({err})"
        ) from err
    ids = {}
    for what, token in (("eos_token", cfg.eos_token), ("pad_token", cfg.pad_token)):
        ids[what] = tok.token_to_id(token)
        if ids[what] is None:
            raise TokenizerError(
                f"tokenizer {str(path)!r} has no token {token!r} (tokenizer.{what}); set tokenizer.{what} "
                "to one of its special tokens"
            )
    # Special tokens spelled inside a document stay text: only the packer places EOS.
    tok.encode_special_tokens = True
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise TokenizerError(
            f"tokenizer {str(path)!r} has {size} tokens but model.vocab_size = {vocab_size}; "
            f"set model.vocab_size to at least {size}"
        )
    return LoadedTokenizer(tok, path, file_sha256(path), ids["eos_token"], ids["pad_token"])


def tokenizer_key_inputs(
    cfg: TokenizerConfig, vocab_size: int, train_documents: Sequence[Document]
) -> dict[str, Any]:
    """Everything a trained tokenizer depends on; any change trains another one."""
    return {
        "kind": "byte-level BPE",
        "vocab_size": vocab_size,
        "min_frequency": cfg.min_frequency,
        "special_tokens": [cfg.eos_token, cfg.pad_token],
        "corpus": fingerprint(train_documents),
        "tokenizers": importlib.metadata.version("tokenizers"),
    }


def prepare_tokenizer(
    cfg: TokenizerConfig,
    vocab_size: int,
    train_documents: Sequence[Document],
    train_texts: Iterable[str],
    cache_root: Path,
    log: Callable[[str], None] = print,
) -> LoadedTokenizer:
    """The configured tokenizer: loaded from ``cfg.path``, or a BPE of ``vocab_size`` tokens trained once
    on ``train_texts`` (the texts of ``train_documents``, read only when it is built) and cached."""
    if cfg.path:
        return load_tokenizer(Path(cfg.path).expanduser(), cfg, vocab_size)
    key_inputs = tokenizer_key_inputs(cfg, vocab_size, train_documents)

    def build(out: Path) -> dict[str, object]:
        log(
            f"tokenizer: training a byte-level BPE of {vocab_size} tokens on {len(train_documents)} documents"
        )
        tok = train_bpe(train_texts, vocab_size, cfg.min_frequency, key_inputs["special_tokens"])
        tok.save(str(out / FILE))
        return {"vocab_size": tok.get_vocab_size(with_added_tokens=True)}

    entry = load_or_build(cache_root, "tokenizer", key_inputs, build, log)
    return load_tokenizer(entry / FILE, cfg, vocab_size)
