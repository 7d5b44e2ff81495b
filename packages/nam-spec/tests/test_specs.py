"""Which class each slot names, per backend. The te backend is only inspected here: Transformer
Engine cannot be installed on our machines, so it is never run in these tests."""

import importlib
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from helpers import tiny
from megatron.core.models.gpt.moe_module_specs import _build_shared_experts
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.experts import TEGroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

from nam_spec.adapters import M2RNNAdapter, MambaAdapter, MixerLayer
from nam_spec.backends import local_backend, resolve_backend, te_backend, te_unavailable
from nam_spec.config import ModelConfig
from nam_spec.local import GroupedExperts, RMSNorm, SDPAttention
from nam_spec.specs import layer_specs

TE = importlib.import_module("megatron.core.extensions.transformer_engine")


def test_local_specs_name_our_modules() -> None:
    specs = layer_specs(local_backend(), tiny())
    a = specs["A"].submodules
    assert specs["A"].module is TransformerLayer and a.input_layernorm is RMSNorm
    att = a.self_attention
    assert att.module is SelfAttention and att.params["attn_mask_type"].name == "causal"
    assert att.submodules.linear_qkv is ColumnParallelLinear
    assert att.submodules.core_attention is SDPAttention
    assert att.submodules.linear_proj is RowParallelLinear
    e = specs["E"]
    assert e.module is MoETransformerLayer and e.submodules.pre_mlp_layernorm is RMSNorm
    moe = e.submodules.mlp
    assert moe.func is MoELayer and moe.keywords["submodules"].experts is GroupedExperts
    assert moe.keywords["submodules"].shared_experts.func is _build_shared_experts
    for letter, adapter in (("M", MambaAdapter), ("R", M2RNNAdapter)):
        s = specs[letter]
        assert (
            s.module is MixerLayer and s.submodules.norm is RMSNorm and s.submodules.mixer.module is adapter
        )
        assert s.submodules.mixer.params["column_linear"] is ColumnParallelLinear
    assert specs["-"].submodules.pre_mlp_layernorm is RMSNorm


def test_te_specs_name_transformer_engine_modules() -> None:
    specs = layer_specs(te_backend(check=False), tiny())
    a = specs["A"].submodules
    assert a.input_layernorm is IdentityOp  # the norm lives in TE's fused norm+linear
    assert a.self_attention.submodules.linear_qkv is TE.TELayerNormColumnParallelLinear
    assert a.self_attention.submodules.core_attention is TE.TEDotProductAttention
    assert a.self_attention.submodules.linear_proj is TE.TERowParallelLinear
    experts = specs["E"].submodules.mlp.keywords["submodules"].experts
    assert experts.func is TEGroupedMLP
    assert experts.keywords["submodules"].linear_fc1 is TE.TEColumnParallelGroupedLinear
    assert specs["E"].submodules.pre_mlp_layernorm is TE.TENorm
    assert specs["-"].submodules.mlp.keywords["submodules"].linear_fc1 is TE.TELayerNormColumnParallelLinear
    assert specs["M"].submodules.mixer.params["row_linear"] is TE.TERowParallelLinear


def test_local_is_the_default_and_te_fails_saying_why() -> None:
    assert ModelConfig().backend == "local"
    reason = te_unavailable()
    assert reason is not None and reason.startswith("importing transformer_engine.pytorch raised ")
    with pytest.raises(
        RuntimeError, match=f"Transformer Engine is not usable here: {re.escape(reason)}; use"
    ):
        resolve_backend("te")
    with pytest.raises(ValueError, match="accepted: 'local', 'te'"):
        resolve_backend("auto")


def _stand_in_te(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pytorch_source: str) -> None:
    """A ``transformer_engine`` package in sys.modules, for this test only, whose ``pytorch`` module
    runs ``pytorch_source``: TE cannot be installed on these machines, and what is checked here is
    only how its import is judged."""
    local_backend()  # megatron's modules are imported before the stand-in exists
    package = tmp_path / "transformer_engine"
    package.mkdir()
    (package / "pytorch.py").write_text(pytorch_source)
    module = types.ModuleType("transformer_engine")
    module.__path__ = [str(package)]
    monkeypatch.setitem(sys.modules, "transformer_engine", module)


@pytest.mark.parametrize(
    "error",
    [
        "OSError('libcuda.so.1: cannot open shared object file: No such file or directory')",
        "RuntimeError('Found no NVIDIA driver on your system')",
    ],
)
def test_te_whose_import_raises_is_refused_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """TE installed where there is no driver raises OSError or RuntimeError at import, not ImportError."""
    _stand_in_te(tmp_path, monkeypatch, f"raise {error}\n")
    kind, message = error.split("(", 1)
    reason = te_unavailable()
    assert reason == f"importing transformer_engine.pytorch raised {kind}: {message[1:-2]}"
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        resolve_backend("te")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given when CUDA is absent")
def test_te_that_imports_without_cuda_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in_te(tmp_path, monkeypatch, "")
    assert te_unavailable() == "CUDA is not available (torch.cuda.is_available() is False)"
