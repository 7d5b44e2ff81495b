"""E: the mixture-of-experts layer (megatron's MoETransformerLayer and MoELayer).

    norm -> MoELayer (fp32 TopKRouter, routed experts per backend, optional shared expert) -> bda

The local backend's routed experts are nam-spec's grouped-GEMM ``GroupedExperts`` (megatron's
only grouped class needs TE); the shared expert is megatron's MLP.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.base import Letter, LetterParams, activation_bytes, sequence_shard
from nam_spec.letters.mlp import swiglu_bytes

if TYPE_CHECKING:
    import torch

    from nam_spec.backends import Backend


class Experts(Letter):
    letter = "E"
    name = "mixture of experts"
    selective = ("moe_act",)
    graphable = True

    def spec(self, backend: Backend, config: ModelConfig) -> Any:
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.models.gpt.moe_module_specs import _build_shared_experts
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
        from megatron.core.transformer.spec_utils import ModuleSpec
        from megatron.core.transformer.transformer_layer import (
            MoETransformerLayer,
            TransformerLayerSubmodules,
        )

        from nam_spec.local.dispatcher import LocalDispatchMoELayer

        b = backend
        moe_layer = LocalDispatchMoELayer if config.moe.dispatcher == "local" else MoELayer
        shared = partial(
            _build_shared_experts,
            submodules=MLPSubmodules(linear_fc1=b.column_linear, linear_fc2=b.row_linear),
        )
        return ModuleSpec(
            module=MoETransformerLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=b.norm,
                mlp=partial(moe_layer, submodules=MoESubmodules(experts=b.experts, shared_experts=shared)),
                mlp_bda=get_bias_dropout_add,
            ),
        )

    def core(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.mlp.experts

    def spec_core(self, spec: Any) -> Any:
        core = spec.submodules.mlp.keywords["submodules"].experts
        return getattr(core, "func", core)

    def summary(self, config: ModelConfig) -> str:
        m = config.moe
        shared = f", shared {m.shared_ffn_hidden_size}" if m.shared_ffn_hidden_size else ""
        return (
            f"MoE {m.num_experts} experts top-{m.top_k} (FFN {m.ffn_hidden_size}{shared}, {m.score_function})"
        )

    def params(self, config: ModelConfig) -> LetterParams:
        h, m = config.hidden_size, config.moe
        experts = m.num_experts * 3 * m.ffn_hidden_size * h  # fc1 [2F, h] + fc2 [h, F] per expert
        shared = 3 * m.shared_ffn_hidden_size * h
        router = m.num_experts * h
        mm = experts * m.top_k // m.num_experts + shared + router
        # the shared expert is column/row-parallel over TP; router and pre-norm are replicated
        return LetterParams(experts + shared + router + h, mm + h, mm, tensor_split=shared, expert=experts)

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        # Balanced routing: the router sees the rank's sequence shard (t); its top-k copies go to the
        # experts' ranks over EP (as many arrive as leave) and are gathered over the expert-TP group,
        # whose ranks each compute FFN / expert-TP of every copy (tx of them)
        a, m, h = activation_bytes(config), config.moe, config.hidden_size
        etp = parallel.expert_tensor_size
        t, e = sequence_shard(tokens, parallel), m.num_experts
        tk, tx, f = t * m.top_k, t * m.top_k * etp, m.ffn_hidden_size // etp
        # router (fp32): two sigmoid outputs (routing, aux loss), the probs' transposed copy, the bool
        # routing map; top-k indices twice (int64), the gathered top-k scores and their sums
        router = 3 * 4 * t * e + t * e + 2 * 8 * tk + 4 * tk + 2 * 4 * t
        permutation = 8 * tk + 4 * tx  # sorted indices (int64), permuted probs (fp32)
        permuted = a * tx * h  # the experts' sorted input (saved by fc1's grouped_mm)
        fc1 = a * tx * 2 * f  # gate and up, kept by the SwiGLU
        swiglu = 2 * a * tx * f  # silu(gate), silu(gate) * up; the moe_act checkpoint drops both
        fc2_in = a * tx * f  # SwiGLU x prob, fc2's input
        # megatron's MLP over the whole sequence (its fc1 gathers it), as the '-' letter's
        shared = swiglu_bytes(config, tokens, m.shared_ffn_hidden_size // parallel.tensor)
        experts = permuted + fc1 + (0 if policy == "selective" else swiglu) + fc2_in
        return router + permutation + experts + shared

    def graph_problems(self, config: ModelConfig) -> list[str]:
        if config.moe.dispatcher == "local":
            return []
        return [
            f"a CUDA graph of {self.letter} needs model.moe.dispatcher = 'local' (got "
            f"{config.moe.dispatcher!r}, which reads token counts back to the host inside the layer)"
        ]

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        m, tp, etp = config.moe, parallel.tensor, parallel.expert_tensor_size
        out = []
        if m.num_experts < 1:
            out.append(f"model.moe.num_experts is {m.num_experts}: E layers need at least one expert")
        elif not 1 <= m.top_k <= m.num_experts:
            out.append(f"model.moe.top_k {m.top_k} must lie in 1..model.moe.num_experts ({m.num_experts})")
        elif m.num_experts % parallel.expert:
            out.append(
                f"model.moe.num_experts {m.num_experts} is not divisible by parallel.expert {parallel.expert}"
            )
        if m.ffn_hidden_size < 1 or m.shared_ffn_hidden_size < 0:
            out.append("model.moe.ffn_hidden_size must be >= 1 and model.moe.shared_ffn_hidden_size >= 0")
        else:
            if m.ffn_hidden_size % etp:
                out.append(
                    f"model.moe.ffn_hidden_size {m.ffn_hidden_size} is not divisible by the expert tensor "
                    f"parallel size {etp}"
                )
            if m.shared_ffn_hidden_size % tp:
                out.append(
                    f"model.moe.shared_ffn_hidden_size {m.shared_ffn_hidden_size} is not divisible by "
                    f"parallel.tensor {tp}"
                )
        for key, value, accepted in (
            ("score_function", m.score_function, ("softmax", "sigmoid")),
            ("load_balancing", m.load_balancing, ("aux_loss", "seq_aux_loss", "none")),
            ("dispatcher", m.dispatcher, ("alltoall", "allgather", "local")),
        ):
            if value not in accepted:
                out.append(f"model.moe.{key} {value!r}; accepted: {', '.join(map(repr, accepted))}")
        if m.dispatcher == "local" and (tp, parallel.expert, etp) != (1, 1, 1):
            out.append(
                f"model.moe.dispatcher 'local' with parallel.tensor {tp}, parallel.expert {parallel.expert}, "
                f"expert tensor size {etp}: it needs all three 1; otherwise use 'alltoall' or 'allgather'"
            )
        if m.aux_loss_coeff < 0:
            out.append(f"model.moe.aux_loss_coeff {m.aux_loss_coeff} must be >= 0")
        if tp > 1 and not parallel.sequence_parallel:
            out.append(
                "E layers with parallel.tensor > 1 need parallel.sequence_parallel = true "
                "(megatron-core's MoE token dispatch requires it)"
            )
        return out

    def transformer_config_fields(self, config: ModelConfig, parallel: ParallelConfig) -> dict[str, Any]:
        m = config.moe
        return {
            "num_moe_experts": m.num_experts,
            "moe_router_topk": m.top_k,
            "moe_ffn_hidden_size": m.ffn_hidden_size,
            "moe_shared_expert_intermediate_size": m.shared_ffn_hidden_size or None,
            "moe_router_score_function": m.score_function,
            "moe_router_enable_expert_bias": m.expert_bias,
            "moe_router_dtype": "fp32",
            "moe_aux_loss_coeff": m.aux_loss_coeff if m.load_balancing != "none" else 0.0,
            "moe_router_load_balancing_type": m.load_balancing,
            # megatron knows only its own dispatchers: 'local' builds its all-to-all one, which
            # LocalDispatchMoELayer replaces
            "moe_token_dispatcher_type": "alltoall" if m.dispatcher == "local" else m.dispatcher,
            "expert_model_parallel_size": parallel.expert,
            "expert_tensor_parallel_size": parallel.expert_tensor_size,
            "moe_grouped_gemm": True,  # both backends run grouped experts (and megatron gates 'moe_act' on it)
            "moe_router_topk_scaling_factor": None,
        }
