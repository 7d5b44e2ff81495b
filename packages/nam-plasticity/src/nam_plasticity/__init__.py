"""FIRE, DASH, ReDo and STP plasticity interventions for tensor-parallel megatron-core models."""

from nam_plasticity.blocks import Block, find_blocks
from nam_plasticity.dash import Dash, DashConfig, dash_scale
from nam_plasticity.fire import FireConfig, apply_fire, fire_matrices
from nam_plasticity.params import Master, resolve
from nam_plasticity.parts import Neurons, PlasticityParts, RowParts
from nam_plasticity.plan import Plan, Schedule
from nam_plasticity.polar import PolarResult, polar_factor
from nam_plasticity.records import Record
from nam_plasticity.redo import Redo, RedoConfig
from nam_plasticity.stp import STP, HiddenStateHooks, STPConfig, stp_loss

__version__ = "0.1.0"

__all__ = [
    "STP",
    "Block",
    "Dash",
    "DashConfig",
    "FireConfig",
    "HiddenStateHooks",
    "Master",
    "Neurons",
    "Plan",
    "PlasticityParts",
    "PolarResult",
    "Record",
    "Redo",
    "RedoConfig",
    "RowParts",
    "STPConfig",
    "Schedule",
    "apply_fire",
    "dash_scale",
    "find_blocks",
    "fire_matrices",
    "polar_factor",
    "resolve",
    "stp_loss",
]
