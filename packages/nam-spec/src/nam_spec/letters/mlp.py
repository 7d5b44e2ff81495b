"""-: the dense SwiGLU MLP layer (megatron's MLPLayer).

    norm -> MLP (fc1 column-, fc2 row-parallel) -> bda

With the te backend the pre-norm lives inside TE's fused norm + fc1 linear.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.base import Letter, LetterParams, activation_bytes

if TYPE_CHECKING:
    import torch

    from nam_spec.backends import Backend


def swiglu_bytes(config: ModelConfig, tokens: int, ffn: int) -> int:
    """megatron's SwiGLU MLP: fc1 output [2F], silu(gate) [F], up + glu_linear_offset [F] and the
    product [F] (fc2's input)."""
    return activation_bytes(config) * tokens * 5 * ffn


class DenseMLP(Letter):
    letter = "-"
    name = "dense MLP"
    selective = ("mlp",)

    def spec(self, backend: Backend, config: ModelConfig) -> Any:
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.ssm.mlp_layer import MLPLayer
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.mlp import MLP, MLPSubmodules
        from megatron.core.transformer.spec_utils import ModuleSpec
        from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

        b = backend
        return ModuleSpec(
            module=MLPLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=IdentityOp if b.fused_norm else b.norm,
                mlp=partial(
                    MLP.as_mlp_submodule,
                    submodules=MLPSubmodules(
                        linear_fc1=b.norm_column_linear if b.fused_norm else b.column_linear,
                        linear_fc2=b.row_linear,
                    ),
                ),
                mlp_bda=get_bias_dropout_add,
            ),
        )

    def core(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mlp

    def spec_core(self, spec: Any) -> Any:
        return spec.submodules.mlp.func.__self__  # MLP.as_mlp_submodule bound to the MLP class

    def summary(self, config: ModelConfig) -> str:
        return f"dense MLP FFN {config.ffn_hidden_size}"

    def params(self, config: ModelConfig) -> LetterParams:
        mm = 3 * config.ffn_hidden_size * config.hidden_size
        return LetterParams(mm + config.hidden_size, mm + config.hidden_size, mm, tensor_split=mm, expert=0)

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        # the "mlp" checkpoint keeps none of the MLP's tensors; fc1 is column-parallel: FFN / tp a rank
        ffn = config.ffn_hidden_size // parallel.tensor
        return 0 if policy == "selective" else swiglu_bytes(config, tokens, ffn)

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        f, tp = config.ffn_hidden_size, parallel.tensor
        if f < 1:
            return [f"model.ffn_hidden_size {f} must be >= 1"]
        if f % tp:
            return [f"model.ffn_hidden_size {f} is not divisible by parallel.tensor {tp}"]
        return []
