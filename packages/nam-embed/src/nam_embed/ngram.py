"""NgramHashEmbedding: hashed n-gram lookups projected to the hidden size."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from nam_embed.hashing import NgramHashConfig, full_ngram_mask, hash_buckets, ngram_indices
from nam_embed.lookup import embedding


class NgramHashEmbedding(nn.Module):
    """Sum of hashed n-gram embeddings, through a zero-initialised projection to ``hidden_size``.

    All tables live in one weight of ``config.rows`` rows (table j starts at ``offsets[j]``), so
    one gather serves every table. The lookups of the J tables are concatenated (J * dim wide) and
    projected; the projection starts at zero, so adding this module to a model leaves its initial
    function unchanged while the tables (random from ``config.seed``) give the projection a
    gradient from the first step.

    For tensor parallelism a rank can hold only ``row_range`` = [start, end) of the rows: it
    looks up the rows it holds, writes zeros for the others, and ``reduce`` (a sum over the ranks
    that share the rows) completes the lookups before the projection, which every rank holds
    whole. Each lookup has exactly one non-zero contribution, so the sum is exact.

    ``gradient_accumulation_fusion``: the tables' gradient goes straight into megatron DDP's
    ``main_grad`` where the weight has one (:mod:`nam_embed.lookup`), as megatron's linear layers
    do under the TransformerConfig field of that name.
    """

    def __init__(
        self,
        config: NgramHashConfig,
        hidden_size: int,
        *,
        row_range: tuple[int, int] | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        gradient_accumulation_fusion: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"NgramHashEmbedding: hidden_size={hidden_size}, need >= 1")
        start, end = row_range if row_range is not None else (0, config.rows)
        if not 0 <= start < end <= config.rows:
            raise ValueError(
                f"NgramHashEmbedding: row_range={row_range} is not a non-empty part of [0, {config.rows})"
            )
        self.config = config
        self.row_start, self.row_end = start, end
        self.reduce = reduce
        self.table_lookup = embedding if gradient_accumulation_fusion else nn.functional.embedding
        multipliers, salts = config.multipliers_and_salts()
        # The hash constants are saved with the weights: a checkpoint carries its own hash.
        as_long = {"dtype": torch.int64, "device": device}
        self.register_buffer("multipliers", torch.tensor(multipliers, **as_long))
        self.register_buffer("salts", torch.tensor(salts, **as_long))
        self.register_buffer("primes", torch.tensor(config.primes(), **as_long))
        self.register_buffer("orders", torch.tensor(config.table_orders(), **as_long))
        self.register_buffer("offsets", torch.tensor(config.offsets(), **as_long))
        self.weight = nn.Parameter(torch.empty(end - start, config.dim, device=device, dtype=dtype))
        self.proj = nn.Linear(
            config.num_tables * config.dim, hidden_size, bias=False, device=device, dtype=dtype
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tables: N(0, init_std) from ``config.seed`` over all rows, then this rank's slice, so every
        rank and pipeline stage holds the same values whatever the split; padding rows zero.
        Projection: zero."""
        if self.weight.is_meta:  # shapes only (parameter counts, memory plans): no values
            return
        cfg = self.config
        gen = torch.Generator(device=self.weight.device).manual_seed(cfg.seed)
        full = torch.empty(cfg.rows, cfg.dim, device=self.weight.device, dtype=torch.float32)
        full.normal_(0.0, cfg.init_std, generator=gen)
        full[sum(cfg.primes()) :] = 0  # rows past the last table are never looked up
        self.weight.copy_(full[self.row_start : self.row_end])
        self.proj.weight.zero_()

    def indices(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Table-local indices [..., S, J] (PAD_ID where the n-gram is not full)."""
        return ngram_indices(input_ids, self.multipliers, self.salts, self.primes, self.orders, position_ids)

    def lookup(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Concatenated table vectors [..., S, J * dim]; zero where the n-gram is not full.

        ``indices`` from its two parts: the mask of full n-grams is itself the mask of hits, and
        the buckets need no PAD_ID where the mask drops them anyway. Holding all rows (no tensor
        parallelism), every full n-gram's row is here.
        """
        hit = full_ngram_mask(input_ids.shape, self.orders, position_ids)
        rows = hash_buckets(input_ids, self.multipliers, self.salts, self.primes) + self.offsets
        if self.row_end - self.row_start < self.config.rows:
            rows = rows - self.row_start
            hit = hit & (rows >= 0) & (rows < self.weight.shape[0])
        vectors = self.table_lookup(torch.where(hit, rows, 0), self.weight)
        vectors = vectors * hit.unsqueeze(-1)  # the bool mask multiplies as 0 / 1 in the vectors' dtype
        vectors = vectors.flatten(-2)
        return self.reduce(vectors) if self.reduce is not None else vectors

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """[..., S] token ids (and positions within the document) -> [..., S, hidden_size]."""
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"NgramHashEmbedding: input_ids must be integer, got {input_ids.dtype}")
        if position_ids is not None and position_ids.shape[-1] != input_ids.shape[-1]:
            raise ValueError(
                f"NgramHashEmbedding: position_ids {tuple(position_ids.shape)} do not match "
                f"input_ids {tuple(input_ids.shape)} in the sequence dimension"
            )
        return self.proj(self.lookup(input_ids, position_ids))
