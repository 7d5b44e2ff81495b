"""memory_plan at parallel layouts: its weights, gradient buffer and optimizer state against the
real sharded tensors of a tiny model built over two gloo ranks (TP=2 with sequence parallelism,
PP=2 with a tied embedding, PP=2 x 2 virtual stages, EP=2, PP=2 with multi-token prediction), its activations against what layers
built at TP=2 keep for backward, how its activation terms scale with TP, SP and the pipeline
schedule, and the one-line errors of combinations that cannot run."""

from __future__ import annotations

import re

import pytest
from helpers import saved_bytes, tiny

from nam_layout import Layout, plan_stages
from nam_runtime import dist
from nam_runtime.testing import run_ranks
from nam_spec.config import EmbeddingConfig, ModelConfig, ParallelConfig, SpecConfigError
from nam_spec.letters import LETTERS
from nam_spec.letters.base import activation_bytes, norm_bytes
from nam_spec.memory import _schedule, layer_activation_bytes, memory_estimate, memory_plan, output_bytes
from nam_spec.presets import preset

LAYOUT = Layout.tile("AEMR-", 10)
# the embedding extras too: n-gram tables split by rows over TP, the rest replicated
EXTRAS = EmbeddingConfig(ngram=True, ngram_heads=2, ngram_table_size=101, ngram_dim=4, structure=True)
# widths that TP=2 divides, as on the GPU; the whole logits at once, as measured
SMALL = preset("nam56r-small", recompute="none", loss_chunk_tokens=0)
SP2 = ParallelConfig(tensor=2, sequence_parallel=True)


def _sharded_rank(parallel: ParallelConfig, untie_output: bool, mtp_depth: int) -> dict:
    """Build this rank's model chunk(s) in megatron's DDP and distributed Adam, take one step (zero
    gradients: it creates the state) and return the bytes of the real tensors."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from nam_spec.model import build_model

    dist.initialize(
        tensor_parallel=parallel.tensor,
        pipeline_parallel=parallel.pipeline,
        expert_parallel=parallel.expert,
        seed=1,
    )
    config = tiny(params_dtype="bfloat16", untie_output=untie_output, embedding=EXTRAS, mtp_depth=mtp_depth)
    plan = plan_stages(LAYOUT, parallel.pipeline, parallel.virtual_pipeline)
    chunks = [
        build_model(LAYOUT, config, parallel, plan=plan, vp_stage=v) for v in range(parallel.virtual_pipeline)
    ]
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    ddp = [DistributedDataParallel(chunk.config, ddp_config, chunk) for chunk in chunks]
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-3, bf16=True, params_dtype=torch.bfloat16, use_distributed_optimizer=True
        ),
        ddp,
    )
    for d in ddp:
        d.zero_grad_buffer()
    opt.step()
    optimizers = getattr(opt, "chained_optimizers", [opt])
    buffers = [buf for d in ddp for buf in (*d.buffers, *d.expert_parallel_buffers)]
    return {
        "global_rank": torch.distributed.get_rank(),
        "pipeline_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "weights": sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()),
        "grads": sum(buf.grad_data.numel() * buf.grad_data.element_size() for buf in buffers),
        "optimizer_state": sum(
            t.numel() * t.element_size()
            for o in optimizers
            for state in o.optimizer.state.values()
            for name, t in state.items()
            if name in ("exp_avg", "exp_avg_sq")
        )
        + sum(
            p.numel() * p.element_size()
            for o in optimizers
            for g in o.shard_fp32_from_float16_groups
            for p in g
        ),
    }


@pytest.mark.parametrize(
    ("parallel", "untie_output", "mtp_depth"),
    [
        (SP2, True, 0),
        (ParallelConfig(pipeline=2), False, 0),  # the last stage holds its own copy of the tied embedding
        (ParallelConfig(pipeline=2, virtual_pipeline=2), True, 0),
        (ParallelConfig(expert=2), True, 0),  # data parallel 2: dense state split in two, experts not
        # multi-token prediction: the depths and a copy of the embedding (extras too) on the last
        # stage, whose word embedding serves the tied output layer
        (ParallelConfig(pipeline=2), False, 2),
        (ParallelConfig(pipeline=2), True, 1),
    ],
    ids=["tp2-sp", "pp2-tied", "pp2-vpp2", "ep2", "pp2-tied-mtp2", "pp2-mtp1"],
)
def test_static_bytes_equal_the_real_sharded_tensors(
    parallel: ParallelConfig, untie_output: bool, mtp_depth: int
) -> None:
    ranks = run_ranks(_sharded_rank, 2, parallel, untie_output, mtp_depth)
    data = 2 // (parallel.tensor * parallel.pipeline)
    plan = memory_plan(
        tiny(params_dtype="bfloat16", untie_output=untie_output, embedding=EXTRAS, mtp_depth=mtp_depth),
        LAYOUT,
        parallel,
        micro_batch_size=1,
        data_parallel=data,
    )
    for real in ranks:
        est = plan.stages[real["pipeline_rank"]]
        assert real["global_rank"] in plan.global_ranks(real["pipeline_rank"])
        assert real["weights"] == est.weights
        assert 0 <= real["grads"] - est.grads <= 0.2 * est.grads  # the buffer pads each parameter's start
        if data == 1:
            assert real["optimizer_state"] == est.optimizer_state
    if data > 1:  # the distributed optimizer's split follows the padded buffer: exact in sum
        total = sum(r["optimizer_state"] for r in ranks)
        assert 0 <= sum(e.optimizer_state for e in plan.stages) * data - total <= data
        for real in ranks:
            assert real["optimizer_state"] == pytest.approx(plan.stages[0].optimizer_state, rel=0.1)
    if parallel.pipeline == 1:
        assert ranks[0]["weights"] == ranks[1]["weights"]  # equal shards: one estimate for both


# ------------------------------------------------------------------------------------------------
# Activations: what TP, SP and the pipeline schedule do to them
# ------------------------------------------------------------------------------------------------


def _tp2(letter: str, parallel: ParallelConfig = SP2, config: ModelConfig = SMALL) -> tuple[int, int]:
    return layer_activation_bytes(config, letter, 1), layer_activation_bytes(
        config, letter, 1, "none", parallel
    )


@pytest.mark.parametrize("letter", ["M", "-"])
def test_tp2_with_sequence_parallelism_halves_mamba_and_mlp_layers(letter: str) -> None:
    one, two = _tp2(letter)
    assert 2 * two == one


def test_tp2_splits_attention_heads_but_not_the_rope_tables() -> None:
    one, two = _tp2("A")
    rope = 4 * activation_bytes(SMALL) * SMALL.seq_length * SMALL.head_dim
    assert 2 * two - one == rope
    # without sequence parallelism the pre-norm's tensors stay whole on every rank
    one, plain = _tp2("A", ParallelConfig(tensor=2))
    assert 2 * plain - one == rope + norm_bytes(SMALL, SMALL.seq_length)


def test_tp2_splits_m2rnn_value_heads_not_the_shared_qk_head() -> None:
    one, two = _tp2("R")
    r = SMALL.m2rnn
    qk = 2 * r.num_qk_heads * r.head_dim_k
    assert 2 * two - one == 2 * activation_bytes(SMALL) * SMALL.seq_length * qk  # projection and conv out


def test_tp2_experts_split_tokens_by_sequence_and_ffn_by_expert_tp() -> None:
    """Expert-TP 1: each rank routes its sequence half through whole experts, so everything halves.
    Expert-TP 2 (megatron's default): the copies of both halves meet on each rank, each computing
    half of every FFN: the permuted input [t x top_k, h] and the permuted probs stay whole."""
    one, etp1 = _tp2("E", ParallelConfig(tensor=2, sequence_parallel=True, expert_tensor=1))
    assert 2 * etp1 == one
    _, etp2 = _tp2("E")
    tk = SMALL.seq_length * SMALL.moe.top_k
    assert etp2 - etp1 == (activation_bytes(SMALL) * SMALL.hidden_size + 4) * tk // 2
    assert _tp2("E", ParallelConfig(expert=4))[1] == one  # balanced routing: EP moves tokens, keeps counts


def test_output_splits_the_vocabulary_and_the_final_norm_by_sequence() -> None:
    assert 2 * output_bytes(SMALL, 1, SP2) == output_bytes(SMALL, 1)


def _saved_at_tp2(expert_tensor: int) -> list[tuple[str, str, int, int]]:
    """(letter, policy, saved, estimated) for one layer of each letter megatron runs on CPU as on
    CUDA (A, E, '-'), built at TP=2 with sequence parallelism and run on this rank's sequence half."""
    import torch
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from nam_spec.model import build_model

    dist.initialize(tensor_parallel=2, expert_tensor_parallel=expert_tensor, seed=1)
    parallel = ParallelConfig(tensor=2, sequence_parallel=True, expert_tensor=expert_tensor)
    b, out = 2, []
    for letter in ("A", "E", "-") if expert_tensor == 2 else ("E",):
        for policy in ("none", "selective"):
            config = tiny(seq_length=64, hidden_size=64, recompute={letter: policy})
            model = build_model(Layout.tile(letter, 1), config, parallel)
            model.train()
            x = torch.randn(config.seq_length // 2, b, config.hidden_size, requires_grad=True)
            rope = model.rotary_pos_emb(config.seq_length)
            saved = saved_bytes(model.decoder.layers[0], x, attention_mask=None, rotary_pos_emb=rope)
            cpu_norm = 4 * config.seq_length // 2 * b * config.hidden_size  # CPU's rms_norm keeps x * rsqrt
            out.append(
                (
                    letter,
                    policy,
                    saved,
                    layer_activation_bytes(config, letter, b, policy, parallel) + cpu_norm,
                )
            )
            destroy_moe_metrics_tracker()
    return out


@pytest.mark.parametrize("expert_tensor", [2, 1])
def test_saved_activations_of_layers_built_at_tp2(expert_tensor: int) -> None:
    """What autograd keeps on each rank equals the estimate to a few scalars, but for E at expert-TP
    2: tiny()'s allgather dispatcher also keeps the routing probabilities (fp32) and map (bool) of
    both ranks' tokens, which the formula (of the default alltoall dispatcher) leaves out."""
    for results in run_ranks(_saved_at_tp2, 2, expert_tensor):
        for letter, policy, saved, estimated in results:
            tokens = 64 * 2  # both ranks' sequence halves x micro-batch 2
            gathered = 5 * tokens * tiny().moe.num_experts if (letter, expert_tensor) == ("E", 2) else 0
            assert 0 <= saved - estimated <= 128 + gathered, (letter, policy, saved, estimated)


def test_1f1b_rank_i_holds_pipeline_minus_i_micro_batches() -> None:
    layout = Layout.tile("AM", 8)
    per_layer = {k: layer_activation_bytes(SMALL, k, 1) for k in "AM"}
    for microbatches, held in ((8, [4, 3, 2, 1]), (2, [2, 2, 2, 1])):
        plan = memory_plan(
            SMALL, layout, ParallelConfig(pipeline=4), micro_batch_size=1, num_microbatches=microbatches
        )
        assert [e.in_flight for e in plan.stages] == [(n,) for n in held]
        for e, n in zip(plan.stages, held, strict=True):
            assert e.activations == {k: n * b for k, b in per_layer.items()}  # one A and one M a stage
        assert [e.output > 0 for e in plan.stages] == [False, False, False, True]
    default = memory_plan(SMALL, layout, ParallelConfig(pipeline=4), micro_batch_size=1)
    assert [e.in_flight for e in default.stages] == [(4,), (3,), (2,), (1,)]  # enough to fill it


def test_interleaved_schedule_follows_megatrons_table_and_warmup() -> None:
    from megatron.core.pipeline_parallel.schedules import get_schedule_table

    pp, vp, microbatches = 4, 2, 8
    for rank in range(pp):
        order = _schedule(pp, vp, rank, microbatches)
        forwards = [v for forward, v in order if forward]
        assert forwards == [v for _, v in get_schedule_table(microbatches, vp, pp)]
        warmup = next(i for i, (forward, _) in enumerate(order) if not forward) - 1
        assert warmup == 2 * (pp - rank - 1) + (vp - 1) * pp  # megatron's get_pp_rank_microbatches
        assert sorted(order) == sorted([(True, v) for v in forwards] + [(False, v) for v in forwards])
    layout = Layout.tile("AM", 8)  # 8 chunks of one layer
    plan = memory_plan(
        SMALL, layout, ParallelConfig(pipeline=4, virtual_pipeline=2), micro_batch_size=1, num_microbatches=8
    )
    assert [sum(e.in_flight) for e in plan.stages] == [11, 9, 7, 5]  # warm-up + 1
    assert plan.peak.pipeline_rank == 0 and plan.peak.total == max(e.total for e in plan.stages)


def test_full_nam56r_on_64_gpus_fits_where_one_gpu_does_not() -> None:
    nam56r = ModelConfig(params_dtype="bfloat16")
    one = memory_estimate(nam56r, nam56r.layout(), micro_batch_size=1)
    parallel = ParallelConfig(tensor=4, pipeline=4, expert=4, sequence_parallel=True)
    plan = memory_plan(
        nam56r, nam56r.layout(), parallel, micro_batch_size=1, num_microbatches=16, data_parallel=4
    )
    assert plan.world_size == 64 and plan.global_ranks(3) == range(48, 64)
    assert 0 < plan.peak.total < one.total / 8
    assert plan.peak.pipeline_rank == 0  # the first stage holds the most micro-batches


# ------------------------------------------------------------------------------------------------
# Combinations that cannot run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parallel", "kwargs", "message"),
    [
        (
            ParallelConfig(tensor=3, sequence_parallel=True),
            {},
            "num_heads 4 is not divisible by parallel.tensor 3",
        ),
        (ParallelConfig(virtual_pipeline=2), {}, "parallel.virtual_pipeline 2 needs parallel.pipeline > 1"),
        (
            ParallelConfig(pipeline=3, virtual_pipeline=4),
            {},
            "3 stages x 4 virtual = 12 chunks for 10 layers would leave a stage empty",
        ),
        (
            ParallelConfig(expert=2),
            {},
            "parallel.expert 2 x expert tensor size 1 does not divide tensor x data",
        ),
        (
            ParallelConfig(pipeline=2, virtual_pipeline=2),
            {"num_microbatches": 3},
            "3 micro-batches per step is not a multiple of parallel.pipeline 2",
        ),
        (ParallelConfig(), {"num_microbatches": 0}, "num_microbatches must be a positive integer, got 0"),
    ],
)
def test_bad_combinations_say_what_in_one_line(parallel: ParallelConfig, kwargs: dict, message: str) -> None:
    with pytest.raises(SpecConfigError, match=re.escape(message)) as err:
        memory_plan(tiny(), LAYOUT, parallel, micro_batch_size=1, **kwargs)
    assert "\n" not in str(err.value)


def test_vocabulary_must_split_over_tensor_ranks() -> None:
    with pytest.raises(SpecConfigError, match=r"model\.vocab_size 63 is not divisible by parallel\.tensor 2"):
        memory_plan(tiny(vocab_size=63), LAYOUT, SP2, micro_batch_size=1)


def test_letter_params_split_no_more_than_the_layer_holds() -> None:
    for key, block in LETTERS.items():
        p = block.params(SMALL)
        assert 0 <= p.tensor_split + p.expert <= p.total, key
