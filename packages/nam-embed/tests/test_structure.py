"""StructureSchema and StructureEmbedding: validation, out-of-range policy, math, zero-init."""

from __future__ import annotations

import pytest
import torch

from nam_embed.cpp_vocab import CATEGORIES, CHANNELS, NODE_TYPES
from nam_embed.structure import ChannelSpec, StructureConfig, StructureEmbedding, StructureSchema

SCHEMA = StructureSchema(
    (ChannelSpec("a", 5, "clamp"), ChannelSpec("b", 3, "error"), ChannelSpec("c", 4, "clamp"))
)


def _channels(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {c.name: torch.randint(0, c.vocab, shape, generator=gen) for c in SCHEMA.channels}


def test_default_schema_matches_the_cpp_vocabulary() -> None:
    schema = StructureSchema.default()
    assert schema.names == CHANNELS
    assert schema["category"].vocab == len(CATEGORIES) and schema["category"].out_of_range == "error"
    assert schema["node_type"].vocab == len(NODE_TYPES)
    assert schema["depth"].out_of_range == "clamp"


def test_schema_errors() -> None:
    with pytest.raises(ValueError, match="repeat"):
        StructureSchema((ChannelSpec("a", 2, "clamp"), ChannelSpec("a", 3, "clamp")))
    with pytest.raises(ValueError, match=r"'a': out_of_range='wrap', accepted: 'clamp' or 'error'"):
        ChannelSpec("a", 2, "wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'a': vocab=0"):
        ChannelSpec("a", 0, "clamp")
    with pytest.raises(KeyError, match=r"no channel 'z'; channels: \['a', 'b', 'c'\]"):
        StructureConfig(SCHEMA, enabled=("a", "z"))
    with pytest.raises(ValueError, match=r"enabled=\['a', 'a'\] must be non-empty and distinct"):
        StructureConfig(SCHEMA, enabled=("a", "a"))


def test_zero_at_init_then_learns() -> None:
    torch.manual_seed(0)
    module = StructureEmbedding(StructureConfig(SCHEMA, bottleneck=6), 12)
    ids = torch.zeros(2, 9, dtype=torch.long)
    out = module(_channels((2, 9)), ids)
    assert out.shape == (2, 9, 12) and not out.any()
    out.sum().backward()
    assert module.up.weight.grad.abs().sum() > 0 and not module.weight.grad.any()


def test_matches_the_definition() -> None:
    torch.manual_seed(1)
    module = StructureEmbedding(StructureConfig(SCHEMA, enabled=("c", "a"), bottleneck=5), 7)
    torch.nn.init.normal_(module.up.weight)
    module.scales.data = torch.tensor([0.5, -2.0])
    ch = _channels((3, 4), seed=2)
    out = module(ch, torch.zeros(3, 4, dtype=torch.long))
    rows_c = module.weight[:4]  # enabled order: c first, then a
    rows_a = module.weight[4:]
    want = (0.5 * rows_c[ch["c"]] - 2.0 * rows_a[ch["a"]]) @ module.up.weight.T
    torch.testing.assert_close(out, want)
    # A disabled channel is not read at all.
    del ch["b"]
    torch.testing.assert_close(module(ch, torch.zeros(3, 4, dtype=torch.long)), want)


def test_clamp_policy_maps_into_the_edge_buckets() -> None:
    module = StructureEmbedding(StructureConfig(SCHEMA, enabled=("a",)), 4)
    ids = torch.zeros(1, 4, dtype=torch.long)
    rows = module.ids({"a": torch.tensor([[-7, 0, 4, 99]])}, ids)[0, :, 0]
    assert rows.tolist() == [0, 0, 4, 4]


def test_error_policy_names_channel_and_range() -> None:
    module = StructureEmbedding(StructureConfig(SCHEMA), 4)
    ch = _channels((2, 3))
    ch["b"][1, 2] = 3
    with pytest.raises(ValueError, match=r"channel 'b': values span \[0, 3\], vocabulary is \[0, 3\)"):
        module(ch, torch.zeros(2, 3, dtype=torch.long))
    ch["b"][1, 2] = -1
    with pytest.raises(ValueError, match=r"channel 'b': values span \[-1, "):
        module(ch, torch.zeros(2, 3, dtype=torch.long))


def test_validation_names_channel_and_shapes() -> None:
    module = StructureEmbedding(StructureConfig(SCHEMA), 4)
    ids = torch.zeros(2, 3, dtype=torch.long)
    ch = _channels((2, 3))
    bad = dict(ch, c=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"channel 'c': shape \(3, 2\) != input_ids shape \(2, 3\)"):
        module(bad, ids)
    with pytest.raises(TypeError, match=r"channel 'a': dtype torch.float32, need an integer dtype"):
        module(dict(ch, a=ch["a"].float()), ids)
    with pytest.raises(ValueError, match=r"channel 'b': on meta, input_ids on cpu"):
        module(dict(ch, b=torch.zeros(2, 3, dtype=torch.long, device="meta")), ids)
    with pytest.raises(KeyError, match=r"channels \['b'\] are enabled but missing"):
        module({"a": ch["a"], "c": ch["c"]}, ids)


def test_scales_gate_channels() -> None:
    torch.manual_seed(3)
    module = StructureEmbedding(StructureConfig(SCHEMA), 6)
    torch.nn.init.normal_(module.up.weight)
    module.scales.data[1] = 0.0
    ids = torch.zeros(2, 5, dtype=torch.long)
    ch = _channels((2, 5))
    other = dict(ch, b=(ch["b"] + 1) % 3)
    torch.testing.assert_close(module(ch, ids), module(other, ids))
    module.scales.data[1] = 1.0
    assert not torch.allclose(module(ch, ids), module(other, ids))
