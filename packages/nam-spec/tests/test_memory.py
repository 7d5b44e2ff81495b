"""memory_estimate: its breakdown, how it scales, the calibration on the H200, and the bytes of real
tensors on CPU (weights, gradient buffer and Adam state of megatron's DDP and optimizer; what A, E
and '-' layers save for backward, whose CPU paths save what their CUDA paths save)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from helpers import saved_bytes, tiny

from nam_layout import Layout
from nam_spec.accounting import model_params
from nam_spec.config import ModelConfig, SpecConfigError
from nam_spec.memory import GIB, layer_activation_bytes, memory_estimate, output_bytes, output_kept_bytes
from nam_spec.model import build_model
from nam_spec.presets import preset

NAM56R = Layout.tile("AEMEAEMEAEMR", 52)

# bench/trainer.py's model: the nam56r-small preset (hidden 2048, n-gram and structure embeddings)
# on the local backend in bf16, without recompute
SMALL = preset("nam56r-small", recompute="none", loss_chunk_tokens=0)  # whole logits, as measured
SELECTIVE = "selective"  # the preset's recompute since e4a40d3


@pytest.mark.parametrize(
    ("recompute", "micro_batch", "measured_gib"),
    [
        # torch.cuda.max_memory_allocated on the H200: bench/RESULTS.md at 1ed0f0f (no recompute), and
        # bench/trainer.py at e46b25c (selective), where micro-batches 2 and 4 ran beside 39.69 and
        # 59.14 GiB that earlier runs still held (peaks 91.2 and 127.0 GiB less those)
        ("none", 1, 44.6),
        (SELECTIVE, 1, 43.3),
        (SELECTIVE, 2, 91.2 - 39.69),
        (SELECTIVE, 4, 127.0 - 59.14),
    ],
)
def test_calibration_against_h200_measurements(recompute: str, micro_batch: int, measured_gib: float) -> None:
    config = SMALL.replace(recompute=recompute)
    est = memory_estimate(config, NAM56R, micro_batch_size=micro_batch)
    params = model_params(SMALL, NAM56R)
    assert params.total == pytest.approx(2.087e9, rel=1e-3)
    assert params.embedding_extras == pytest.approx(128.7e6, rel=1e-3)  # n-gram 500 k rows x 16, structure
    assert abs(est.total_gib - measured_gib) / measured_gib <= 0.05
    assert est.backward_peak > est.step_peak  # the loss of the last micro-batch, not Adam's step


def test_breakdown_sums_to_the_peak() -> None:
    small_vocab = SMALL.replace(vocab_size=1024, recompute={"M": "full"})
    est = memory_estimate(small_vocab, NAM56R, micro_batch_size=2)
    assert est.backward_peak == sum(b for _, b in est.rows())
    assert est.step_peak == est.weights + est.grads + est.optimizer_state + est.step_scratch + est.allowance
    assert est.total == max(est.backward_peak, est.step_peak)
    assert set(est.activations) == {"A", "E", "M", "R"}
    assert est.transient > 0  # re-running a whole M layer outgrows this small vocabulary's loss
    lines = est.table().splitlines()
    assert any(line.split()[:2] == ["activations", "E"] for line in lines)
    assert f"{est.total_gib:.2f}" in lines[-3]


@pytest.mark.parametrize("letter", list("AEMR-"))
def test_activations_scale_linearly_in_micro_batch_and_sequence(letter: str) -> None:
    """Attention is no exception: SDPA never holds the s x s scores. Only its RoPE tables do not grow
    with the micro-batch."""
    per = [layer_activation_bytes(SMALL, letter, b) for b in (1, 2, 3)]
    assert per[2] - per[1] == per[1] - per[0] > 0
    if letter != "A":
        assert per[1] == 2 * per[0]
    longer = SMALL.replace(seq_length=2 * SMALL.seq_length)
    assert layer_activation_bytes(longer, letter, 1) == 2 * per[0]


@pytest.mark.parametrize("letter", list("AEMR-"))
def test_recompute_lowers_activations(letter: str) -> None:
    none, selective, full = (
        layer_activation_bytes(SMALL, letter, 1, p) for p in ("none", "selective", "full")
    )
    assert full < selective < none
    assert full == 2 * 4096 * 2048  # the layer's input, bf16


def test_distributed_optimizer_divides_optimizer_state_over_data_parallel() -> None:
    one = memory_estimate(SMALL, NAM56R, micro_batch_size=1)
    eight = memory_estimate(SMALL, NAM56R, micro_batch_size=1, data_parallel=8)
    plain = memory_estimate(SMALL, NAM56R, micro_batch_size=1, data_parallel=8, distributed_optimizer=False)
    params = model_params(SMALL, NAM56R).total
    assert one.optimizer_state == 12 * params  # fp32 main params, Adam m and v
    assert eight.optimizer_state == -(-one.optimizer_state // 8)
    assert plain.optimizer_state == one.optimizer_state
    assert (eight.weights, eight.grads, eight.activations) == (one.weights, one.grads, one.activations)
    fp32 = memory_estimate(SMALL.replace(params_dtype="float32"), NAM56R, micro_batch_size=1)
    assert fp32.optimizer_state == 8 * params  # fp32 parameters are their own main copy


def test_full_nam56r_fits_nowhere_near_one_gpu_without_sharding() -> None:
    est = memory_estimate(ModelConfig(params_dtype="bfloat16"), NAM56R, micro_batch_size=1)
    assert 100 < est.total_gib < 150  # 5.6 B parameters x 18 bytes alone are 93 GiB
    assert est.weights == 2 * model_params(ModelConfig(), NAM56R).total


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch_size": 0}, "micro_batch_size must be a positive integer"),
        ({"micro_batch_size": 1, "data_parallel": 0}, "data_parallel must be a positive integer"),
    ],
)
def test_bad_arguments_say_what_is_accepted(kwargs: dict, message: str) -> None:
    with pytest.raises(SpecConfigError, match=message):
        memory_estimate(SMALL, NAM56R, **kwargs)


# ------------------------------------------------------------------------------------------------
# Against real tensors on CPU
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_moe_tracker() -> Iterator[None]:
    """megatron's MoE metrics tracker is global and sized by the depth of the first model that
    records into it: these models' depths must not leak into other tests'."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()
    yield
    destroy_moe_metrics_tracker()


@pytest.mark.parametrize("policy", ["none", "selective"])
@pytest.mark.parametrize("letter", list("AE-"))
def test_saved_activations_of_a_built_layer(
    letter: str, policy: str, megatron_single_rank: None, fresh_moe_tracker: None
) -> None:
    """CPU's rms_norm is not fused: it also keeps x * rsqrt, one [t, h] tensor more than CUDA's
    fused kernel (input and rstd). The rest agrees to a few scalars and [experts] counts."""
    config = tiny(seq_length=64, hidden_size=64, recompute={letter: policy})
    model = build_model(Layout.tile(letter, 1), config)
    model.train()
    b = 2
    x = torch.randn(config.seq_length, b, config.hidden_size, requires_grad=True)
    saved = saved_bytes(
        model.decoder.layers[0],
        x,
        attention_mask=None,
        rotary_pos_emb=model.rotary_pos_emb(config.seq_length),
    )
    cpu_norm = 4 * config.seq_length * b * config.hidden_size
    expected = layer_activation_bytes(config, letter, b, policy) + cpu_norm
    assert 0 <= saved - expected <= 128


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_grads_and_optimizer_state_of_a_built_model(
    dtype: str, megatron_single_rank: None, fresh_moe_tracker: None
) -> None:
    """megatron DDP (fp32 gradient buffer) and megatron's Adam (distributed optimizer, one rank)
    after one step: their tensors' bytes against the estimate's."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = tiny(params_dtype=dtype)
    layout = Layout.tile("AEMR-", 5)
    model = build_model(layout, config)
    tc = model.config
    ddp = DistributedDataParallel(
        tc, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
    )
    bf16 = dtype == "bfloat16"
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=bf16, params_dtype=tc.params_dtype, use_distributed_optimizer=True
        ),
        [ddp],
    )
    ids = torch.randint(0, config.vocab_size, (2, config.seq_length))
    ddp(ids, torch.arange(config.seq_length).expand(2, -1), labels=ids).float().mean().backward()
    opt.step()

    est = memory_estimate(config, layout, micro_batch_size=2)
    optimizers = getattr(opt, "chained_optimizers", [opt])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = [*ddp.buffers, *ddp.expert_parallel_buffers]
    grads = sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in buffers)
    adam = sum(
        t.numel() * t.element_size()
        for o in optimizers
        for state in o.optimizer.state.values()
        for name, t in state.items()
        if name in ("exp_avg", "exp_avg_sq")
    )
    main = sum(
        p.numel() * p.element_size()
        for o in optimizers
        for group in getattr(o, "shard_fp32_from_float16_groups", [])
        for p in group
    )
    assert weights == est.weights
    assert 0 <= grads - est.grads <= 0.2 * est.grads  # the buffer pads each parameter's start
    assert adam + main == est.optimizer_state
    assert (main > 0) == bf16


def test_estimate_is_pure_arithmetic() -> None:
    """No tensor is made: the full model's estimate is instant and allocation-free."""
    est = memory_estimate(ModelConfig(params_dtype="bfloat16"), NAM56R, micro_batch_size=4, data_parallel=64)
    assert dataclasses.is_dataclass(est) and est.total > 0
    assert est.total / GIB == est.total_gib


def test_chunked_loss_holds_one_chunk_of_logits() -> None:
    """Micro-batch 4 (16384 tokens, four chunks of 4096): the whole logits' 6 bytes a logit at the
    peak and the 4-byte softmax kept become one chunk's (1.5 GiB), plus the input gradient and the
    weight gradient's fp32 sum beside one chunk's product (0.9 GiB): 6 GiB become 2.4."""
    chunked = SMALL.replace(loss_chunk_tokens=4096)
    logit_bytes = 16384 * SMALL.vocab_size
    assert output_kept_bytes(SMALL, 4) - output_kept_bytes(chunked, 4) == 4 * logit_bytes - 12 * 16384
    assert output_bytes(chunked, 4) < output_bytes(SMALL, 4) - 3.5 * GIB
