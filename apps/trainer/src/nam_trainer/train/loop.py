"""The training loop: data, process set-up, resume, steps, evaluation, checkpoints, metrics.

    code = train(checked)   # 0 done or stopped by a signal (checkpoint written), 3 non-finite loss

Every rank runs the same loop; collectives decide together (the loss, a stop request), so every
rank skips, evaluates, checkpoints and stops after the same step. Rank 0 prints and logs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nam_runtime import dist
from nam_runtime.dist import World
from nam_trainer.config import Checked
from nam_trainer.data import PreparedData, prepare_data
from nam_trainer.metrics import Progress, RunLog
from nam_trainer.train.batches import Shard, TrainOrder, collate, validation_samples
from nam_trainer.train.plasticity import attach, before_forward, build_plan
from nam_trainer.train.setup import build_run, init_world, learning_rate
from nam_trainer.train.signals import StopRequest
from nam_trainer.train.step import evaluate, train_step

EXIT_OK = 0
EXIT_NONFINITE = 3
PEAK_TFLOPS = 989.0  # H200 dense bf16 datasheet (DESIGN.md; 806 measured)


def train(checked: Checked) -> int:
    """Train ``checked.config`` on this process's rank; the exit code."""
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group does not exist yet
    say: Callable[[str], None] = _stderr if rank == 0 else (lambda _m: None)
    cfg = checked.config
    data = prepare_data(cfg, log=say)
    _import_training_modules()
    world = init_world(checked)
    try:
        return _train(checked, data, world, say)
    finally:
        dist.teardown()


def _import_training_modules() -> None:
    """Load every megatron module a step touches before nam_runtime's CPU patches are installed:
    they make megatron's torch.compile'd helpers eager only in modules loaded by then (a helper
    loaded later compiles C++ with inductor on its first call, tens of seconds per process)."""
    import megatron.core.distributed
    import megatron.core.optimizer
    import megatron.core.optimizer_param_scheduler
    import megatron.core.pipeline_parallel  # noqa: F401

    import nam_spec.model
    import nam_spec.moe_metrics  # noqa: F401
    import nam_trainer.train.checkpoint  # noqa: F401


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train(checked: Checked, data: PreparedData, world: World, say: Callable[[str], None]) -> int:
    from nam_spec.accounting import model_flops_per_token
    from nam_trainer.train.checkpoint import find_latest, load_checkpoint, save_checkpoint
    from nam_trainer.train.moe import MoEMetrics

    cfg = checked.config
    t, ck = cfg.training, cfg.checkpoint
    run = build_run(checked, world)
    run_dir = Path(ck.dir).expanduser()
    state = {"step": 0, "consumed_samples": 0, "skipped_steps": 0, "consecutive_skips": 0}
    latest = find_latest(run_dir) if ck.resume else None
    if latest is not None:
        state.update(load_checkpoint(latest, run.chunks, run.optimizer, run.scheduler))
        say(f"resumed from {latest} at step {state['step']}")
    start = state["step"]
    if start >= t.steps:
        say(
            f"nothing to do: the checkpoint in {run_dir} is at step {start} of training.steps = {t.steps}; "
            "raise --training.steps to continue it, or pass another --checkpoint.dir to start afresh"
        )
        return EXIT_OK

    plan = build_plan(cfg.plasticity, run.layout, t.seed, _sequence_group(cfg.parallel.sequence_parallel))
    if plan is not None:
        attach(plan, run.chunks, start + 1)
    feed = before_forward(plan)
    moe = MoEMetrics(run.chunks, run.model, run.layout, world.device)
    shard = Shard(t.global_batch_size, t.micro_batch_size, run.dp_rank, run.dp_size)
    order = TrainOrder(len(data.train), t.seed)
    structure = run.model.embedding.structure

    def batch(split: Any, samples: list[int]) -> list[dict[str, Any]]:
        return [collate(split, rows, world.device, structure) for rows in shard.rows(samples)]

    valid = (
        [
            batch(data.validation, s)
            for s in validation_samples(data.validation, t.eval_iters, t.global_batch_size)
        ]
        if data.validation is not None
        else []
    )
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    flops_per_step = model_flops_per_token(run.model, run.layout) * tokens_per_step
    on_gpu = world.device.type == "cuda"

    rank0 = world.rank == 0
    log = RunLog(run_dir) if rank0 else None
    if log is not None:
        log.truncate_after(start)
    progress = Progress(t.steps, start, enabled=rank0)
    stop = StopRequest(world.device)
    stop.install()
    say(
        f"training {t.steps - start} steps on {world.world_size} process(es) ({run.precision}, {world.device.type}): "
        f"{tokens_per_step:,} tokens per step; run directory {run_dir}"
    )

    def validate(step: int) -> None:
        if not valid:
            return
        loss = evaluate(run, valid)
        moe.discard()
        if log is not None:
            log.log(step, "valid", {"loss": loss, "ppl": _ppl(loss)})
        progress.write(f"step {step}: validation loss {loss:.4f}, perplexity {_ppl(loss):.2f}")

    def checkpoint(step: int) -> Path:
        path = save_checkpoint(
            run_dir, step, run.chunks, run.optimizer, run.scheduler, dict(state), ck.keep_last
        )
        progress.write(f"step {step}: checkpoint {path}")
        return path

    try:
        if start == 0:
            validate(0)
        for step in range(start + 1, t.steps + 1):
            samples = order.global_batch(state["consumed_samples"], t.global_batch_size)
            lr = learning_rate(run)
            began = time.perf_counter()
            result = train_step(run, batch(data.train, samples), feed)
            seconds = time.perf_counter() - began
            state["step"] = step
            state["consumed_samples"] += t.global_batch_size
            metrics: dict[str, float] = {}
            if result.skipped:
                state["skipped_steps"] += 1
                state["consecutive_skips"] += 1
            else:
                state["consecutive_skips"] = 0
                if plan is not None:
                    records = plan.step(step, run.chunks, run.optimizer, metrics)
                    if records:
                        kinds = Counter(r.kind for r in records)
                        done = ", ".join(f"{kind} on {n} block(s)" for kind, n in sorted(kinds.items()))
                        progress.write(f"step {step}: plasticity: {done}")
            metrics = {f"plasticity/{k}": v for k, v in metrics.items()}
            metrics.update(moe.collect(shard.microbatches))
            tflops = flops_per_step / seconds / world.world_size / 1e12
            values = {
                "loss": result.loss,
                "lr": lr,
                "skipped_steps": state["skipped_steps"],
                "tokens_per_s": tokens_per_step / seconds,
                "tflops": tflops,
                **({"grad_norm": result.grad_norm} if result.grad_norm is not None else {}),
                **({"mfu": tflops / PEAK_TFLOPS} if on_gpu else {}),
                # the measured peak that --dry-run's memory estimate is checked against
                **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if on_gpu else {}),
                **metrics,
            }
            if log is not None:
                log.log(step, "train", values)
            progress.update(step, values)
            if result.skipped:
                progress.write(f"step {step}: loss is {result.loss}: step skipped (no optimizer update)")
                if state["consecutive_skips"] >= t.max_consecutive_skips:
                    progress.close()
                    last = find_latest(run_dir)
                    say(
                        f"nam-train: stopped at step {step}: the loss was not finite for {state['consecutive_skips']} "
                        f"consecutive steps (training.max_consecutive_skips = {t.max_consecutive_skips}; "
                        f"{state['skipped_steps']} skipped in all); those steps made no update. Last good "
                        f"checkpoint: {last if last is not None else 'none written'}. Lower training.lr, "
                        "raise training.warmup_steps or check the data, then resume from it."
                    )
                    return EXIT_NONFINITE
            if step % t.eval_interval == 0 or step == t.steps:
                validate(step)
            stopping = stop.requested()
            if state["consecutive_skips"] == 0 and (step % ck.interval == 0 or step == t.steps or stopping):
                path = checkpoint(step)
                if stopping:
                    progress.close()
                    say(
                        f"nam-train: {stop.name or 'a signal on another rank'}: stopped after step {step}; "
                        f"checkpoint {path}; the same command resumes"
                    )
                    return EXIT_OK
            elif stopping:
                progress.close()
                say(f"nam-train: stopped after step {step} during non-finite losses; no checkpoint written")
                return EXIT_OK
        progress.close()
        return EXIT_OK
    finally:
        stop.restore()
        progress.close()
        if log is not None:
            log.close()


def _sequence_group(sequence_parallel: bool) -> Any:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group() if sequence_parallel else None


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
