"""The `local` backend's own modules: megatron-core has no fast torch-only version of these."""

from nam_spec.local.attention import SDPAttention
from nam_spec.local.experts import GroupedExperts, grouped_linear
from nam_spec.local.norm import RMSNorm

__all__ = ["GroupedExperts", "RMSNorm", "SDPAttention", "grouped_linear"]
