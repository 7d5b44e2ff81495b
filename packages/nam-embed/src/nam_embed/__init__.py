"""N-gram hash and code-structure embeddings for megatron-core models.

Importing the package loads no torch: the torch modules load on first use of their names, so that
nam-train's data workers (the C++ extractor's rows and vocabulary, for which importing torch
would cost each of them seconds) run without it. ``HybridEmbedding`` needs megatron-core and
``extract_cpp_structure`` the ``cpp`` extra.
"""

from typing import TYPE_CHECKING, Any

from nam_embed.cpp_vocab import CHANNELS

if TYPE_CHECKING:
    from nam_embed.cpp import extract_cpp_structure
    from nam_embed.hashing import PAD_ID, NgramHashConfig
    from nam_embed.hybrid_embedding import HybridEmbedding
    from nam_embed.ngram import NgramHashEmbedding
    from nam_embed.structure import ChannelSpec, StructureConfig, StructureEmbedding, StructureSchema

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

_LAZY = {
    "PAD_ID": "nam_embed.hashing",
    "NgramHashConfig": "nam_embed.hashing",
    "NgramHashEmbedding": "nam_embed.ngram",
    "ChannelSpec": "nam_embed.structure",
    "StructureConfig": "nam_embed.structure",
    "StructureEmbedding": "nam_embed.structure",
    "StructureSchema": "nam_embed.structure",
    "HybridEmbedding": "nam_embed.hybrid_embedding",
    "extract_cpp_structure": "nam_embed.cpp",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nam_embed' has no attribute {name!r}")
