from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from nam_trainer.config.schema import TokenizerConfig
from nam_trainer.data import Document, TokenizerError, load_tokenizer, prepare_tokenizer, train_bpe
from nam_trainer.data.corpus import WHOLE_FILE

SPECIALS = ("<|endoftext|>", "<|pad|>")


@pytest.fixture(scope="module")
def texts(header_slice: list[Path]) -> list[str]:
    return [p.read_text() for p in header_slice]


def test_training_is_deterministic_and_byte_level(texts: list[str]) -> None:
    a = train_bpe(texts, 400, 2, SPECIALS)
    b = train_bpe(texts, 400, 2, SPECIALS)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 400
    assert [a.token_to_id(t) for t in SPECIALS] == [0, 1]
    for text in [*texts, "naïve → ünïcode ∑ 𝔘\t\r\n"]:  # every byte sequence round-trips
        assert a.decode(a.encode(text).ids) == text


def test_trained_tokenizer_is_cached_and_reused(
    tmp_path: Path, header_slice: list[Path], texts: list[str]
) -> None:
    cfg = TokenizerConfig()
    docs = [
        Document(str(p), WHOLE_FILE, len(t.encode()), hashlib.sha256(t.encode()).digest())
        for p, t in zip(header_slice, texts, strict=True)
    ]
    logs: list[str] = []
    first = prepare_tokenizer(cfg, 300, docs, iter(texts), tmp_path, logs.append)
    second = prepare_tokenizer(cfg, 300, docs, iter(texts), tmp_path, logs.append)
    assert first.sha256 == second.sha256 and first.path == second.path
    assert [line.split(":")[1].split()[0] for line in logs if line.startswith("cache:")] == [
        "building",
        "using",
    ]
    manifest = json.loads((first.path.parent / "manifest.json").read_text())
    assert manifest["key_inputs"]["vocab_size"] == 300 and manifest["info"]["vocab_size"] == 300
    other = prepare_tokenizer(cfg, 320, docs, iter(texts), tmp_path, logs.append)
    assert other.path.parent != first.path.parent and other.vocab_size == 320


def test_special_token_text_inside_a_document_stays_text(tmp_path: Path, texts: list[str]) -> None:
    path = tmp_path / "tok.json"
    train_bpe(texts, 300, 2, SPECIALS).save(str(path))
    tok = load_tokenizer(path, TokenizerConfig(path=str(path)), 300)
    ids = tok.tokenizer.encode("a <|endoftext|> b", add_special_tokens=False).ids
    assert tok.eos_id not in ids and tok.tokenizer.decode(ids) == "a <|endoftext|> b"


def test_bad_tokenizer_files(tmp_path: Path, texts: list[str]) -> None:
    with pytest.raises(TokenizerError, match="cannot load it as a tokenizers JSON file"):
        load_tokenizer(tmp_path / "missing.json", TokenizerConfig(path="missing.json"), 4096)
    plain = tmp_path / "plain.json"
    train_bpe(texts, 300, 2, ["<s>"]).save(str(plain))
    with pytest.raises(TokenizerError, match=re.escape("has no token '<|endoftext|>' (tokenizer.eos_token)")):
        load_tokenizer(plain, TokenizerConfig(path=str(plain)), 4096)
    good = tmp_path / "good.json"
    train_bpe(texts, 300, 2, SPECIALS).save(str(good))
    with pytest.raises(
        TokenizerError, match=re.escape("has 300 tokens but model.vocab_size = 299; set model")
    ):
        load_tokenizer(good, TokenizerConfig(path=str(good)), 299)
    assert load_tokenizer(good, TokenizerConfig(path=str(good)), 4096).vocab_size == 300  # rows to spare
