"""Structure channels: their schema and their embedding.

A structure channel is one integer per token, aligned with ``input_ids`` (for code: the token's
syntactic category, dependency level, AST depth, sibling index and node type). The schema names
the channels, gives each a vocabulary size and says what an out-of-range value does: ``clamp``
maps it into [0, vocab) (the last id is then the bucket "this or more"), ``error`` raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

OutOfRange = Literal["clamp", "error"]


@dataclass(frozen=True)
class ChannelSpec:
    name: str
    vocab: int
    out_of_range: OutOfRange

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"structure channel name {self.name!r}: need a Python identifier")
        if not isinstance(self.vocab, int) or self.vocab < 1:
            raise ValueError(f"structure channel {self.name!r}: vocab={self.vocab!r}, need an int >= 1")
        if self.out_of_range not in ("clamp", "error"):
            raise ValueError(
                f"structure channel {self.name!r}: out_of_range={self.out_of_range!r}, "
                "accepted: 'clamp' or 'error'"
            )


@dataclass(frozen=True)
class StructureSchema:
    channels: tuple[ChannelSpec, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.channels]
        if not names:
            raise ValueError("StructureSchema: needs at least one channel")
        if len(set(names)) != len(names):
            raise ValueError(f"StructureSchema: channel names repeat: {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.channels)

    def __getitem__(self, name: str) -> ChannelSpec:
        for c in self.channels:
            if c.name == name:
                return c
        raise KeyError(f"StructureSchema has no channel {name!r}; channels: {list(self.names)}")

    @classmethod
    def default(cls) -> StructureSchema:
        """The five channels of the C++ extractor with its vocabulary sizes.

        Category and node type are closed vocabularies (an unknown node type already has its own
        id), so a value outside them is a bug: error. Dependency level, depth and sibling index
        are unbounded counts: clamp into the last bucket.
        """
        from nam_embed.cpp_vocab import CATEGORIES, NODE_TYPES

        return cls(
            (
                ChannelSpec("category", len(CATEGORIES), "error"),
                ChannelSpec("dependency", 8, "clamp"),
                ChannelSpec("depth", 32, "clamp"),
                ChannelSpec("sibling", 32, "clamp"),
                ChannelSpec("node_type", len(NODE_TYPES), "error"),
            )
        )


@dataclass(frozen=True)
class StructureConfig:
    """Which channels StructureEmbedding embeds (default: all of the schema's) and how wide."""

    schema: StructureSchema = field(default_factory=StructureSchema.default)
    enabled: tuple[str, ...] | None = None
    bottleneck: int = 64
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in self.channels:
            self.schema[name]  # unknown names raise, naming the schema's channels
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"StructureConfig: enabled={list(self.channels)} must be non-empty and distinct")
        if self.bottleneck < 1 or not self.init_std > 0:
            raise ValueError(
                f"StructureConfig: bottleneck={self.bottleneck}, init_std={self.init_std}: need >= 1 and > 0"
            )

    @property
    def channels(self) -> tuple[str, ...]:
        """The enabled channels, in the order their rows sit in the shared table."""
        return tuple(self.enabled) if self.enabled is not None else self.schema.names


class StructureEmbedding(nn.Module):
    """Enabled channels -> bottleneck (sum of per-channel embeddings times a learned per-channel
    scale) -> zero-initialised up-projection to ``hidden_size``.

    The up-projection starts at zero, so enabling the module leaves a model's initial function
    unchanged; the channel tables start random (``init_std``, ``seed``) so that the projection gets a
    gradient from the first step. All enabled channels share one table (channel c's rows start at
    its offset), so the lookup is a single gather.
    """

    def __init__(
        self,
        config: StructureConfig,
        hidden_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"StructureEmbedding: hidden_size={hidden_size}, need >= 1")
        self.config = config
        self.schema = config.schema
        self.enabled = config.channels
        vocabs = [self.schema[n].vocab for n in self.enabled]
        starts = [sum(vocabs[:i]) for i in range(len(vocabs))]
        self.register_buffer(
            "offsets", torch.tensor(starts, dtype=torch.int64, device=device), persistent=False
        )
        self._strict = [i for i, n in enumerate(self.enabled) if self.schema[n].out_of_range == "error"]
        self._clamps = len(self._strict) < len(vocabs)
        # per channel: the bounds clamp applies ('clamp' channels; the int64 range leaves 'error'
        # channels as they are) and the vocabulary an 'error' channel is checked against
        low, high = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
        strict = set(self._strict)
        as_long = {"dtype": torch.int64, "device": device}
        self.register_buffer(
            "clamp_low",
            torch.tensor([low if i in strict else 0 for i in range(len(vocabs))], **as_long),
            persistent=False,
        )
        self.register_buffer(
            "clamp_high",
            torch.tensor([high if i in strict else v - 1 for i, v in enumerate(vocabs)], **as_long),
            persistent=False,
        )
        self.register_buffer("vocab", torch.tensor(vocabs, **as_long), persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(vocabs), config.bottleneck, device=device, dtype=dtype))
        self.scales = nn.Parameter(torch.empty(len(vocabs), device=device, dtype=dtype))
        self.up = nn.Linear(config.bottleneck, hidden_size, bias=False, device=device, dtype=dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tables N(0, init_std) from ``config.seed`` (every rank and pipeline stage that builds
        one holds the same values), scales one, up-projection zero."""
        if self.weight.is_meta:  # shapes only (parameter counts, memory plans): no values
            return
        gen = torch.Generator(device=self.weight.device).manual_seed(self.config.seed)
        self.weight.normal_(0.0, self.config.init_std, generator=gen)
        self.scales.fill_(1.0)
        self.up.weight.zero_()

    def ids(self, structure: Mapping[str, Tensor], input_ids: Tensor) -> Tensor:
        """Validate the enabled channels against input_ids and apply each channel's out-of-range
        policy: -> [..., S, C] int64 rows of the shared table."""
        missing = [n for n in self.enabled if n not in structure]
        if missing:
            raise KeyError(
                f"StructureEmbedding: channels {missing} are enabled but missing; given: {sorted(structure)}"
            )
        for name in self.enabled:
            values = structure[name]
            if values.shape != input_ids.shape:
                raise ValueError(
                    f"structure channel {name!r}: shape {tuple(values.shape)} != input_ids shape "
                    f"{tuple(input_ids.shape)}"
                )
            if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
                raise TypeError(f"structure channel {name!r}: dtype {values.dtype}, need an integer dtype")
            if values.device != input_ids.device:
                raise ValueError(
                    f"structure channel {name!r}: on {values.device}, input_ids on {input_ids.device}"
                )
        # each out-of-range policy on all channels at once: one clamp, one check
        ids = torch.stack([structure[name].long() for name in self.enabled], dim=-1)
        if self._clamps:
            ids = ids.clamp(self.clamp_low, self.clamp_high)
        self._check_error_channels(ids)
        return ids + self.offsets

    def _check_error_channels(self, ids: Tensor) -> None:
        """Raise for values outside the vocabulary of an 'error' channel: one host sync for all
        channels, and the details only when something is wrong."""
        if not self._strict or not ids.numel():
            return
        # every channel against its vocabulary: the clamped ones are inside it already
        if not bool(((ids < 0) | (ids >= self.vocab)).any()):
            return
        for i in self._strict:
            name, values = self.enabled[i], ids[..., i]
            low, high, size = int(values.min()), int(values.max()), self.schema[name].vocab
            if low < 0 or high >= size:
                raise ValueError(
                    f"structure channel {name!r}: values span [{low}, {high}], vocabulary is [0, {size}) "
                    "and its out_of_range policy is 'error'"
                )

    def forward(self, structure: Mapping[str, Tensor], input_ids: Tensor) -> Tensor:
        """Channels (each shaped like input_ids) -> [..., S, hidden_size]."""
        vectors = nn.functional.embedding(self.ids(structure, input_ids), self.weight)  # [..., S, C, r]
        mixed = (vectors * self.scales.unsqueeze(-1)).sum(dim=-2)
        return self.up(mixed)
