"""Resharding resume through nam-train: a checkpoint written at one parallel layout resumes at
another, and the two steps there have the losses the original layout computes for them: the first
checks the resharded weights, the second the update made from the resharded optimizer state (the
original run goes on two steps to know them). One chain of runs, each resuming the previous one's
checkpoint: 1 -> TP=2 -> PP=2 -> PP=2 x VPP=2 -> DP=2 -> 1 (2 gloo processes at most; the issue's
PP=2 -> EP=2 x DP=2 needs 4, see apps/trainer/README.md). The interleaved schedule is checked here
from the same weights as one process. A layout change with the plain optimizer exits 2 in one line."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from train_runs import losses, train_args, train_rank

from nam_trainer.cli import main
from nam_trainer.data import PreparedData

pytestmark = pytest.mark.timeout(600)

# fp32 on CPU, the same weights and rows: equal bit for bit here (measured, every layout of CHAIN);
# the margin is for sums that another machine's BLAS blocks in another order at TP=2
RELATIVE_TOLERANCE = 1e-5

# (name, processes, parallel flags)
CHAIN = (
    ("one", 1, ()),
    ("tp2", 2, ("--parallel.tensor", "2", "--parallel.sequence_parallel", "true")),
    ("pp2", 2, ("--parallel.pipeline", "2")),
    ("pp2-vpp2", 2, ("--parallel.pipeline", "2", "--parallel.virtual_pipeline", "2")),
    ("dp2", 2, ()),
    ("back-to-one", 1, ()),
)


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, prepared: PreparedData, header_slice: list[Path]
) -> tuple[list[Path], list[str]]:
    """Run CHAIN: run i resumes run i - 1's checkpoint of step i and trains steps i + 1 to i + 3 (the
    first run steps 1 to 3, the last only two), a checkpoint after each; returns the run directories
    and the checkpoint warnings of the one-process runs."""
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
            *("--training.steps", str(i + (2 if i == len(CHAIN) - 1 else 3))),
            *("--checkpoint.interval", "1", "--checkpoint.keep_last", "3"),
            *("--training.eval_interval", "100", "--model.mamba.ngroups", "2", *flags),  # 2: TP=2 splits them
        )
        if processes == 1:
            assert main(argv) == 0
        else:
            assert run_ranks(train_rank, processes, argv, timeout_s=240) == [0] * processes
        dirs.append(run_dir)
    logging.getLogger("nam_trainer.train.checkpoint").removeHandler(handler)
    return dirs, logged


def test_the_steps_after_a_resume_at_another_layout_have_the_original_losses(
    chain: tuple[list[Path], list[str]],
) -> None:
    dirs, logged = chain
    for i in range(1, len(CHAIN)):
        before, after = losses(dirs[i - 1]), losses(dirs[i])
        assert min(after) == i + 1, (CHAIN[i][0], after)
        for step in (i + 1, i + 2):  # the run before trained these two too
            assert after[step] == pytest.approx(before[step], rel=RELATIVE_TOLERANCE), (
                CHAIN[i][0],
                step,
                before,
                after,
            )
    # DP=2 -> 1: one line says what changed and where the RNG comes from
    (notice,) = [line for line in logged if "saved at another parallel layout" in line]
    assert "world_size 2 -> 1" in notice and "data_parallel 2 -> 1" in notice, notice
    assert "the RNG restarts from training.seed" in notice and "step 5" in notice, notice


def test_a_layout_change_without_the_distributed_optimizer_exits_2(
    chain: tuple[list[Path], list[str]],
    prepared: PreparedData,
    header_slice: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The DP=2 checkpoint at one process with the plain optimizer, whose param groups are stored
    per rank: refused in one line, nothing written."""
    dirs, _ = chain
    source = dirs[CHAIN.index(("dp2", 2, ()))] / "checkpoints" / "step_0000005"
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir / "checkpoints" / source.name)
    argv = train_args(
        prepared.entry.parent.parent,
        header_slice,
        run_dir,
        *("--training.steps", "6", "--model.mamba.ngroups", "2", "--parallel.distributed_optimizer", "false"),
    )
    assert main(argv) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nam-train:")]
    assert (
        "saved with another parallel layout (world_size 2 -> 1, data_parallel 2 -> 1, distributed_optimizer True -> False)"
        in line
    ), line
    assert "parallel.distributed_optimizer = true" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_0000005"]
    assert not (run_dir / "metrics.jsonl").exists() or not losses(run_dir)
