"""The Mamba-2 SSD mixer core: a pure-PyTorch chunked reference beside mamba-ssm's kernels."""

from nam_mixers.ops.conv import causal_conv1d_torch
from nam_mixers.ops.ssd.backends import CHOICES, PATHS, check_available, resolve_path
from nam_mixers.ops.ssd.chunked import ssd_chunked
from nam_mixers.ops.ssd.core import CORES, SSDShape, SSDWeights
from nam_mixers.ops.ssd.norm import gated_rmsnorm_torch

__all__ = [
    "CHOICES",
    "CORES",
    "PATHS",
    "SSDShape",
    "SSDWeights",
    "causal_conv1d_torch",
    "check_available",
    "gated_rmsnorm_torch",
    "resolve_path",
    "ssd_chunked",
]
