"""N-gram hash and code-structure embeddings for megatron-core models.

The torch modules import with torch alone; ``HybridEmbedding`` (megatron-core) and
``extract_cpp_structure`` (the ``cpp`` extra) load on first use.
"""

from typing import TYPE_CHECKING, Any

from nam_embed.hashing import PAD_ID, NgramHashConfig
from nam_embed.ngram import NgramHashEmbedding
from nam_embed.structure import CHANNELS, ChannelSpec, StructureConfig, StructureEmbedding, StructureSchema

if TYPE_CHECKING:
    from nam_embed.cpp import extract_cpp_structure
    from nam_embed.hybrid_embedding import HybridEmbedding

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "PAD_ID",
    "ChannelSpec",
    "HybridEmbedding",
    "NgramHashConfig",
    "NgramHashEmbedding",
    "StructureConfig",
    "StructureEmbedding",
    "StructureSchema",
    "extract_cpp_structure",
]

_LAZY = {"HybridEmbedding": "nam_embed.hybrid_embedding", "extract_cpp_structure": "nam_embed.cpp"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nam_embed' has no attribute {name!r}")
