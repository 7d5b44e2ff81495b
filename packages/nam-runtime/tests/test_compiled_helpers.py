"""megatron's torch.compile'd helpers run eagerly on CPU: the MoE router's expert-bias update (one
of them) trains without a single compiled frame, where inductor would spend ~20 s on C++."""

from __future__ import annotations

import gpt
import pytest
import torch

from nam_runtime import cpu, dist
from nam_runtime.testing import run_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU patches are a no-op with CUDA")


def _expert_bias_step() -> tuple[bool, int, int]:
    from megatron.core.transformer.moe.router import TopKRouter
    from torch._dynamo.utils import counters

    dist.initialize(seed=3)
    before = cpu.hits()["compile.megatron_helpers"]
    cfg = gpt.config(layers=2, moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid")
    gpt.loss(gpt.model(cfg), gpt.batch(0, 2)).backward()
    still_compiled = hasattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")
    return still_compiled, cpu.hits()["compile.megatron_helpers"] - before, counters["frames"]["total"]


def test_megatron_compiled_helpers_run_eagerly() -> None:
    ((still_compiled, eager_calls, compiled_frames),) = run_ranks(_expert_bias_step, 1)
    assert not still_compiled
    assert eager_calls >= 1  # the router's expert-bias update went through the eager original
    assert compiled_frames == 0
