"""The Mamba-3 SISO mixer core: a pure-PyTorch chunked reference beside mamba-ssm's Triton kernels."""

from nam_mixers.ops.mamba3.chunked import mamba3_chunked
from nam_mixers.ops.mamba3.core import CHOICES, CORES, PATHS, check_available, cu_seqlens_of, resolve_path
from nam_mixers.ops.mamba3.inputs import (
    Mamba3Inputs,
    Mamba3Shape,
    Mamba3Weights,
    prepare,
    rotary_angles,
    rotate,
)
from nam_mixers.ops.mamba3.step import Mamba3State, mamba3_final_state, mamba3_step

__all__ = [
    "CHOICES",
    "CORES",
    "PATHS",
    "Mamba3Inputs",
    "Mamba3Shape",
    "Mamba3State",
    "Mamba3Weights",
    "check_available",
    "cu_seqlens_of",
    "mamba3_chunked",
    "mamba3_final_state",
    "mamba3_step",
    "prepare",
    "resolve_path",
    "rotary_angles",
    "rotate",
]
