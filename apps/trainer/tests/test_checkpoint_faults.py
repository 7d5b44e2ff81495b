"""Checkpoints under faults, on ckpt_run's tiny model: bit flips inside a shard are caught by the
checksums and a resume falls back to the previous good checkpoint; a full disk (found before the
save, or ENOSPC from a write) ends in DiskFull with no temporary folder left and the last good
checkpoint loadable; two identical runs write identical files; SIGKILLs at random points of a save
loop never leave a state that resumes wrongly or not at all."""

from __future__ import annotations

import ctypes
import errno
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import ckpt_run
import pytest
import torch

from nam_runtime import dist
from nam_runtime.testing import free_port, run_ranks
from nam_trainer.train.checkpoint import (
    MARKER,
    CheckpointError,
    DamagedCheckpoint,
    DiskFull,
    find_latest,
    load_checkpoint,
    resume,
    save_checkpoint,
)
from nam_trainer.train.checkpoint import files as checkpoint_files


def _save(setup: ckpt_run.Setup, run_dir: Path, step: int, keep_last: int = 2) -> Path:
    return save_checkpoint(
        run_dir, step, setup.model, setup.optimizer, setup.scheduler, {"step": step}, keep_last
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _listing(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def flip_bits(shard: Path, offsets: int = 29, width: int = 8) -> None:
    """The issue's damage: `width` bytes inverted at `offsets` places spread over the file, size kept."""
    data = bytearray(shard.read_bytes())
    for i in range(offsets):
        at = (i + 1) * len(data) // (offsets + 2)
        data[at : at + width] = bytes(b ^ 0xFF for b in data[at : at + width])
    shard.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------
# Bit flips: detected, the previous good checkpoint used, the damaged one kept
# ------------------------------------------------------------------------------------------------


def _step_1_saved_then_trained(run_dir: Path) -> tuple[ckpt_run.Setup, dict[str, torch.Tensor]]:
    """One rank's tiny model: trained a step, saved as step 1 in ``run_dir``, trained a second step
    (unsaved). Returns it and its weights at step 1."""
    dist.initialize(seed=3)
    ckpt_run.seed_all(3)
    setup = ckpt_run.build(distributed_optimizer=True)
    ckpt_run.train(setup, 1)
    _save(setup, run_dir, 1)
    good = ckpt_run.weights(setup)
    ckpt_run.train(setup, 1)
    return setup, good


def _bit_flip_rank(run_dir: Path) -> dict[str, Any]:
    setup, good = _step_1_saved_then_trained(run_dir)
    damaged = _save(setup, run_dir, 2)
    flip_bits(damaged / "__0_0.distcp")

    fresh = ckpt_run.build(distributed_optimizer=True)
    try:
        load_checkpoint(damaged, fresh.model, fresh.optimizer, fresh.scheduler)
        direct = "loaded"
    except DamagedCheckpoint as exc:
        direct = str(exc)
    logged: list[str] = []
    path, state = resume(
        run_dir, fresh.model, fresh.optimizer, fresh.scheduler, lambda _p: None, logged.append
    )
    same = _same(good, ckpt_run.weights(fresh))
    after_resume = _listing(run_dir)
    ckpt_run.train(fresh, 2)
    _save(fresh, run_dir, 3)  # keep_last = 2: the good step 1 stays, the damaged one is not counted
    return {
        "direct": direct,
        "logged": logged,
        "path": path,
        "state": state,
        "same_weights": same,
        "after_resume": after_resume,
        "after_save": _listing(run_dir),
    }


def test_bit_flips_are_detected_and_the_previous_checkpoint_is_used(tmp_path: Path) -> None:
    (result,) = run_ranks(_bit_flip_rank, 1, tmp_path)
    assert "step_0000002: damaged checkpoint" in result["direct"]
    assert "__0_0.distcp does not match the sha256" in result["direct"]
    moved, fallback = result["logged"]
    assert "step_0000002: damaged checkpoint" in moved and "moved aside to damaged-step_0000002" in moved
    assert "resuming from the previous good checkpoint, step_0000001" in fallback
    assert result["path"] == tmp_path / "checkpoints" / "step_0000001" and result["state"] == {"step": 1}
    assert result["same_weights"]
    assert result["after_resume"] == ["damaged-step_0000002", "latest", "step_0000001"]
    assert result["after_save"] == ["damaged-step_0000002", "latest", "step_0000001", "step_0000003"]


# ------------------------------------------------------------------------------------------------
# A full disk: before the save, in megatron's shard writer, at the marker
# ------------------------------------------------------------------------------------------------


def _no_space(*_args: Any, **_kwargs: Any) -> Any:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_rank(run_dir: Path) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    setup, good = _step_1_saved_then_trained(run_dir)
    real_usage, real_write, real_open = shutil.disk_usage, filesystem_async._write_item, open
    full = [False]  # a write failed: from then on the disk reports no free space, as a full one does

    def usage(path: Any) -> Any:
        total, used, free = real_usage(path)
        return type(real_usage(path))(total, used, 0 if full[0] else free)

    def failing_write(*args: Any, **kwargs: Any) -> Any:
        full[0] = True
        _no_space()

    def marker_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if MARKER in Path(path).name:
            _no_space()
        return real_open(path, *args, **kwargs)

    cases = {
        "before": lambda: setattr(
            shutil, "disk_usage", lambda _p: type(real_usage(_p))(10**9, 10**9 - 1000, 1000)
        ),
        "shard write": lambda: (
            setattr(shutil, "disk_usage", usage),
            setattr(filesystem_async, "_write_item", failing_write),
        ),
        "marker write": lambda: setattr(checkpoint_files, "open", marker_open),
    }
    out: dict[str, Any] = {}
    for case, patch in cases.items():
        patch()
        try:
            _save(setup, run_dir, 2)
            out[case] = "saved"
        except DiskFull as exc:
            out[case] = str(exc)
        finally:
            shutil.disk_usage, filesystem_async._write_item = real_usage, real_write
            vars(checkpoint_files).pop("open", None)
            full[0] = False
        out[f"{case} listing"] = _listing(run_dir)
    fresh = ckpt_run.build(distributed_optimizer=True)
    state = load_checkpoint(find_latest(run_dir), fresh.model, fresh.optimizer, fresh.scheduler)
    out["loaded"] = state == {"step": 1} and _same(good, ckpt_run.weights(fresh))
    return out


def test_a_full_disk_is_one_error_and_leaves_the_last_checkpoint(tmp_path: Path) -> None:
    (result,) = run_ranks(_disk_full_rank, 1, tmp_path)
    assert "GiB free, the checkpoint of step 2 needs about" in result["before"]
    assert "nothing was written" in result["before"]
    for case in ("shard write", "marker write"):
        assert "no space left on device while writing the checkpoint of step 2" in result[case], case
    for case in ("before", "shard write", "marker write"):
        assert "the last good checkpoint, step_0000001, is intact" in result[case], case
        assert len(result[case].splitlines()) == 1
        assert result[f"{case} listing"] == ["latest", "step_0000001"], case  # no .tmp-step_0000002
    assert result["loaded"]


def test_the_cli_exits_4_on_a_full_disk(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from nam_trainer import cli
    from nam_trainer.train import loop

    def full(_checked: Any) -> int:
        raise DiskFull("/run/checkpoints: no space left on device while writing the checkpoint of step 2")

    monkeypatch.setattr(loop, "train", full)
    assert cli.main(["--checkpoint.dir", "/nonexistent"]) == cli.EXIT_NO_SPACE == 4
    assert capsys.readouterr().err == (
        "nam-train: /run/checkpoints: no space left on device while writing the checkpoint of step 2\n"
    )


# ------------------------------------------------------------------------------------------------
# Deterministic files
# ------------------------------------------------------------------------------------------------


def _twice_rank(out: Path) -> list[str]:
    dist.initialize(seed=3)
    paths = []
    for run in ("a", "b"):
        ckpt_run.seed_all(3)
        setup = ckpt_run.build(distributed_optimizer=True)
        ckpt_run.train(setup, 2)
        paths.append(str(_save(setup, out / run, 2)))
    return paths


def test_two_identical_runs_write_identical_files(tmp_path: Path) -> None:
    """Every file byte for byte, but for the two fields torch.distributed.checkpoint's .metadata
    records about the write itself (a random save_id and the directory written to), and so the
    marker's checksum of .metadata."""
    (a, b) = (Path(p) for p in run_ranks(_twice_rank, 1, tmp_path)[0])
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        x, y = (a / name).read_bytes(), (b / name).read_bytes()
        if name == ".metadata":
            x, y = (pickle.loads(v) for v in (x, y))
            x.storage_meta = y.storage_meta = None
            assert x == y
        elif name == MARKER:
            x, y = (json.loads(v) for v in (x, y))
            assert x["files"].pop(".metadata") != y["files"].pop(".metadata")
            assert x == y
        else:
            assert x == y, name


# ------------------------------------------------------------------------------------------------
# SIGKILL at random points of a save loop
# ------------------------------------------------------------------------------------------------

KILLS = 10
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
SAVES_IN_SPAN = 3  # a kill lands at a random time between a loop's start and this many saves


def _save_loop(run_dir: Path, ready: Any) -> None:
    """One process of the kill test: resume whatever is on disk and record whether it holds the
    weights of its step (the reference the loop wrote before saving that step), then train and save
    one step at a time until killed."""
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive the test's process
    dist.initialize(seed=3)
    ckpt_run.seed_all(3)
    setup = ckpt_run.build(distributed_optimizer=True)
    refs = run_dir / "refs"
    resumed = resume(run_dir, setup.model, setup.optimizer, setup.scheduler, lambda _p: None, lambda _m: None)
    if resumed is None:
        step = 0
        torch.save(ckpt_run.weights(setup), refs / "0.pt")
        _save(setup, run_dir, 0)
    else:
        step = resumed[1]["step"]
        record = {
            "resumed": step,
            "path": resumed[0].name,
            "done": max((int(p.stem) for p in refs.glob("*.done")), default=0),
            "same": _same(torch.load(refs / f"{step}.pt"), ckpt_run.weights(setup)),
        }
        with open(run_dir / "outcomes.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    ready.set()
    while True:
        step += 1
        ckpt_run.train(setup, 1)
        torch.save(ckpt_run.weights(setup), refs / "tmp.pt")
        os.replace(refs / "tmp.pt", refs / f"{step}.pt")  # the reference, whole, before the save
        _save(setup, run_dir, step)
        (refs / f"{step}.done").write_text(str(time.perf_counter()))


def _kill_loop_rank(run_dir: Path, seed: int) -> dict[str, Any]:
    """SIGKILL a save loop KILLS times at random points, each time in a new process that first
    resumes and checks what the last one left. This process never initialises torch.distributed, so
    it can fork (torch and megatron are loaded already: the children start at once)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    context = multiprocessing.get_context("fork")
    # megatron's writer starts a Manager process for its results queue at a process's first save (by
    # spawn: seconds, and left running by a SIGKILL); made here once, by fork, every loop inherits it
    get_write_results_queue("fork")
    (run_dir / "refs").mkdir(parents=True)
    rng = random.Random(seed)

    def start() -> Any:
        os.environ["MASTER_PORT"] = str(free_port())
        ready = context.Event()
        proc = context.Process(target=_save_loop, args=(run_dir, ready))
        proc.start()
        assert ready.wait(60), "the save loop did not start"
        return proc

    def stop(proc: Any) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()

    def run_until(step: int) -> float:
        """A loop run until it has saved `step`: the seconds from its start (resumed) to then."""
        proc = start()
        began = time.perf_counter()  # perf_counter: one clock for all processes
        last = run_dir / "refs" / f"{step}.done"
        while not last.exists():
            assert proc.is_alive(), "the save loop died"
            time.sleep(0.01)
        stop(proc)
        return float(last.read_text()) - began

    run_until(1)  # steps 0 and 1 on disk
    span = run_until(1 + SAVES_IN_SPAN)  # how long a resumed loop takes for SAVES_IN_SPAN saves here
    for _ in range(KILLS):
        proc = start()
        time.sleep(rng.uniform(0.0, span))
        stop(proc)
    stop(start())  # resumes and checks the last kill's state
    outcomes = [json.loads(line) for line in (run_dir / "outcomes.jsonl").read_text().splitlines()]
    return {"outcomes": outcomes, "span": span, "left": _listing(run_dir)}


def test_sigkill_at_random_points_of_a_save_loop_always_resumes_right(tmp_path: Path) -> None:
    (result,) = run_ranks(_kill_loop_rank, 1, tmp_path, 20240611, timeout_s=120)
    assert len(result["outcomes"]) == KILLS + 2  # the run that measured the span resumed too
    for outcome in result["outcomes"]:
        # never behind a save that finished, always with that step's exact weights
        assert outcome["resumed"] >= outcome["done"] and outcome["same"], result["outcomes"]
        assert outcome["path"] == f"step_{outcome['resumed']:07d}"
    assert len({o["resumed"] for o in result["outcomes"]}) > 1, result  # the kills hit different saves
    assert not [n for n in result["left"] if n.startswith(checkpoint_files.DAMAGED_PREFIX)]


def test_a_checkpoint_of_the_first_format_is_refused_saying_how_to_proceed(tmp_path: Path) -> None:
    """Checkpoints from before the checksums (format version 1) cannot be verified: refused with
    what to do, before anything is built."""
    from nam_trainer.train.checkpoint import marker

    path = tmp_path / "step_0000032"
    path.mkdir()
    (path / checkpoint_files.MARKER).write_text(json.dumps({"format": marker.FORMAT, "version": 1}))
    with pytest.raises(CheckpointError, match=r"version 1 predates the checksums.*new run directory"):
        marker.read_marker(path)
