"""One layer of each letter at NAM56R width on the local backend, beside megatron-core's own local
layers for A and E: forward+backward time, model TFLOP/s and peak memory.

    bash bench/gpu.sh spec

Shapes: batch 1, sequence 4096, hidden 3584, bf16 (DESIGN.md's NAM56R geometry; 56/8 heads of 64;
16 experts top-4 of FFN 896 + shared 1024, sigmoid router; Mamba state 64, head 64, 8 groups;
M2RNN 44 heads of 16, one q/k head of 64). Checks first, each against a reference with the same
weights: A (our SDPA core attention) against megatron's local layer (DotProductAttention); E (our
grouped-GEMM experts) against megatron's local SequentialMLP layer; M and R adapters against
nam-mixers' own MambaMixer / M2RNN modules on the same weights (float32, a short sequence).
Floor per row: the layer's model FLOPs (DESIGN.md: 6 x active matmul weights per token, plus 6 x seq
x heads x head_dim per token for causal attention; scans not counted) over 700 TFLOP/s, the
measured bf16 matmul median of RESULTS.md. ``model TFLOP/s`` is those FLOPs over the measured time.
"""

from __future__ import annotations

from typing import Any

from bench.report import Report
from bench.world import one_rank_world

SEQ, BATCH = 4096, 1
MATMUL_TFLOPS = 700.0


def _config(dtype: str = "bfloat16") -> Any:
    from nam_spec.presets import preset

    return preset("nam56r", params_dtype=dtype, recompute="none")


def _layer(letter: str, config: Any, spec: Any = None) -> Any:
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module

    from nam_layout import Layout
    from nam_spec.backends import local_backend
    from nam_spec.specs import layer_specs
    from nam_spec.transformer_config import transformer_config

    layout = Layout.tile("AEMR-", 5)
    spec = spec or layer_specs(local_backend(), config)[letter]
    return build_module(
        spec,
        config=transformer_config(config, layout, letter=letter),
        layer_number=1,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        add_layer_offset=False,
    ).cuda()


def _megatron_local_spec(letter: str) -> Any:
    """megatron-core's own local layer for A (DotProductAttention) and E (SequentialMLP)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    if letter == "A":
        return ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=WrappedTorchNorm,
                self_attention=ModuleSpec(
                    module=SelfAttention,
                    params={"attn_mask_type": AttnMaskType.causal},
                    submodules=SelfAttentionSubmodules(
                        linear_qkv=ColumnParallelLinear,
                        core_attention=DotProductAttention,
                        linear_proj=RowParallelLinear,
                    ),
                ),
                self_attn_bda=get_bias_dropout_add,
            ),
        )
    return ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=get_moe_module_spec(use_te=False, num_experts=16, moe_grouped_gemm=False),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def _run(layer: Any, x: Any, rope: Any) -> Any:
    out = layer(x, attention_mask=None, rotary_pos_emb=rope, packed_seq_params=None)
    return out[0] if isinstance(out, tuple) else out


def _rel(a: Any, ref: Any) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _copy_experts_to_sequential(ours: Any, theirs: Any) -> None:
    """Our [E, 2F, H] / [E, H, F] expert weights into megatron's per-expert linears."""
    import torch

    with torch.no_grad():
        for e, expert in enumerate(theirs.mlp.experts.local_experts):
            expert.linear_fc1.weight.copy_(ours.mlp.experts.fc1_weight[e])
            expert.linear_fc2.weight.copy_(ours.mlp.experts.fc2_weight[e])
        state = {k: v for k, v in ours.state_dict().items() if "experts.fc" not in k}
        missing, unexpected = theirs.load_state_dict(state, strict=False)
        assert not unexpected and all("local_experts" in k for k in missing), (missing, unexpected)


def _check_against_megatron(report: Report, letter: str, rope: Any) -> None:
    import torch

    config = _config()
    ours, theirs = _layer(letter, config), _layer(letter, config, _megatron_local_spec(letter))
    if letter == "A":
        theirs.load_state_dict(ours.state_dict())
    else:
        _copy_experts_to_sequential(ours, theirs)
    x = torch.randn(SEQ, BATCH, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        report.check(
            f"{letter} local layer vs megatron local, bf16",
            _rel(_run(ours, x, rope), _run(theirs, x, rope)),
            2e-2,
        )


def _check_mixer(report: Report, letter: str) -> None:
    """Adapter (megatron projections, sequence-first) vs the nam-mixers module, same weights, fp32,
    forward and backward at batch 2: sequence-first input reaches the cores batch-strided, which
    is how a kernel that assumes batch-major memory goes wrong (mamba-ssm's fused backward did)."""
    import torch

    from nam_mixers import M2RNN, MambaMixer

    config = _config("float32")
    layer = _layer(letter, config)
    adapter = layer.mixer
    s = 512
    x = torch.randn(s, 2, config.hidden_size, device="cuda", requires_grad=True)
    if letter == "M":
        m = config.mamba
        ref = MambaMixer(
            config.hidden_size,
            m.expand,
            m.head_dim,
            m.d_state,
            m.ngroups,
            chunk_size=m.chunk_size,
            path="reference",
        )
    else:
        r = config.m2rnn
        ref = M2RNN(
            config.hidden_size, r.num_heads, r.head_dim_k, r.head_dim_v, r.num_qk_heads, path="reference"
        )
    ref = ref.cuda()
    with torch.no_grad():
        ref.in_proj.weight.copy_(adapter.in_proj.weight)
        ref.out_proj.weight.copy_(adapter.out_proj.weight)
        ref.core.load_state_dict(adapter.core.state_dict())
        if letter == "R":
            ref.qk_proj.weight.copy_(adapter.qk_weight)
    x_ref = x.detach().transpose(0, 1).clone().requires_grad_(True)
    out, _ = adapter(x)
    expect = ref(x_ref).transpose(0, 1)
    dy = torch.randn_like(out)
    out.backward(dy)
    expect.backward(dy)
    name = f"{letter} adapter ({adapter.core.__class__.__name__} auto path) vs nam-mixers reference, b2"
    report.check(f"{name}, output", _rel(out, expect), 5e-3)
    report.check(f"{name}, input grad", _rel(x.grad, x_ref.grad.transpose(0, 1)), 5e-3)
    report.check(f"{name}, in_proj grad", _rel(adapter.in_proj.weight.grad, ref.in_proj.weight.grad), 5e-3)


def _layer_flops(letter: str) -> float:
    from nam_spec.letters import LETTERS

    config = _config()
    block = LETTERS[letter]
    return (6.0 * block.params(config).matmul_active + block.extra_flops_per_token(config)) * SEQ * BATCH


def _time(report: Report, case: str, layer: Any, letter: str, rope: Any) -> None:
    import torch

    x = torch.randn(
        SEQ, BATCH, layer.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    grad = torch.randn_like(x)

    def step() -> None:
        out = _run(layer, x, rope)
        out.backward(grad)

    flops = _layer_flops(letter)
    ms = report.time(case, step, floor_ms=flops / (MATMUL_TFLOPS * 1e12) * 1e3)
    report.rows[-1].extra["model TFLOP/s"] = flops / (ms * 1e-3) / 1e12


def main(report: Report) -> None:
    with one_rank_world():
        _bench_layers(report)


def _bench_layers(report: Report) -> None:
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    config = _config()
    rope = RotaryEmbedding(kv_channels=config.head_dim, rotary_percent=1.0)(SEQ)
    for letter in "AE":
        _check_against_megatron(report, letter, rope)
    for letter in "MR":
        _check_mixer(report, letter)
    for letter in "AEMR-":
        layer = _layer(letter, config)
        _time(report, f"{letter} nam-spec local fwd+bwd b1 s4096 bf16", layer, letter, rope)
        del layer
        torch.cuda.empty_cache()
        if letter in "AE":
            layer = _layer(letter, config, _megatron_local_spec(letter))
            _time(report, f"{letter} megatron local fwd+bwd b1 s4096 bf16", layer, letter, rope)
            del layer
            torch.cuda.empty_cache()
