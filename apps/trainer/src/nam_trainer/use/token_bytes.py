"""How many UTF-8 bytes of text each token stands for, for bits per byte.

The tokenizer is a byte-level BPE: each byte is written as one printable character (GPT-2's
table: the printable bytes as themselves, the other 68 shifted to 256 and up), so a token's
string maps back to exact bytes. Special tokens (EOS, pad) stand for no text: 0 bytes.
"""

from __future__ import annotations

import numpy as np

from nam_trainer.data.tokenizer import LoadedTokenizer


def _byte_of_char() -> dict[str, int]:
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


_BYTE_OF_CHAR = _byte_of_char()


def token_bytes(tokenizer: LoadedTokenizer) -> np.ndarray:
    """[vocab_size] int64: the byte length of each token id's text (0 for special tokens)."""
    return np.array(
        [len(token_text_bytes(tokenizer, i)) for i in range(tokenizer.vocab_size)], dtype=np.int64
    )


def token_text_bytes(tokenizer: LoadedTokenizer, token_id: int) -> bytes:
    """The exact bytes one token stands for (b'' for special tokens)."""
    piece = tokenizer.tokenizer.id_to_token(token_id)
    if piece is None or token_id in (tokenizer.eos_id, tokenizer.pad_id):
        return b""
    return bytes(_BYTE_OF_CHAR[ch] for ch in piece)
