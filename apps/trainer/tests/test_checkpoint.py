"""Checkpoints on a real nam-spec model (pattern AEMR) in megatron's DDP with megatron's Adam and
schedule: an interrupted run resumes bit for bit (DP=1, also with torch's fused AdamW; DP=2 with
EP=2 and PP=2 with the distributed optimizer; PP=2 with the plain one); pruning and `latest`; a
SIGKILL during a write; the errors for bad checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ckpt_run
import pytest
import torch

from nam_runtime import dist
from nam_runtime.testing import run_ranks
from nam_trainer.train.checkpoint import (
    MARKER,
    CheckpointError,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)

BEFORE, AFTER = 3, 3  # steps before the checkpoint, and after it in both runs


# ------------------------------------------------------------------------------------------------
# Rank functions (module level: ranks import them by name)
# ------------------------------------------------------------------------------------------------


def _resume_rank(
    run_dir: Path,
    distributed_optimizer: bool,
    bf16: bool = False,
    pipeline: int = 1,
    expert: int = 1,
    mtp_depth: int = 0,
    fused_adam: bool = False,
) -> dict[str, Any]:
    """Train BEFORE steps, save, train AFTER more; then a fresh model (other seeds, other initial
    weights) loads the checkpoint and trains AFTER steps."""
    dist.initialize(seed=3, pipeline_parallel=pipeline, expert_parallel=expert)
    ckpt_run.seed_all(3)
    setup = ckpt_run.build(
        distributed_optimizer=distributed_optimizer,
        bf16=bf16,
        pipeline=pipeline,
        expert=expert,
        mtp_depth=mtp_depth,
        fused_adam=fused_adam,
    )
    ckpt_run.train(setup, BEFORE)
    state = {"step": BEFORE, "consumed_samples": 4 * BEFORE}
    path = save_checkpoint(run_dir, BEFORE, setup.model, setup.optimizer, setup.scheduler, state, keep_last=2)
    uninterrupted = ckpt_run.train(setup, AFTER)

    ckpt_run.seed_all(1234)
    # configured with another schedule: the saved one must win, and rank 0 says so
    fresh = ckpt_run.build(
        distributed_optimizer=distributed_optimizer,
        warmup_steps=5,
        decay_steps=40,
        bf16=bf16,
        pipeline=pipeline,
        mtp_depth=mtp_depth,
        fused_adam=fused_adam,
    )
    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("nam_trainer.train.checkpoint").addHandler(handler)
    restored_state = load_checkpoint(find_latest(run_dir), fresh.model, fresh.optimizer, fresh.scheduler)
    adams = [opt.optimizer for opt in getattr(fresh.optimizer, "chained_optimizers", [fresh.optimizer])]
    steps = [(id(s["step"]), s["step"].item()) for adam in adams for s in adam.state.values()]
    step_places = {  # (on its parameter's device, dtype) of each parameter's step
        (adam.state[p]["step"].device == p.device, adam.state[p]["step"].dtype)
        for adam in adams
        for group in adam.param_groups
        for p in group["params"]
    }
    fused = {group["fused"] for adam in adams for group in adam.param_groups}
    resumed = ckpt_run.train(fresh, AFTER)
    a, b = ckpt_run.weights(setup), ckpt_run.weights(fresh)

    mismatched_state = None
    if torch.distributed.get_world_size() > 1:  # `state` must be the same on every rank
        try:
            save_checkpoint(
                run_dir, 9, fresh.model, fresh.optimizer, fresh.scheduler, {"rank": dist_rank()}, keep_last=2
            )
        except CheckpointError as exc:
            mismatched_state = str(exc)
    return {
        "path": path,
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "state": restored_state,
        "same_weights": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "embedding": {k: v for k, v in b.items() if k.startswith("embedding.")},
        "embedding_replicas": {  # first element of each embedding entry's replica id
            v.replica_id[0]
            for k, v in fresh.model[0].module.sharded_state_dict().items()
            if k.startswith("embedding.") and hasattr(v, "replica_id")
        },
        "adam_steps": steps,
        "adam_step_places": step_places,
        "fused": fused,
        "mismatched_state": mismatched_state,
        "logged": logged,
    }


def dist_rank() -> int:
    return torch.distributed.get_rank()


def _prune_rank(run_dir: Path) -> dict[str, Any]:
    dist.initialize(seed=3)
    ckpt_run.seed_all(3)
    setup = ckpt_run.build(distributed_optimizer=True)
    root = run_dir / "checkpoints"
    # before the first step (torch's Adam has no state yet), e.g. a SIGTERM right after start-up
    save_checkpoint(run_dir, 0, setup.model, setup.optimizer, setup.scheduler, {"step": 0}, keep_last=2)
    seen = [sorted(p.name for p in root.iterdir())]
    for step in (1, 2, 3, 4):
        ckpt_run.train(setup, 1)
        save_checkpoint(
            run_dir, step, setup.model, setup.optimizer, setup.scheduler, {"step": step}, keep_last=2
        )
        seen.append(sorted(p.name for p in root.iterdir()))
    # the same step again (a final save right after an interval save) replaces it
    save_checkpoint(
        run_dir, 4, setup.model, setup.optimizer, setup.scheduler, {"step": 4, "again": 1}, keep_last=2
    )
    fresh = ckpt_run.build(distributed_optimizer=True)
    again = load_checkpoint(root / "step_0000004", fresh.model, fresh.optimizer, fresh.scheduler)
    return {"seen": seen, "after_replace": sorted(p.name for p in root.iterdir()), "again": again}


def _after_kill_rank(run_dir: Path, weights_file: Path) -> dict[str, Any]:
    """Load what the killed process left; then save again (which must clear its leftovers)."""
    dist.initialize(seed=3)
    ckpt_run.seed_all(77)
    setup = ckpt_run.build(distributed_optimizer=True, hidden=KILL_HIDDEN)
    latest = find_latest(run_dir)
    state = load_checkpoint(latest, setup.model, setup.optimizer, setup.scheduler)
    saved = torch.load(weights_file)
    now = ckpt_run.weights(setup)
    same = saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    ckpt_run.train(setup, 1)
    save_checkpoint(run_dir, 5, setup.model, setup.optimizer, setup.scheduler, {"step": 5}, keep_last=3)
    return {
        "latest": latest,
        "state": state,
        "same_weights": same,
        "after_save": sorted(p.name for p in (run_dir / "checkpoints").iterdir()),
    }


def _errors_rank(run_dir: Path) -> dict[str, str]:
    """Each bad checkpoint's CheckpointError message, by case."""
    dist.initialize(seed=3)
    ckpt_run.seed_all(3)
    setup = ckpt_run.build(distributed_optimizer=True)
    ckpt_run.train(setup, 1)
    good = save_checkpoint(
        run_dir, 1, setup.model, setup.optimizer, setup.scheduler, {"step": 1}, keep_last=5
    )
    messages: dict[str, str] = {}

    def attempt(case: str, path: Path, target: ckpt_run.Setup = setup) -> None:
        try:
            load_checkpoint(path, target.model, target.optimizer, target.scheduler)
        except CheckpointError as exc:
            messages[case] = str(exc)

    attempt("wider", good, ckpt_run.build(distributed_optimizer=True, hidden=48))
    attempt("other pattern", good, ckpt_run.build(distributed_optimizer=True, pattern="AEMA"))
    attempt("plain optimizer", good, ckpt_run.build(distributed_optimizer=False))
    attempt("absent", run_dir / "checkpoints" / "step_0000777")

    def broken(step: int) -> Path:
        return save_checkpoint(
            run_dir, step, setup.model, setup.optimizer, setup.scheduler, {"step": step}, 5
        )

    no_marker = broken(2)
    (no_marker / MARKER).unlink()
    attempt("no marker", no_marker)
    bad_marker = broken(3)
    (bad_marker / MARKER).write_text("{not json")
    attempt("bad marker", bad_marker)
    no_shards = broken(4)
    for shard in no_shards.glob("*.distcp"):
        shard.unlink()
    attempt("no shards", no_shards)
    no_common = broken(5)
    (no_common / "common.pt").unlink(missing_ok=True)
    (no_common / ".metadata").unlink()
    attempt("no metadata", no_common)
    for case, state, keep in (("keep_last", {}, 0), ("tensor state", {"loss": torch.tensor(1.0)}, 2)):
        try:
            save_checkpoint(run_dir, 6, setup.model, setup.optimizer, setup.scheduler, state, keep_last=keep)
        except CheckpointError as exc:
            messages[case] = str(exc)
    return messages


# ------------------------------------------------------------------------------------------------
# Exact resume
# ------------------------------------------------------------------------------------------------


def _check_exact_resume(result: dict[str, Any], run_dir: Path) -> list[str]:
    """Checks one rank's run; returns what it logged about the schedule."""
    assert result["path"] == run_dir / "checkpoints" / f"step_{BEFORE:07d}"
    assert result["state"] == {"step": BEFORE, "consumed_samples": 4 * BEFORE}
    # losses and learning rates bit for bit (floats compared with ==)
    assert result["resumed"] == result["uninterrupted"], (result["resumed"], result["uninterrupted"])
    assert len({lr for _, lr in result["uninterrupted"]}) == AFTER  # the schedule moves: lr is tested
    assert result["same_weights"]
    # torch's Adam: one step tensor per parameter, at the saved step
    ids, values = zip(*result["adam_steps"], strict=True)
    assert len(set(ids)) == len(ids) and set(values) == {float(BEFORE)}
    return [m for m in result["logged"] if "schedule continues as saved" in m]


def _check_schedule_note(notes: list[str]) -> None:
    (note,) = notes
    assert "lr_warmup_steps 5 -> 2" in note and "lr_decay_steps 40 -> 20" in note and "max_lr" not in note


def test_exact_resume_dp1(tmp_path: Path) -> None:
    (result,) = run_ranks(_resume_rank, 1, tmp_path, False)
    _check_schedule_note(_check_exact_resume(result, tmp_path))


@pytest.mark.parametrize("distributed_optimizer", [True, False], ids=["distributed", "plain"])
def test_exact_resume_dp1_fused_adam(tmp_path: Path, distributed_optimizer: bool) -> None:
    """torch's fused AdamW (training.fused_adam) in both runs: the resume is exact, the loaded
    optimizer is fused, and each `step` is float32 on its parameter's device, where fused Adam
    reads it (on CPU that is the CPU, as unfused; on a GPU the GPU)."""
    (result,) = run_ranks(_resume_rank, 1, tmp_path, distributed_optimizer, fused_adam=True)
    _check_schedule_note(_check_exact_resume(result, tmp_path))
    assert result["fused"] == {True}
    assert result["adam_step_places"] == {(True, torch.float32)}


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="GPU only: bf16 weights, fp32 main params, CUDA RNG"
)
def test_exact_resume_bf16_on_gpu(tmp_path: Path) -> None:
    (result,) = run_ranks(_resume_rank, 1, tmp_path, True, bf16=True)
    _check_schedule_note(_check_exact_resume(result, tmp_path))


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    run_dir = tmp_path_factory.mktemp("dp2")
    # DP=2 with the experts split over the two ranks (EP=2): the dense parameters' distributed
    # optimizer shards over DP, the experts' over their own (size 1) data-parallel group
    return run_dir, run_ranks(_resume_rank, 2, run_dir, True, expert=2, timeout_s=180)


def test_exact_resume_dp2_ep2_distributed_optimizer(dp2_run: tuple[Path, list[dict[str, Any]]]) -> None:
    run_dir, (rank0, rank1) = dp2_run
    _check_schedule_note(_check_exact_resume(rank0, run_dir))
    assert _check_exact_resume(rank1, run_dir) == []  # only rank 0 logs
    assert rank0["uninterrupted"] == rank1["uninterrupted"]
    assert "differs between rank 0" in rank0["mismatched_state"] and "ranks [1]" in rank0["mismatched_state"]


@pytest.mark.parametrize("distributed_optimizer", [True, False], ids=["distributed", "plain"])
def test_exact_resume_pp2(tmp_path: Path, distributed_optimizer: bool) -> None:
    """Two pipeline stages (AE | MR): each rank saves its own stage's tensors, optimizer groups
    and RNG; the second stage has no expert parameters, so no expert optimizer state."""
    rank0, rank1 = run_ranks(_resume_rank, 2, tmp_path, distributed_optimizer, pipeline=2, timeout_s=180)
    _check_schedule_note(_check_exact_resume(rank0, tmp_path))
    assert _check_exact_resume(rank1, tmp_path) == []
    assert rank0["uninterrupted"] == rank1["uninterrupted"]


def test_exact_resume_pp2_with_multi_token_prediction(tmp_path: Path) -> None:
    """One MTP depth at PP=2: the last stage holds the depth and a copy of the embedding (n-gram
    tables included) marked as a replica of the first stage's, so megatron's checkpoint validation
    passes; the run resumes bit for bit and both stages' embeddings stay equal."""
    rank0, rank1 = run_ranks(_resume_rank, 2, tmp_path, True, pipeline=2, mtp_depth=1, timeout_s=180)
    _check_schedule_note(_check_exact_resume(rank0, tmp_path))
    assert _check_exact_resume(rank1, tmp_path) == []
    assert (rank0["embedding_replicas"], rank1["embedding_replicas"]) == ({0}, {1})  # one main replica
    first, last = rank0["embedding"], rank1["embedding"]
    assert "embedding.ngram.weight" in first and first.keys() == last.keys()
    assert all(torch.equal(first[k], last[k]) for k in first)


# ------------------------------------------------------------------------------------------------
# Finding, pruning, replacing
# ------------------------------------------------------------------------------------------------


def _fake(root: Path, name: str, complete: bool = True) -> Path:
    path = root / name
    path.mkdir(parents=True)
    if complete:
        (path / MARKER).write_text("{}")
    return path


def test_find_latest_skips_temporary_and_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert find_latest(tmp_path) is None
    _fake(root, "step_0000010")
    newest = _fake(root, "step_0000020")
    _fake(root, ".tmp-step_0000030")
    _fake(root, ".tmp-step_0000040", complete=False)
    _fake(root, "step_0000050", complete=False)  # no completion marker
    (root / "step_0000060").write_text("a file, not a checkpoint")
    assert find_latest(tmp_path) == newest
    (root / "latest").write_text("step_0000010\n")  # the pointer wins when it names a complete one
    assert find_latest(tmp_path) == root / "step_0000010"
    (root / "latest").write_text("step_0000050\n")  # ... and is ignored when it does not
    assert find_latest(tmp_path) == newest
    (root / "latest").write_text("../elsewhere\n")
    assert find_latest(tmp_path) == newest
    _fake(tmp_path / "outside", "step_0000099")
    (root / "latest").write_text("../outside/step_0000099\n")  # only checkpoints of this run
    assert find_latest(tmp_path) == newest


def test_keep_last_prunes_and_latest_points_at_the_newest(tmp_path: Path) -> None:
    (result,) = run_ranks(_prune_rank, 1, tmp_path)
    assert result["seen"] == [
        ["latest", "step_0000000"],
        ["latest", "step_0000000", "step_0000001"],
        ["latest", "step_0000001", "step_0000002"],
        ["latest", "step_0000002", "step_0000003"],
        ["latest", "step_0000003", "step_0000004"],
    ]
    assert result["after_replace"] == ["latest", "step_0000003", "step_0000004"]
    assert result["again"] == {"step": 4, "again": 1}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000004\n"
    meta = json.loads((tmp_path / "checkpoints" / "step_0000004" / MARKER).read_text())
    assert (
        meta["step"] == 4 and meta["parallel"]["data_parallel"] == 1 and len(meta["model_fingerprint"]) == 64
    )


# ------------------------------------------------------------------------------------------------
# A kill during a write
# ------------------------------------------------------------------------------------------------

KILL_HIDDEN = 256  # large enough that the write of step 4 takes a while


def test_sigkill_during_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    run_dir, weights_file = tmp_path / "run", tmp_path / "step2.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.Popen(
        [sys.executable, ckpt_run.__file__, str(run_dir), str(weights_file), str(KILL_HIDDEN)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches megatron's writer helpers too
    )
    tmp_dir = run_dir / "checkpoints" / ".tmp-step_0000004"
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("saving step 4"), f"the save process stopped early: {line!r}"
        deadline = time.monotonic() + 60
        while not (tmp_dir.is_dir() and any(tmp_dir.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # killed mid-write: the temporary directory is there, the new checkpoint is not
    assert tmp_dir.is_dir() and not (tmp_dir / MARKER).exists()
    assert not (run_dir / "checkpoints" / "step_0000004").exists()

    (result,) = run_ranks(_after_kill_rank, 1, run_dir, weights_file)
    assert result["latest"] == run_dir / "checkpoints" / "step_0000002"
    assert result["state"] == {"step": 2}
    assert result["same_weights"]
    assert result["after_save"] == ["latest", "step_0000002", "step_0000005"]  # leftovers removed


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    (messages,) = run_ranks(_errors_rank, 1, tmp_path_factory.mktemp("errors"), timeout_s=180)
    return messages


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (
            "wider",
            ["step_0000001", "another model geometry", "changed shape", "[32] float32 -> [48] float32"],
        ),
        ("other pattern", ["another model geometry", "only in the checkpoint", "only in this model"]),
        ("plain optimizer", ["another parallel layout", "distributed_optimizer True -> False"]),
        ("absent", ["step_0000777", "no such checkpoint directory", "find_latest"]),
        ("no marker", ["step_0000002", "incomplete checkpoint", MARKER]),
        ("bad marker", ["step_0000003", "unreadable checkpoint metadata", "earlier checkpoint"]),
        ("no shards", ["step_0000004", "damaged checkpoint", "earlier checkpoint"]),
        ("no metadata", ["step_0000005", "damaged checkpoint"]),
        ("keep_last", ["keep_last = 0", "at least 1"]),
        ("tensor state", ["state['loss'] is a Tensor", "plain values", ".item()"]),
    ],
)
def test_bad_checkpoints_raise_clear_errors(errors: dict[str, str], case: str, expected: list[str]) -> None:
    assert case in errors, f"{case}: no CheckpointError was raised"
    for text in expected:
        assert text in errors[case], (case, errors[case])
