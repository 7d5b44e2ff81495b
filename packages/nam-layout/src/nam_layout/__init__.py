"""The NAM pattern contract: grammar, tiling to depth, families, pipeline stages, megatron translation.

Pure standard library; see the package README for the grammar and the CLI.
"""

from nam_layout.families import BUILTIN, Family, FamilyError, FamilyRegistry, get_family, load_families
from nam_layout.grammar import CUT, LETTERS, VARIANTS, PatternError, letter_name, split_segments
from nam_layout.layout import MAX_DEPTH, Layout, LayoutError
from nam_layout.megatron import MEGATRON_SYMBOLS, to_megatron
from nam_layout.stages import DEFAULT_COSTS, CostModel, StagePlan, plan_stages

__version__ = "0.1.0"

__all__ = [
    "BUILTIN",
    "CUT",
    "DEFAULT_COSTS",
    "LETTERS",
    "MAX_DEPTH",
    "MEGATRON_SYMBOLS",
    "VARIANTS",
    "CostModel",
    "Family",
    "FamilyError",
    "FamilyRegistry",
    "Layout",
    "LayoutError",
    "PatternError",
    "StagePlan",
    "get_family",
    "letter_name",
    "load_families",
    "plan_stages",
    "split_segments",
    "to_megatron",
]
