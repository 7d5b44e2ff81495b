"""Mamba-2 SSD and M2RNN sequence mixers with reference paths and Triton kernels."""

from nam_mixers.modules.m2rnn import M2RNN as M2RNN
from nam_mixers.modules.m2rnn import M2RNNCore as M2RNNCore
from nam_mixers.modules.mamba import MambaCore as MambaCore
from nam_mixers.modules.mamba import MambaMixer as MambaMixer

__version__ = "0.1.0"
