"""The letters nam-spec builds, one module each, registered in one table.

nam-layout owns the grammar (which letters a pattern may hold); this table says which of them
nam-spec can build and how (:class:`~nam_spec.letters.base.Letter`). To add a letter or a variant,
write its module beside these and add it here; nothing else in nam-spec names a letter.
"""

from __future__ import annotations

from nam_spec.letters.attention import Attention
from nam_spec.letters.base import Letter, LetterParams
from nam_spec.letters.experts import Experts
from nam_spec.letters.m2rnn import M2RNN
from nam_spec.letters.mamba import Mamba
from nam_spec.letters.mla import LatentAttentionLetter
from nam_spec.letters.mlp import DenseMLP

LETTERS: dict[str, Letter] = {
    block.letter: block
    for block in (Attention(), Experts(), Mamba(), M2RNN(), DenseMLP(), LatentAttentionLetter())
}
SPEC_LETTERS = "".join(LETTERS)  # "AEMR-L"
GRAPH_LETTERS = "".join(k for k, block in LETTERS.items() if block.graphable)  # nam_spec.graphs: "EMR"
# The layers of one multi-token-prediction depth (nam_spec.mtp): an attention layer and a dense MLP,
# the transformer block of DeepSeek-V3's MTP module and megatron's hybrid MTP pattern "*-". The
# family's own letters would be no better a choice: NAM56R's first kind alone (A) has no FFN, an
# E layer would join the MoE routing statistics and aux losses, M and R add scan state to a head
# that looks k tokens ahead of a representation which already summarises the past.
MTP_LETTERS = Attention.letter + DenseMLP.letter


def letter(key: str) -> Letter:
    """The table's entry for ``key``, or a KeyError naming the letters nam-spec builds."""
    try:
        return LETTERS[key]
    except KeyError:
        raise KeyError(f"nam-spec has no block for letter {key!r}; it builds {' '.join(LETTERS)}") from None


__all__ = ["GRAPH_LETTERS", "LETTERS", "MTP_LETTERS", "SPEC_LETTERS", "Letter", "LetterParams", "letter"]
