import torch
from megatron_models import config, transformer_layer

from nam_plasticity import find_blocks


def test_attention_and_swiglu_blocks_of_a_megatron_layer(megatron_tp1: None) -> None:
    layer = transformer_layer(config())
    blocks = {b.name: b for b in find_blocks([layer])}
    assert sorted(blocks) == [
        "mlp.linear_fc1.weight[gate]",
        "mlp.linear_fc1.weight[up]",
        "mlp.linear_fc2.weight",
        "self_attention.linear_proj.weight",
        "self_attention.linear_qkv.weight[k]",
        "self_attention.linear_qkv.weight[q]",
        "self_attention.linear_qkv.weight[v]",
    ]
    assert blocks["self_attention.linear_qkv.weight[q]"].global_shape == (32, 32)
    assert blocks["self_attention.linear_qkv.weight[k]"].global_shape == (16, 32)
    assert blocks["mlp.linear_fc1.weight[gate]"].global_shape == (48, 32)
    qk = [b.part for b in find_blocks([layer], mode="qk")]
    assert sorted(qk) == ["k", "q"]


def test_qkv_rows_are_the_ones_megatron_splits_into_q_k_v(megatron_tp1: None) -> None:
    layer = transformer_layer(config())
    attn = layer.self_attention
    x = torch.randn(5, 2, 32)
    q, k, v = attn.get_query_key_value_tensors(x)[:3]
    blocks = {b.part: b for b in find_blocks([layer]) if b.role == "attn_qkv"}
    w = attn.linear_qkv.weight.detach()
    for part, ref in (("q", q), ("k", k), ("v", v)):
        mine = x @ blocks[part].matrix(w).T  # [s, b, heads * head_dim] in head order
        assert torch.allclose(mine, ref.reshape(5, 2, -1), atol=1e-6), part


def test_router_embedding_output_and_norms_are_never_blocks(megatron_tp1: None) -> None:
    cfg = config(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_grouped_gemm=False)
    layer = transformer_layer(cfg, moe=True)
    names = [b.name for b in find_blocks([layer])]
    assert not any("router" in n or "norm" in n for n in names)
    experts = [n for n in names if "local_experts" in n]
    assert len(experts) == 4 * 3  # gate, up and fc2 of each expert, each its own block


def test_names_use_global_layer_and_expert_indices(megatron_tp1: None) -> None:
    from nam_plasticity.naming import global_names

    cfg = config(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_grouped_gemm=False)
    layer = transformer_layer(cfg, moe=True)
    layer.layer_number = 8  # as on a later pipeline stage
    holder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([layer])})
    layer.mlp.local_expert_indices = [4, 5, 6, 7]  # as on the second of two expert-parallel ranks
    names = global_names(holder)
    assert (
        names["layers.0.mlp.experts.local_experts.1.linear_fc2"]
        == "layers.7.mlp.experts.local_experts.5.linear_fc2"
    )
    assert names["layers.0.self_attention.linear_qkv"] == "layers.7.self_attention.linear_qkv"
