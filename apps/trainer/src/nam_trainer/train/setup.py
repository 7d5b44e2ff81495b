"""The process and the megatron-core objects a run trains: parallel state, model chunks wrapped in
megatron's DistributedDataParallel, its optimizer (Adam, distributed when configured, torch's fused
kernel with training.fused_adam, weight-decay groups from nam-spec) and its learning-rate schedule
(linear warm-up, cosine decay to min_lr).

`build_run` is the one set-up of these objects: the trainer's and bench/trainer.py's (which passes
its own `build` for megatron-core's HybridModel). It alone decides the model's precision for this
machine (`model.params_dtype = "auto"`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from nam_layout import Layout
from nam_runtime import dist
from nam_runtime.dist import World
from nam_runtime.megatron import fuse_torch_adams, import_before_enable, reset_moe_state
from nam_spec import ModelConfig
from nam_trainer.config import Checked, ConfigError

PRECISION = {"bfloat16": "bf16", "float32": "fp32"}  # what the console and metrics call them


@dataclass
class Run:
    """Everything a step needs; ``chunks`` are the DDP-wrapped model chunks of this rank."""

    world: World
    model: ModelConfig  # params_dtype decided for this machine
    layout: Layout
    chunks: list[Any]
    optimizer: Any
    scheduler: Any

    @property
    def precision(self) -> str:
        return PRECISION[self.model.params_dtype]

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()


def init_world(checked: Checked) -> World:
    """torch.distributed and megatron's parallel state from [parallel] (gloo on CPU, NCCL on GPU)."""
    # what a step loads of megatron, before dist.initialize enables nam_runtime's CPU patches
    import_before_enable("nam_spec.model", "nam_spec.moe_metrics", "nam_trainer.train.checkpoint")
    from megatron.core import parallel_state

    p = checked.config.parallel
    try:
        world = dist.initialize(
            tensor_parallel=p.tensor,
            pipeline_parallel=p.pipeline,
            expert_parallel=p.expert,
            expert_tensor_parallel=p.expert_tensor_size,  # the groups nam-spec splits the experts over
            data_parallel=checked.sizes.data,
            seed=checked.config.training.seed,
        )
    except ValueError as err:
        raise ConfigError(f"[parallel]: {err}") from err
    if p.virtual_pipeline > 1:  # get_forward_backward_func picks the interleaved schedule by it
        parallel_state.set_virtual_pipeline_model_parallel_world_size(p.virtual_pipeline)
    return world


def build_run(
    checked: Checked, world: World, build: Callable[[ModelConfig, Layout], Any] | None = None
) -> Run:
    """Model chunk(s) from nam-spec, DDP, optimizer and scheduler, as megatron's own training does.
    ``build(model_config, layout)`` makes another model of the same config in place of nam-spec's
    (a benchmark's baseline); it gets the same DDP, optimizer and schedule."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from nam_spec import build_model
    from nam_spec.param_groups import no_weight_decay

    cfg = checked.config
    t, p = cfg.training, cfg.parallel
    reset_moe_state()  # left by any model built earlier in this process (tests, benchmarks, notebooks)
    model_cfg = cfg.model.replace(params_dtype=cfg.model.dtype_name)
    bf16 = model_cfg.params_dtype == "bfloat16"
    if build is None:  # one chunk per virtual stage of nam-layout's plan (one without interleaving)
        models = [
            build_model(checked.layout, model_cfg, p, plan=checked.stages, vp_stage=v)
            for v in range(p.virtual_pipeline)
        ]
    elif p.virtual_pipeline == 1:
        models = [build(model_cfg, checked.layout)]
    else:
        raise ConfigError(
            f"parallel.virtual_pipeline = {p.virtual_pipeline}: a custom model build makes one chunk; set it to 1"
        )
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=p.distributed_optimizer
    )
    if model_cfg.cuda_graphs:
        import torch

        # layers capture on the current stream (nam_spec.graphs), which the legacy default stream
        # cannot be; set before DDP wraps the model, whose gradient accumulators keep the stream
        # current then, so the captures and the accumulators share it (megatron-core's CUDA graphs
        # train on a stream of their own too)
        torch.cuda.set_stream(torch.cuda.Stream())
    chunks = []
    for i, model in enumerate(models):
        model.to(world.device)
        if p.virtual_pipeline > 1:
            # read by the interleaved schedule and its p2p; nam-layout's plan, not megatron's even
            # split of num_layers, decides each chunk's layers, so it is set after validation
            model.config.virtual_pipeline_model_parallel_size = p.virtual_pipeline
        # as megatron's training: only the first chunk's grads overlap by buckets
        chunks.append(DistributedDataParallel(model.config, ddp_config, model, disable_bucketing=i > 0))
    tc = models[0].config  # the one the schedules read
    tc.no_sync_func = chunks[0].no_sync if len(chunks) == 1 else [c.no_sync for c in chunks]
    tc.finalize_model_grads_func = finalize_model_grads  # data-parallel reduce, expert-bias update
    if build is None and model_cfg.mtp_depth:
        tc.finalize_model_grads_func = partial(finalize_with_embedding_copies, models)
    no_decay = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name="nam_spec_no_weight_decay", fn=lambda param, name: no_weight_decay(name, param)
        )
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            bf16=bf16,
            params_dtype=model_cfg.torch_dtype,
            clip_grad=t.clip_grad,
            use_distributed_optimizer=p.distributed_optimizer,
        ),
        chunks,
        config_overrides={no_decay: {"wd_mult": 0.0}},  # nam-spec's rule replaces megatron's default
    )
    if t.fused_adam:
        fuse_torch_adams(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style="cosine",
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
    # The schedule's counter holds the step about to run (1-based): step 1 trains at the first
    # warm-up rate, not at init_lr = 0, and the last step at min_lr.
    scheduler.step(1)
    return Run(world, model_cfg, checked.layout, chunks, optimizer, scheduler)


def finalize_with_embedding_copies(models: list[Any], *args: Any, **kwargs: Any) -> None:
    """megatron's finalize_model_grads, then the sum of the embedding extras' gradients over the
    first stage and the last stage's copy (multi-token prediction), so the copies step alike."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(*args, **kwargs)
    for model in models:
        model.allreduce_embedding_copy_grads()


def learning_rate(run: Run) -> float:
    """The rate of the coming step (megatron sets it on every parameter group)."""
    return float(run.optimizer.param_groups[0]["lr"])
