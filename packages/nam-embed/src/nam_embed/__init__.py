"""N-gram hash and code-structure embeddings for megatron-core models."""

__version__ = "0.1.0"
