"""Mamba-2 SSD and M2RNN sequence mixers with reference paths and Triton kernels."""

__version__ = "0.1.0"
from nam_mixers.modules.m2rnn import M2RNN, M2RNNCore  # noqa: E402
