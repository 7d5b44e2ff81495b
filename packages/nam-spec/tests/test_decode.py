"""Incremental decoding (nam_spec.decode): prefill and steps give the logits of a full forward over
the same tokens, for every letter alone, for the NAM56R pattern at the nam56r-tiny preset (n-gram
hash and structure channels on), after a document start inside the prompt, and for prompts of
different lengths in one batch."""

from __future__ import annotations

import pytest
import torch
from helpers import MAMBA3, tiny
from megatron.core.packed_seq_params import PackedSeqParams

from nam_layout import Layout
from nam_spec import EmbeddingConfig, preset
from nam_spec.decode import Decoder
from nam_spec.letters import SPEC_LETTERS
from nam_spec.model import build_model
from nam_spec.presets import PRESETS

PROMPT, TOTAL = 5, 9
CHANNELS = ("category", "dependency", "depth", "sibling", "node_type")


def _model(layout: Layout, config: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(layout, config)
    with torch.no_grad():  # away from the inits that hide terms (zero n-gram projection, W = I, D = 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs(
    vocab: int, b: int, n: int, structure: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    channels = {name: torch.randint(0, 4, (b, n), generator=g) for name in CHANNELS} if structure else None
    return ids, channels


def _full(model: torch.nn.Module, ids: torch.Tensor, structure: dict | None, **kw: object) -> torch.Tensor:
    pos = kw.pop("position_ids", torch.arange(ids.shape[1]).expand_as(ids))
    with torch.no_grad():
        return model(ids, pos, structure=structure, **kw).float()


def _decode(
    model: torch.nn.Module,
    ids: torch.Tensor,
    structure: dict | None,
    documents: torch.Tensor | None = None,
    prompt: int = PROMPT,
) -> list[torch.Tensor]:
    """Logits after token PROMPT-1 (prefill), then after each further token (steps): [b, vocab] each."""
    rows = range(ids.shape[0])
    at = lambda r, t0, t1: {k: v[r, t0:t1] for k, v in structure.items()} if structure else None  # noqa: E731
    with Decoder(model) as decoder:
        out = [
            decoder.prefill(
                [ids[r, :prompt] for r in rows],
                None if documents is None else [documents[r, :prompt] for r in rows],
                None if structure is None else [at(r, 0, prompt) for r in rows],
            )
        ]
        for t in range(prompt, ids.shape[1]):
            out.append(
                decoder.step(
                    ids[:, t], None if structure is None else {k: v[:, t] for k, v in structure.items()}
                )
            )
    return out


def _check(out: list[torch.Tensor], full: torch.Tensor, prompt: int = PROMPT) -> None:
    for i, logits in enumerate(out):
        torch.testing.assert_close(
            logits, full[:, prompt - 1 + i], rtol=1e-4, atol=1e-4, msg=f"token {prompt - 1 + i}"
        )


@pytest.mark.parametrize("key", SPEC_LETTERS)
def test_each_letter_decodes_as_the_full_forward(key: str, megatron_single_rank: None) -> None:
    config = tiny(seq_length=TOTAL + 3)
    model = _model(Layout.tile(key, 2), config)
    ids, _ = _inputs(config.vocab_size, 2, TOTAL, False)
    _check(_decode(model, ids, None), _full(model, ids, None))


def test_mamba3_decodes_as_the_full_forward(megatron_single_rank: None) -> None:
    config = tiny(seq_length=TOTAL + 3, mamba=MAMBA3)
    model = _model(Layout.tile("M", 2), config)
    ids, _ = _inputs(config.vocab_size, 2, TOTAL, False)
    _check(_decode(model, ids, None), _full(model, ids, None))


def test_a_model_with_multi_token_prediction_decodes_with_its_main_head(megatron_single_rank: None) -> None:
    config = tiny(seq_length=TOTAL + 3, mtp_depth=2)
    model = _model(Layout.tile("AM", 2), config)
    ids, _ = _inputs(config.vocab_size, 2, TOTAL, False)
    _check(_decode(model, ids, None), _full(model, ids, None))


def test_nam56r_tiny_preset_decodes_as_the_full_forward(megatron_single_rank: None) -> None:
    config = preset("nam56r-tiny", seq_length=16)
    assert PRESETS["nam56r-tiny"].embedding.ngram and PRESETS["nam56r-tiny"].embedding.structure
    model = _model(config.layout(), config)
    ids, structure = _inputs(config.vocab_size, 1, TOTAL, True)
    _check(_decode(model, ids, structure), _full(model, ids, structure))


def test_a_document_start_inside_the_prompt(megatron_single_rank: None) -> None:
    """Documents [0, 0, 0, 1, 1 | 1 1 1 1]: the forward over the packed row (block-causal, states
    and n-grams restarting) is what prefill + steps reproduce."""
    config = tiny(seq_length=TOTAL + 3, embedding=EmbeddingConfig(ngram=True, ngram_table_size=31))
    model = _model(Layout.tile("AEMR-L", 6), config)
    ids, _ = _inputs(config.vocab_size, 1, TOTAL, False)
    start = 3
    documents = (torch.arange(TOTAL) >= start).long()[None]
    positions = torch.cat([torch.arange(start), torch.arange(TOTAL - start)])[None]
    packed = PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=torch.tensor([0, start, TOTAL], dtype=torch.int32),
        cu_seqlens_kv=torch.tensor([0, start, TOTAL], dtype=torch.int32),
        max_seqlen_q=TOTAL,
        max_seqlen_kv=TOTAL,
    )
    full = _full(model, ids, None, position_ids=positions, packed_seq_params=packed)
    _check(_decode(model, ids, None, documents), full)


def test_prompts_of_different_lengths_in_one_batch(megatron_single_rank: None) -> None:
    config = tiny(seq_length=TOTAL + 3, embedding=EmbeddingConfig(ngram=True, ngram_table_size=31))
    model = _model(Layout.tile("AEMR-L", 6), config)
    ids, _ = _inputs(config.vocab_size, 2, TOTAL, False)
    short, long_ = ids[0, 2:], ids[1]  # 7 and 9 tokens; prompts of 3 and 5
    with Decoder(model) as decoder:
        got = [decoder.prefill([short[:3], long_[:5]])]
        for t in range(4):
            got.append(decoder.step(torch.stack([short[3 + t], long_[5 + t]])))
    for row, (tokens, prompt) in enumerate(((short, 3), (long_, 5))):
        full = _full(model, tokens[None, : prompt + 4], None)
        _check([g[row : row + 1] for g in got], full, prompt)
