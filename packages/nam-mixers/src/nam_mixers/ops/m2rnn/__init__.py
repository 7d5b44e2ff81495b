"""M2RNN scan: Triton forward and backward kernels, the per-step PyTorch reference, path selection."""

from nam_mixers.ops.m2rnn.config import M2RNNKernelConfig, PassConfig
from nam_mixers.ops.m2rnn.reference import m2rnn_scan_reference
from nam_mixers.ops.m2rnn.scan import m2rnn_scan, resolve_path
from nam_mixers.ops.triton_paths import PATHS

__all__ = ["PATHS", "M2RNNKernelConfig", "PassConfig", "m2rnn_scan", "m2rnn_scan_reference", "resolve_path"]
