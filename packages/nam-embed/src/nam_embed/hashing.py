"""The n-gram hash: configuration, derived constants and the bucket formula.

Table j hashes the n_j tokens ending at position t:

    idx_j(t) = ((XOR over p < n_j of tok[t-p] * m[j, p]) XOR s[j]) mod P[j]

m[j, p] is an odd multiplier below 2^31, one per table and per offset (one multiplier per table
would make (a, b) and (b, a) collide); s[j] is a salt below 2^31 and P[j] a prime, distinct for
every table. Products of a token id below 2^32 and a multiplier below 2^31 fit in int64, and the
remainder is taken non-negative, so negative ids still give a bucket in [0, P[j]).

Positions without a full n-gram (the first n_j - 1 of a row, and the first n_j - 1 of every
document in a packed row) get PAD_ID in that table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_ID = -1
"""Index of a position without a full n-gram, in every table; it looks up the zero vector."""

ROW_MULTIPLE = 128
"""The concatenated tables are padded to a multiple of this many rows, so that the global shape
does not depend on the tensor-parallel size (checkpoints reshard) and any power-of-two TP size up
to 128 splits it evenly."""


@dataclass(frozen=True)
class NgramHashConfig:
    """Shape and constants of the n-gram hash embedding.

    Tables are ordered order-major: for each n in ``orders``, ``heads`` tables. Table j gets the
    j-th prime at or above ``table_size``; its multipliers and salt are drawn from ``seed`` by
    Python's Mersenne Twister, which gives the same numbers on every platform and run.
    """

    orders: tuple[int, ...] = (2, 3)
    heads: int = 8
    table_size: int = 500_000
    dim: int = 16
    seed: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if not self.orders or any(not isinstance(n, int) or n < 1 for n in self.orders):
            raise ValueError(f"NgramHashConfig.orders={self.orders!r}: need a non-empty tuple of ints >= 1")
        if len(set(self.orders)) != len(self.orders):
            raise ValueError(f"NgramHashConfig.orders={self.orders!r}: orders must be distinct")
        for name, low in (("heads", 1), ("table_size", 2), ("dim", 1), ("seed", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"NgramHashConfig.{name}={value!r}: need an int >= {low}")
        if not self.init_std > 0:
            raise ValueError(f"NgramHashConfig.init_std={self.init_std!r}: need a positive float")

    @property
    def num_tables(self) -> int:
        return len(self.orders) * self.heads

    @property
    def max_order(self) -> int:
        return max(self.orders)

    def table_orders(self) -> list[int]:
        return [n for n in self.orders for _ in range(self.heads)]

    def primes(self) -> list[int]:
        return primes_from(self.table_size, self.num_tables)

    def multipliers_and_salts(self) -> tuple[list[list[int]], list[int]]:
        """m[j][p] for p < max_order (0 where p >= n_j, the XOR identity) and s[j]."""
        rng = random.Random(self.seed)
        multipliers, salts = [], []
        for n in self.table_orders():
            row: list[int] = []
            while len(row) < n:
                m = rng.getrandbits(31) | 1
                if m not in row:  # equal multipliers at two offsets would make the n-gram symmetric
                    row.append(m)
            multipliers.append(row + [0] * (self.max_order - n))
            salts.append(rng.getrandbits(31))
        return multipliers, salts

    def offsets(self) -> list[int]:
        """First row of each table in the concatenated weight."""
        out, total = [], 0
        for p in self.primes():
            out.append(total)
            total += p
        return out

    @property
    def rows(self) -> int:
        """Rows of the concatenated weight: the sum of the primes, padded to ROW_MULTIPLE."""
        total = sum(self.primes())
        return -(-total // ROW_MULTIPLE) * ROW_MULTIPLE


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def primes_from(start: int, count: int) -> list[int]:
    """The first ``count`` primes >= ``start``."""
    out, n = [], start
    while len(out) < count:
        if _is_prime(n):
            out.append(n)
        n += 1
    return out


def hash_buckets(input_ids: Tensor, multipliers: Tensor, salts: Tensor, primes: Tensor) -> Tensor:
    """Bucket of every table at every position: [..., S] ids -> [..., S, J] int64 in [0, P_j).

    Before the row start the missing tokens read as 0; those positions are masked by
    ``full_ngram_mask``. multipliers: [J, max_order] int64, salts and primes: [J] int64.
    """
    ids = input_ids.long()
    seq, orders = ids.shape[-1], multipliers.shape[1]
    h = ids.unsqueeze(-1) * multipliers[:, 0]  # offset 0 (XOR into zeros is the product itself)
    if orders > 1:
        # one zero-padded copy, tok[t - p] = padded[t + orders - 1 - p]; the offsets are views of it
        padded = torch.nn.functional.pad(ids, (orders - 1, 0))
        for p in range(1, orders):
            start = orders - 1 - p
            h ^= padded[..., start : start + seq].unsqueeze(-1) * multipliers[:, p]
    return torch.remainder(h ^ salts, primes)


def full_ngram_mask(shape: torch.Size, orders: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Whether table j has a full n-gram at position t: [..., S] -> [..., S, J] bool.

    position_ids are positions within the document (a packer resets them to 0 at every document
    start); without them the row is one document. A position needs n_j - 1 earlier tokens both in
    its row and in its document.
    """
    seq = shape[-1]
    pos = torch.arange(seq, device=orders.device)
    if position_ids is not None:
        pos = torch.minimum(pos, position_ids.to(orders.device).long())
    pos = pos.expand(shape)
    return pos.unsqueeze(-1) >= (orders - 1)


def ngram_indices(
    input_ids: Tensor,
    multipliers: Tensor,
    salts: Tensor,
    primes: Tensor,
    orders: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """Table-local indices [..., S, J]: the bucket where the n-gram is full, PAD_ID elsewhere."""
    valid = full_ngram_mask(input_ids.shape, orders, position_ids)
    return torch.where(valid, hash_buckets(input_ids, multipliers, salts, primes), PAD_ID)
