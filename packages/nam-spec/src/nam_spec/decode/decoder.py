"""Decoder: incremental decoding of a NamModel (one process, local backend).

    with Decoder(model) as decoder:
        logits = decoder.prefill(prompts)        # [b, vocab]: after each prompt's last token
        logits = decoder.step(next_tokens)       # [b, vocab]: after one more token per row

The prefill runs every prompt in one parallel forward (left-padded to the longest; the padding is
a document of its own, so no state, key or n-gram crosses into a prompt), and each layer's
stand-in core (``Letter.decode_core``: the KV cache of attention, the latent cache of multi-latent
attention, the conv inputs and scan state of the mixers; MLP and experts keep nothing) keeps its
state. A step embeds one token per row and runs each layer on it alone.

What the embedding needs of the past it recomputes from a window: the n-gram hash from the last
``max order`` tokens with their positions in the document (so its restart rule is the forward's),
structure channels as the caller gives them per token. RoPE positions count from each row's
first real token, as a forward over the unpadded prompt would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType

import torch
from torch import nn

from nam_spec.decode.cores import DecodeContext
from nam_spec.letters import letter

Structure = Mapping[str, torch.Tensor]


class Decoder:
    def __init__(self, model: nn.Module) -> None:
        if not (model.pre_process and model.post_process) or model.tp_group.size() != 1:
            raise ValueError(
                "Decoder: incremental decoding needs the whole model in one process (TP = PP = 1)"
            )
        if model.backend.name != "local":
            raise ValueError(
                f"Decoder: incremental decoding runs on the local backend, not {model.backend.name!r}"
            )
        self.model = model
        self.context = DecodeContext()
        ngram = model.embedding.ngram
        self.window = int(ngram.orders.max()) if ngram is not None else 1
        self._swapped: list[tuple[nn.Module, str, nn.Module]] = []
        self._tokens = self._positions = self._rope = torch.empty(0)
        self._structure: dict[str, torch.Tensor] = {}

    def __enter__(self) -> Decoder:
        self.model.eval()
        stack = self.model.decoder
        for kind, layer in zip(stack.kinds, stack.layers, strict=True):
            block = letter(kind)
            core = block.core(layer)
            stand_in = block.decode_core(core, self.context)
            if stand_in is not None:
                name = next(n for n, m in layer.named_modules() if m is core)
                layer.set_submodule(name, stand_in)
                self._swapped.append((layer, name, core))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for layer, name, core in self._swapped:
            layer.set_submodule(name, core)
        self._swapped.clear()

    @torch.no_grad()
    def prefill(
        self,
        prompts: Sequence[torch.Tensor],
        documents: Sequence[torch.Tensor] | None = None,
        structure: Sequence[Structure] | None = None,
    ) -> torch.Tensor:
        """``prompts``: token ids [n_r] per row; ``documents``: each token's document index [n_r]
        (non-decreasing; default one document); ``structure``: channel -> [n_r] values per row
        when the model has structure channels. Returns the logits after each prompt [b, vocab]."""
        if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
            raise ValueError("Decoder.prefill: give one non-empty 1-D tensor of token ids per row")
        device = self.model.output_layer.weight.device
        b, s = len(prompts), max(p.numel() for p in prompts)
        tokens = torch.zeros(b, s, dtype=torch.long, device=device)
        docs = torch.full((b, s), -1, dtype=torch.int32, device=device)
        positions = torch.zeros(b, s, dtype=torch.long, device=device)
        rope = torch.zeros(b, s, dtype=torch.long, device=device)
        channels = {
            name: torch.zeros(b, s, dtype=torch.long, device=device) for name in (structure or [{}])[0]
        }
        for r, prompt in enumerate(prompts):
            n, pad = prompt.numel(), s - prompt.numel()
            row_docs = torch.zeros(n, dtype=torch.long) if documents is None else documents[r].long().cpu()
            if row_docs.shape != (n,) or bool((row_docs[1:] < row_docs[:-1]).any()) or int(row_docs[0]) < 0:
                raise ValueError(
                    f"Decoder.prefill: documents of row {r} must be {n} non-decreasing ints >= 0"
                )
            tokens[r, pad:] = prompt
            docs[r, pad:] = row_docs.to(device, torch.int32)
            starts = torch.cat([torch.ones(1, dtype=torch.bool), row_docs[1:] != row_docs[:-1]])
            first = torch.cummax(torch.where(starts, torch.arange(n), 0), 0).values
            positions[r, pad:] = (torch.arange(n) - first).to(device)
            rope[r, pad:] = torch.arange(n, device=device)
            for name in channels:
                channels[name][r, pad:] = structure[r][name]  # type: ignore[index]
        self.context.seq_idx = docs
        try:
            logits = self._forward(tokens, positions, rope, channels, keep=s)
        finally:
            self.context.seq_idx = None
        w = self.window
        self._tokens, self._positions, self._rope = tokens[:, -w:], positions[:, -w:], rope[:, -1]
        self._structure = {name: c[:, -w:] for name, c in channels.items()}
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, structure: Structure | None = None) -> torch.Tensor:
        """One more token per row (``tokens`` [b]; ``structure`` channel -> [b] for the model's
        channels): the logits after it [b, vocab]."""
        if self._rope.numel() == 0:
            raise ValueError("Decoder.step: call prefill first")
        w = self.window
        self._tokens = torch.cat([self._tokens, tokens.view(-1, 1).to(self._tokens)], dim=1)[:, -w:]
        self._positions = torch.cat([self._positions, self._positions[:, -1:] + 1], dim=1)[:, -w:]
        self._rope = self._rope + 1
        for name, c in (structure or {}).items():
            self._structure[name] = torch.cat([self._structure[name], c.view(-1, 1).to(c.device)], 1)[:, -w:]
        return self._forward(self._tokens, self._positions, self._rope[:, None], self._structure, keep=1)

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rope: torch.Tensor,
        structure: dict[str, torch.Tensor],
        keep: int,
    ) -> torch.Tensor:
        """The model's forward (NamModel.forward's parts) on the last ``keep`` tokens of the
        window, with RoPE at ``rope`` [b, keep]; the logits of the last one [b, vocab]."""
        m = self.model
        hidden = m.embedding(input_ids=tokens, position_ids=positions, structure=structure or None)[-keep:]
        self.context.positions = rope  # for the letters that make their own RoPE (L)
        freqs = m.rotary_pos_emb(int(rope.max()) + 1)[:, 0, 0]  # [positions, dim]
        hidden = m.decoder(hidden, None, freqs[rope].transpose(0, 1)[:, :, None], None)
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(hidden[-1:], weight=weight)
        return logits[0].float()
