"""Incremental decoding of a NamModel: a parallel prefill of the prompts, then one token per step,
with the state of each letter kept by a stand-in for its core (see decoder.py)."""

from nam_spec.decode.cores import DecodeContext, KVCacheAttention, LatentKVCache, RecurrentCore
from nam_spec.decode.decoder import Decoder

__all__ = ["DecodeContext", "Decoder", "KVCacheAttention", "LatentKVCache", "RecurrentCore"]
