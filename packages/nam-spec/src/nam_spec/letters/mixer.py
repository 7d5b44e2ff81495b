"""What the letters whose layer is a nam-mixers core behind our MixerLayer (M, R) share."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from nam_spec.config import ModelConfig
from nam_spec.letters.base import Letter

if TYPE_CHECKING:
    import torch

    from nam_spec.backends import Backend


class MixerLetter(Letter):
    """norm -> ``adapter(config)`` (a nam-mixers core between parallel projections) -> bda. The adapter's
    geometry keywords are the fields of the config section ``section`` (the same names), and
    "selective" recomputes the core, which the adapter checkpoints itself."""

    section: ClassVar[str]  # the ModelConfig field holding this letter's geometry
    selective = ("core",)
    megatron_recompute = False
    graphable = True  # mamba-ssm's and our Triton kernels: fixed shapes, no host synchronisation
    reads_segments = True

    def adapter(self, config: ModelConfig) -> type:
        raise NotImplementedError

    def geometry(self, config: ModelConfig) -> dict[str, Any]:
        """The adapter's geometry keywords: the fields of the config section."""
        return dataclasses.asdict(getattr(config, self.section))

    def spec(self, backend: Backend, config: ModelConfig) -> Any:
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.transformer.spec_utils import ModuleSpec

        from nam_spec.adapters import MixerLayer, MixerLayerSubmodules

        geometry = self.geometry(config)
        recompute_core = config.recompute_for(self.letter) == "selective"
        b = backend
        return ModuleSpec(
            module=MixerLayer,
            submodules=MixerLayerSubmodules(
                norm=b.norm,
                mixer=ModuleSpec(
                    module=self.adapter(config),
                    params={
                        "column_linear": b.column_linear,
                        "row_linear": b.row_linear,
                        **geometry,
                        "recompute_core": recompute_core,
                    },
                ),
                bda=get_bias_dropout_add,
            ),
        )

    def core(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mixer.core

    def decode_core(self, core: torch.nn.Module, context: Any) -> torch.nn.Module:
        from nam_spec.decode.cores import RecurrentCore

        return RecurrentCore(core, context)  # the convs' last inputs and the scan state

    def spec_core(self, spec: Any) -> Any:
        return spec.submodules.mixer.module
