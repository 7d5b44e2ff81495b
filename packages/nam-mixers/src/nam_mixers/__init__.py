"""Mamba-2 SSD, Mamba-3 and M2RNN sequence mixers with reference paths and Triton kernels."""

from nam_mixers.modules.m2rnn import M2RNN as M2RNN
from nam_mixers.modules.m2rnn import M2RNNCore as M2RNNCore
from nam_mixers.modules.mamba import MambaCore as MambaCore
from nam_mixers.modules.mamba import MambaMixer as MambaMixer
from nam_mixers.modules.mamba3 import Mamba3Core as Mamba3Core
from nam_mixers.modules.mamba3 import Mamba3Mixer as Mamba3Mixer

__version__ = "0.1.0"
