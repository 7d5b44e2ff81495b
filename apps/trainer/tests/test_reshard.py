"""Resharding resume through nam-train: a checkpoint written at one parallel layout resumes at
another, and the first step there has the loss the original layout computes for it (the original
run goes on one step to know it). One chain of runs, each resuming the previous one's checkpoint:
1 -> TP=2 -> PP=2 -> DP=2 -> 1 (2 gloo processes at most; the issue's PP=2 -> EP=2 x DP=2 needs 4,
see apps/trainer/README.md). A layout change with the plain optimizer exits 2 in one line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from train_runs import losses, train_args, train_rank

from nam_trainer.cli import main
from nam_trainer.data import PreparedData

pytestmark = pytest.mark.timeout(600)

# fp32 on CPU: the same weights and rows, sums in another order (measured up to TOLERANCE_MEASURED)
RELATIVE_TOLERANCE = 1e-5

# (name, processes, parallel flags); each resumes the checkpoint of the step before its last
CHAIN = (
    ("one", 1, ()),
    ("tp2", 2, ("--parallel.tensor", "2", "--parallel.sequence_parallel", "true")),
    ("pp2", 2, ("--parallel.pipeline", "2")),
    ("dp2", 2, ()),
    ("back-to-one", 1, ()),
)


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, prepared: PreparedData, header_slice: list[Path]
) -> tuple[list[Path], list[str]]:
    """Run CHAIN: run i resumes run i - 1's checkpoint of step i and trains steps i + 1 and i + 2 (a
    checkpoint after each; the first run trains steps 1 and 2); returns the run directories and
    the checkpoint warnings of the one-process runs."""
    from nam_runtime.testing import run_ranks

    cache = prepared.entry.parent.parent
    dirs: list[Path] = []
    logged: list[str] = []  # the in-process runs' checkpoint warnings (rank 0's)
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("nam_trainer.train.checkpoint").addHandler(handler)
    for i, (name, processes, flags) in enumerate(CHAIN):
        run_dir = tmp_path_factory.mktemp(name)
        if dirs:
            source = dirs[-1] / "checkpoints" / f"step_{i:07d}"
            shutil.copytree(source, run_dir / "checkpoints" / source.name)
        argv = train_args(
            cache,
            header_slice,
            run_dir,
            *("--training.steps", str(i + 2), "--checkpoint.interval", "1", "--checkpoint.keep_last", "2"),
            *("--training.eval_interval", "100", "--model.mamba.ngroups", "2", *flags),  # 2: TP=2 splits them
        )
        if processes == 1:
            assert main(argv) == 0
        else:
            assert run_ranks(train_rank, processes, argv, timeout_s=240) == [0] * processes
        dirs.append(run_dir)
    logging.getLogger("nam_trainer.train.checkpoint").removeHandler(handler)
    return dirs, logged


def test_the_first_step_after_a_resume_at_another_layout_has_the_original_loss(
    chain: tuple[list[Path], list[str]],
) -> None:
    dirs, logged = chain
    for i in range(1, len(CHAIN)):
        step = i + 1  # the first step the resumed run trains; the run before trained it too
        before, after = losses(dirs[i - 1]), losses(dirs[i])
        assert sorted(after) == [step, step + 1], (CHAIN[i][0], after)
        assert after[step] == pytest.approx(before[step], rel=RELATIVE_TOLERANCE), (CHAIN[i][0], before, after)
    # DP=2 -> 1: one line says what changed and where the RNG comes from
    (notice,) = [line for line in logged if "saved at another parallel layout" in line]
    assert "world_size 2 -> 1" in notice and "data_parallel 2 -> 1" in notice, notice
    assert "the RNG restarts from training.seed" in notice and "step 4" in notice, notice
