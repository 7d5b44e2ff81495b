"""nam-mixers' cores behind megatron-core's layer protocol (sequence-first, TP-split heads), and
megatron's multi-latent attention behind our stack's conventions."""

from nam_spec.adapters.latent_attention import LatentAttention
from nam_spec.adapters.layer import MixerLayer, MixerLayerSubmodules
from nam_spec.adapters.m2rnn import M2RNNAdapter
from nam_spec.adapters.mamba import Mamba3Adapter, MambaAdapter

__all__ = [
    "LatentAttention",
    "M2RNNAdapter",
    "Mamba3Adapter",
    "MambaAdapter",
    "MixerLayer",
    "MixerLayerSubmodules",
]
