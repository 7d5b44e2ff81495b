"""The training loop: data, process set-up, resume, steps, evaluation, checkpoints, metrics; each part
lives in its own module (setup, state, step, step_metrics, checkpoint, plasticity, signals).

    code = train(checked)   # 0 done or stopped by a signal (checkpoint written), 2 the run directory
                            # is held by another run, 3 non-finite loss

Every rank runs the same loop; collectives decide together (the loss, a stop request), so every
rank skips, evaluates, checkpoints and stops after the same step. Rank 0 prints and logs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from nam_runtime import dist
from nam_runtime.dist import World
from nam_trainer.config import Checked
from nam_trainer.data import PreparedData, prepare_data
from nam_trainer.train.batches import Shard, TrainOrder, collate, validation_samples
from nam_trainer.train.checkpoint import check_trained_on, find_latest, resume, save_checkpoint
from nam_trainer.train.plasticity import attach, before_forward, build_plan
from nam_trainer.train.run_lock import RunDirBusy, RunLock
from nam_trainer.train.setup import Run, build_run, init_world, learning_rate
from nam_trainer.train.signals import StopRequest
from nam_trainer.train.state import TrainState
from nam_trainer.train.step import evaluate, train_step
from nam_trainer.train.step_metrics import StepMetrics

EXIT_OK = 0
EXIT_BUSY = 2
EXIT_NONFINITE = 3


def train(checked: Checked) -> int:
    """Train ``checked.config`` on this process's rank; the exit code."""
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group does not exist yet
    say: Callable[[str], None] = _stderr if rank == 0 else (lambda _m: None)
    cfg = checked.config
    data = prepare_data(cfg, log=say)
    world = init_world(checked)
    lock = RunLock(Path(cfg.checkpoint.dir).expanduser())
    try:
        if not _hold(lock, world, say):
            return EXIT_BUSY
        return _train(checked, data, world, say)
    finally:
        lock.release()  # nothing on the ranks that do not hold it
        dist.teardown()


def _hold(lock: RunLock, world: World, say: Callable[[str], None]) -> bool:
    """Rank 0 takes the run directory's lock for the job, before any rank writes there; every
    rank learns whether it did (a broadcast), so all of them go on or all stop."""
    held = 1.0
    if world.rank == 0:
        try:
            lock.acquire(say)
        except RunDirBusy as busy:
            say(f"nam-train: {busy}")
            held = 0.0
    flag = torch.tensor([held], device=world.device)
    if torch_dist.is_initialized():
        torch_dist.broadcast(flag, src=0)
    return bool(flag.item())


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train(checked: Checked, data: PreparedData, world: World, say: Callable[[str], None]) -> int:
    cfg = checked.config
    t, ck = cfg.training, cfg.checkpoint
    run_dir = Path(ck.dir).expanduser()
    trained_on = data.trained_on()
    newest = find_latest(run_dir) if ck.resume else None
    if newest is not None:  # its marker only: a changed tokenizer or data fails before the model is built
        check_trained_on(newest, trained_on, ck.allow_new_data)

    def check(path: Path) -> None:
        note = check_trained_on(path, trained_on, ck.allow_new_data)
        if note is not None:
            say(f"nam-train: {note}")

    run = build_run(checked, world)
    saved_config = dataclasses.replace(cfg, model=run.model).to_dict()  # the precision it trained in
    plan = build_plan(cfg.plasticity, run.layout, t.seed, _sequence_group(cfg.parallel.sequence_parallel))
    if plan is not None:
        attach(plan, run.chunks)  # before the resume: it restores what the hooks accumulate
    state = TrainState()
    resumed = (
        resume(run_dir, run.chunks, run.optimizer, run.scheduler, check, say, plan, t.seed)
        if newest is not None
        else None
    )
    if resumed is not None:
        state = TrainState.restored(*resumed)
        say(f"resumed from {resumed[0]} at step {state.step}")
    start = state.step
    if start >= t.steps:
        say(
            f"nothing to do: the checkpoint in {run_dir} is at step {start} of training.steps = {t.steps}; "
            "raise --training.steps to continue it, or pass another --checkpoint.dir to start afresh"
        )
        return EXIT_OK
    if plan is not None and plan.stp is not None:
        plan.stp.set_step(start + 1)  # the next forward belongs to the next step
    feed = before_forward(plan)
    shard = Shard(t.global_batch_size, t.micro_batch_size, run.dp_rank, run.dp_size)
    masking = cfg.data.document_masking
    trains = [s.train for s in data.sources]
    order = TrainOrder([len(split) for split in trains], [s.weight for s in data.sources], t.seed)
    valid = [
        [
            _micro_batches(run, shard, masking, [s.validation], batch)
            for batch in validation_samples(0, s.validation, t.eval_iters, t.global_batch_size)
        ]
        for s in data.sources
        if s.validation is not None
    ]
    weights = [s.weight for s in data.sources if s.validation is not None]
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    metrics = StepMetrics(run, run_dir, t.steps, start, tokens_per_step, shard.microbatches)
    stop = StopRequest(world.device)
    stop.install()
    say(
        f"training {t.steps - start} steps on {world.world_size} process(es) ({run.precision}, {world.device.type}): "
        f"{tokens_per_step:,} tokens per step; run directory {run_dir}"
    )
    try:
        if start == 0 and valid:
            metrics.validation(0, *_evaluate_sources(run, valid, weights))
        for step in range(start + 1, t.steps + 1):
            micro = _micro_batches(
                run, shard, masking, trains, order.global_batch(state.consumed_samples, t.global_batch_size)
            )
            lr = learning_rate(run)
            began = time.perf_counter()
            result = train_step(run, micro, feed)
            seconds = time.perf_counter() - began
            state.advance(t.global_batch_size, result.skipped)
            plasticity: dict[str, float] = {}
            if not result.skipped and plan is not None:
                records = plan.step(step, run.chunks, run.optimizer, plasticity)
                if records:
                    kinds = Counter(r.kind for r in records)
                    done = ", ".join(f"{kind} on {n} block(s)" for kind, n in sorted(kinds.items()))
                    metrics.note(f"step {step}: plasticity: {done}")
            metrics.train(step, result, lr, seconds, state.skipped_steps, plasticity)
            if result.skipped:
                metrics.note(f"step {step}: loss is {result.loss}: step skipped (no optimizer update)")
                if state.consecutive_skips >= t.max_consecutive_skips:
                    metrics.close()
                    last = find_latest(run_dir)
                    say(
                        f"nam-train: stopped at step {step}: the loss was not finite for {state.consecutive_skips} "
                        f"consecutive steps (training.max_consecutive_skips = {t.max_consecutive_skips}; "
                        f"{state.skipped_steps} skipped in all); those steps made no update. Last good "
                        f"checkpoint: {last if last is not None else 'none written'}. Lower training.lr, "
                        "raise training.warmup_steps or check the data, then resume from it."
                    )
                    return EXIT_NONFINITE
            if valid and (step % t.eval_interval == 0 or step == t.steps):
                metrics.validation(step, *_evaluate_sources(run, valid, weights))
            stopping = stop.requested()
            if state.consecutive_skips == 0 and (step % ck.interval == 0 or step == t.steps or stopping):
                path = save_checkpoint(
                    run_dir,
                    step,
                    run.chunks,
                    run.optimizer,
                    run.scheduler,
                    state.saved(),
                    ck.keep_last,
                    trained_on,
                    saved_config,
                    plan,
                )
                metrics.note(f"step {step}: checkpoint {path}")
                if stopping:
                    metrics.close()
                    say(
                        f"nam-train: {stop.name or 'a signal on another rank'}: stopped after step {step}; "
                        f"checkpoint {path}; the same command resumes"
                    )
                    return EXIT_OK
            elif stopping:
                metrics.close()
                say(f"nam-train: stopped after step {step} during non-finite losses; no checkpoint written")
                return EXIT_OK
        return EXIT_OK
    finally:
        stop.restore()
        metrics.close()


def _evaluate_sources(run: Run, valid: list[list[Any]], weights: list[float]) -> tuple[float, list[float]]:
    """The validation loss of every source, and their mean weighted as training mixes them."""
    losses = [evaluate(run, batches) for batches in valid]
    return sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights), losses


def _micro_batches(
    run: Run, shard: Shard, document_masking: bool, splits: list[Any], samples: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    """This rank's micro-batches of the global batch ``samples`` ((source, row) pairs of ``splits``),
    on its device."""
    structure = run.model.embedding.structure
    return [
        collate(splits, rows, run.world.device, structure, document_masking) for rows in shard.rows(samples)
    ]


def _sequence_group(sequence_parallel: bool) -> Any:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group() if sequence_parallel else None
