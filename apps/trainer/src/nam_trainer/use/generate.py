"""``nam-train generate``: sampling from a loaded checkpoint with nam-spec's incremental Decoder.

All prompts are prefilled in one parallel pass, then one token per row per step. Structure
channels (models trained with them): the prompt's come from the C++ extractor over the prompt, as
packing computes them; each generated token's are the last column of the extractor re-run over the
row's text so far, so a token's channels are those of the text up to it and are never revised
(one extractor pass per token per row: the cost grows with the text; ``Generation.structure_s``
measures it).
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nam_trainer.use.loader import Loaded
from nam_trainer.use.token_bytes import token_text_bytes


class PromptError(ValueError):
    """A prompt that cannot be generated from: empty, or longer than the model's sequence."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: all tokens
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass
class Row:
    ids: list[int]
    offsets: list[tuple[int, int]]  # character spans of every token of the row in ``text``
    text: str
    new_text: str = ""
    done: bool = False
    _utf8: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )

    def add(self, token: bytes, token_id: int) -> str:
        piece = self._utf8.decode(token)
        self.offsets.append((len(self.text), len(self.text) + len(piece)))
        self.ids.append(token_id)
        self.text += piece
        self.new_text += piece
        return piece


@dataclass
class Generation:
    texts: list[str]  # the generated text of each prompt (without the prompt)
    new_tokens: int
    seconds: float
    structure_s: float  # of which in the structure extractor


def pick(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from logits [b, vocab]: greedy at temperature 0, else sampled from the
    softmax at ``temperature`` within the top-k tokens and the top-p probability mass."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        ordered, index = logits.sort(-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the better tokens
        ordered = ordered.masked_fill(before >= s.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered)
    probs = logits.softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


def generate(
    loaded: Loaded, prompts: list[str], s: Sampling, stream: Callable[[int, str], None]
) -> Generation:
    """Generate from each prompt; ``stream(row, text)`` receives each row's new text as it comes."""
    from nam_spec.decode import Decoder

    tok, seq = loaded.tokenizer, loaded.config.model.seq_length
    rows = []
    for i, prompt in enumerate(prompts):
        enc = tok.tokenizer.encode(prompt, add_special_tokens=False)
        if not enc.ids:
            raise PromptError(f"prompt {i + 1} is empty; give some text to continue")
        if len(enc.ids) >= seq:
            raise PromptError(
                f"prompt {i + 1} is {len(enc.ids)} tokens; the model's sequence is {seq} (model.seq_length): "
                f"give at most {seq - 1} tokens"
            )
        rows.append(Row(list(enc.ids), list(enc.offsets), prompt))
    structure_s = 0.0
    channels = loaded.config.model.embedding.structure

    def structure_of(row: Row, last: bool) -> dict[str, torch.Tensor] | None:
        nonlocal structure_s
        if not channels:
            return None
        from nam_trainer.data.structure import CHANNELS, cpp_structure

        began = time.perf_counter()
        values = torch.from_numpy(cpp_structure(row.text, row.offsets).astype("int64"))
        structure_s += time.perf_counter() - began
        values = values[:, -1:] if last else values
        return {name: values[c].to(loaded.device) for c, name in enumerate(CHANNELS)}

    device = loaded.device
    generator = torch.Generator().manual_seed(s.seed)
    began, new = time.perf_counter(), 0
    budget = min(s.max_new_tokens, seq - max(len(r.ids) for r in rows))
    with Decoder(loaded.model) as decoder:
        structures = [structure_of(r, last=False) for r in rows]
        logits = decoder.prefill(
            [torch.tensor(r.ids, device=device) for r in rows], None, structures if channels else None
        )
        for _ in range(budget):
            tokens = pick(logits, s, generator)
            for i, (row, t) in enumerate(zip(rows, tokens.tolist(), strict=True)):
                if row.done:
                    continue
                new += 1
                if t == tok.eos_id:
                    row.done = True
                    continue
                piece = row.add(token_text_bytes(tok, t), t)
                hit = [row.new_text.index(x) for x in s.stop if x in row.new_text]
                if hit:
                    cut = len(row.new_text) - min(hit)
                    piece = piece[: max(len(piece) - cut, 0)]
                    row.new_text, row.done = row.new_text[: min(hit)], True
                stream(i, piece)
            if all(r.done for r in rows):
                break
            step_structure = None
            if channels:
                per_row = [structure_of(r, last=True) for r in rows]
                step_structure = {k: torch.cat([p[k] for p in per_row]) for k in per_row[0]}  # type: ignore[index]
            logits = decoder.step(tokens, step_structure)
    return Generation([r.new_text for r in rows], new, time.perf_counter() - began, structure_s)
