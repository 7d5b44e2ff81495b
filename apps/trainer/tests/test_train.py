"""The training loop end to end on CPU: nam56r-tiny (shortened) learns, resumes exactly, stops
cleanly on SIGTERM, runs data-parallel over two gloo processes, skips and stops on non-finite
losses, and drives the plasticity plan."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_runs import STEPS, losses, records, train_args, train_rank

from nam_trainer.cli import main
from nam_trainer.data import PreparedData

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def cache(prepared: PreparedData) -> Path:
    """The shared data cache (conftest's slice, built once): every run here reuses it."""
    return prepared.entry.parent.parent


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, cache: Path, header_slice: list[Path]) -> Path:
    """One full run of STEPS steps (checkpoints at 5 and 10) that the other tests compare against."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert main(train_args(cache, header_slice, run_dir)) == 0
    return run_dir


def test_tiny_preset_learns(uninterrupted: Path) -> None:
    valid = losses(uninterrupted, "valid")
    assert sorted(valid) == [0, 5, STEPS]
    assert valid[STEPS] < valid[0] - 0.5, valid  # from ~ln(400) = 6.0
    assert valid[5] < valid[0]
    train = records(uninterrupted, "train")
    assert sorted(train) == list(range(1, STEPS + 1))
    last = train[STEPS]
    assert last["loss"] < train[1]["loss"] and last["skipped_steps"] == 0
    assert last["lr"] == pytest.approx(3e-4)  # cosine decay ends at min_lr
    assert train[1]["lr"] == pytest.approx(3e-3)  # one warm-up step, then the peak
    assert last["grad_norm"] > 0 and last["tokens_per_s"] > 0 and last["tflops"] > 0
    assert "mfu" not in last  # GPU only
    assert last["moe/dead_experts"] >= 0 and last["moe/max_imbalance"] >= 1.0
    assert last["moe/load_balancing_loss"] > 0
    r = records(uninterrupted, "valid")[STEPS]
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]))
    assert sorted(p.name for p in (uninterrupted / "checkpoints").glob("step_*")) == [
        "step_0000005",
        "step_0000010",
    ]


def test_tiny_preset_with_mamba3_learns(cache: Path, header_slice: list[Path], tmp_path: Path) -> None:
    """M layers as Mamba-3 (nam-mixers' reference path on CPU): four steps, and the loss falls."""
    extra = ("--model.mamba.kind", "mamba3", "--training.steps", "4", "--training.eval_interval", "4")
    assert main(train_args(cache, header_slice, tmp_path, *extra, "--checkpoint.interval", "4")) == 0
    valid, train = losses(tmp_path, "valid"), losses(tmp_path)
    assert sorted(valid) == [0, 4] and valid[4] < valid[0], valid
    assert train[4] < train[1], train


def test_resumed_run_matches_the_uninterrupted_one_bitwise(
    uninterrupted: Path, cache: Path, header_slice: list[Path], tmp_path: Path
) -> None:
    """A run that lost everything after its step-5 checkpoint resumes there and logs the same
    losses, bit for bit (fp32 on CPU), as the run that never stopped."""
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000010")
    assert main(train_args(cache, header_slice, run_dir)) == 0
    assert losses(run_dir) == losses(uninterrupted)
    assert losses(run_dir, "valid") == losses(uninterrupted, "valid")
    again = main(train_args(cache, header_slice, run_dir))  # at the last step already: nothing to do
    assert again == 0 and losses(run_dir) == losses(uninterrupted)


def test_sigterm_stops_with_a_checkpoint_and_the_run_resumes_exactly(
    uninterrupted: Path, cache: Path, header_slice: list[Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "nam_trainer", *train_args(cache, header_slice, run_dir)]
    # a world of one: not the rendezvous port an in-process run left in this process's environment
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").exists() and records(run_dir, "train")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the run ended or stalled before its first step:\n{proc.communicate()[1]}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stopped = max(records(run_dir, "train"))
    assert stopped < STEPS, "SIGTERM came too late to test anything"
    assert f"SIGTERM: stopped after step {stopped}" in err
    assert (run_dir / "checkpoints" / f"step_{stopped:07d}").is_dir()
    assert main(train_args(cache, header_slice, run_dir)) == 0
    assert losses(run_dir) == losses(uninterrupted)


SHORT = ("--training.steps", "3", "--training.eval_interval", "3")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, cache: Path, header_slice: list[Path]) -> Path:
    """Three steps on one process: the curve the parallel layouts below must follow."""
    run_dir = tmp_path_factory.mktemp("one")
    assert main(train_args(cache, header_slice, run_dir, *SHORT)) == 0
    return run_dir


def _follows(one: Path, other: Path, rel: float) -> None:
    """Same steps, train and validation losses within ``rel``."""
    for split in ("train", "valid"):
        a, b = losses(one, split), losses(other, split)
        assert sorted(a) == sorted(b)
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=rel), (split, a, b)


@pytest.mark.parametrize(
    ("layout", "rel"),
    [
        # data-parallel 2, the distributed optimizer sharded over both: fp32 sums in another order
        pytest.param((), 1e-4, id="dp2"),
        # Pipeline layouts are not here: megatron seeds each pipeline rank's initialisation apart, so
        # their curves start from other weights. test_reshard.py starts PP=2 and PP=2 x VPP=2 from a
        # one-process checkpoint and checks their steps bit for bit instead.
    ],
)
def test_two_processes_follow_the_one_process_curve(
    one_process: Path,
    cache: Path,
    header_slice: list[Path],
    tmp_path: Path,
    layout: tuple[str, ...],
    rel: float,
) -> None:
    """The same global batch of 4 rows: one process runs 2 micro-batches of 2; DP=2 ranks one each;
    PP=2 runs both through megatron's 1F1B schedule."""
    from nam_runtime.testing import run_ranks

    two = tmp_path / "two"
    argv = train_args(cache, header_slice, two, *SHORT, *layout)
    assert run_ranks(train_rank, 2, argv, timeout_s=240) == [0, 0]
    _follows(one_process, two, rel)
    assert (two / "checkpoints" / "step_0000003").is_dir()


def test_non_finite_losses_are_skipped_then_stop_the_run(
    cache: Path, header_slice: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A learning rate of 1e30 (no warm-up) makes the first update overflow the weights: later
    losses are NaN, those steps make no update, and two in a row end the run with exit 3 with the
    step-1 checkpoint (written before the losses went bad) the newest."""
    from nam_trainer.train.checkpoint import find_latest

    run_dir = tmp_path / "run"
    extra = (
        *("--training.lr", "1e30", "--training.min_lr", "0", "--training.warmup_steps", "0"),
        *("--training.max_consecutive_skips", "2", "--checkpoint.interval", "1"),
    )
    assert main(train_args(cache, header_slice, run_dir, *extra)) == 3
    err = capsys.readouterr().err
    train = records(run_dir, "train")
    assert train[1]["loss"] is not None and train[1]["skipped_steps"] == 0
    assert train[2]["loss"] is None and train[3]["loss"] is None and train[3]["skipped_steps"] == 2
    assert max(train) == 3
    assert "stopped at step 3: the loss was not finite for 2 consecutive steps" in err
    assert find_latest(run_dir) == run_dir / "checkpoints" / "step_0000001"
    assert f"Last good checkpoint: {run_dir / 'checkpoints' / 'step_0000001'}" in err


def test_plasticity_plan_and_stp_run_from_config(
    cache: Path, header_slice: list[Path], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    extra = (
        *("--training.steps", "2", "--training.eval_interval", "2"),
        *("--plasticity.stp", "true", "--plasticity.stp_lambda", "0.1"),
        *("--plasticity.redo_every", "2", "--plasticity.fire_at", "[2]", "--plasticity.fire_mode", "qk"),
    )
    assert main(train_args(cache, header_slice, run_dir, *extra)) == 0
    train = records(run_dir, "train")
    assert 0 < train[1]["plasticity/stp/loss"] <= 2 and train[1]["plasticity/stp/lambda"] == 0.1
    assert any(k.startswith("plasticity/redo/dormant_fraction/") for k in train[1])


@pytest.mark.parametrize("fused", [None, "false"], ids=["default", "foreach"])
def test_fused_adam_by_default_and_the_foreach_path_on_the_same_curve(
    fused: str | None,
    one_process: Path,
    cache: Path,
    header_slice: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """training.fused_adam: by default every torch Adam inside megatron's optimizer is fused and
    torch's fused kernel does every update; ``false`` runs the foreach path, whose losses follow the
    fused run's (fp32: per-element rounding)."""
    import torch

    from nam_runtime.megatron import inner_optimizers
    from nam_trainer.train import loop

    runs, kernel_calls = [], []
    build_run, fused_adamw = loop.build_run, torch._fused_adamw_
    monkeypatch.setattr(loop, "build_run", lambda *a, **k: runs.append(build_run(*a, **k)) or runs[-1])
    monkeypatch.setattr(
        torch, "_fused_adamw_", lambda *a, **k: kernel_calls.append(1) or fused_adamw(*a, **k)
    )
    run_dir = tmp_path / "run"
    setting = () if fused is None else ("--training.fused_adam", fused)
    assert main(train_args(cache, header_slice, run_dir, *SHORT, *setting)) == 0
    _follows(one_process, run_dir, 1e-5)
    (run,) = runs
    groups = [g for sub in inner_optimizers(run.optimizer) for g in sub.optimizer.param_groups if g["params"]]
    assert groups
    if fused is None:
        assert all(g["fused"] is True and not g["foreach"] for g in groups)
        assert len(kernel_calls) == 3 * len(groups)  # one per group and step (one device, one dtype)
    else:
        assert not any(g["fused"] for g in groups) and kernel_calls == []


def test_resume_with_redo_and_dash_matches_the_uninterrupted_run(
    cache: Path, header_slice: list[Path], tmp_path: Path
) -> None:
    """DASH (with its gradient average) and ReDo act at step 4, after a resume from step 2: their
    running averages come from the checkpoint, so the losses, ReDo's dormant fractions and the
    validation after their edits equal the uninterrupted run's, bit for bit."""
    extra = (
        *("--training.steps", "4", "--training.eval_interval", "4", "--checkpoint.interval", "2"),
        *(
            "--plasticity.dash_at",
            "[4]",
            "--plasticity.dash_alpha",
            "0.3",
            "--plasticity.redo_at",
            "[4]",
            "--plasticity.redo_tau",
            "0.5",
        ),
    )
    whole = tmp_path / "whole"
    assert main(train_args(cache, header_slice, whole, *extra)) == 0
    marker = json.loads((whole / "checkpoints" / "step_0000002" / "nam_checkpoint.json").read_text())
    assert marker["plasticity_state"] == ["dash", "redo"]
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000004")
    assert main(train_args(cache, header_slice, resumed, *extra)) == 0
    assert losses(resumed) == losses(whole)
    assert losses(resumed, "valid") == losses(whole, "valid")
    plasticity = {k: v for k, v in records(whole, "train")[3].items() if k.startswith("plasticity/redo/")}
    assert plasticity and plasticity == {
        k: v for k, v in records(resumed, "train")[3].items() if k.startswith("plasticity/redo/")
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--data.sources", "/nonexistent/corpus"],
            "data.sources[0] = '/nonexistent/corpus': no such file or directory",
        ),
        (["--training.stpes", "3"], "unknown key training.stpes (did you mean 'steps'?)"),
        (
            ["--model.mamba.kind", "mamba3", "--model.mamba.path", "fused"],
            "model.mamba.path 'fused' with model.mamba.kind 'mamba3'; accepted: 'auto', 'triton', 'reference'",
        ),
        (["--world-size", "2", "--parallel.tensor", "3"], "is not divisible by parallel.tensor 3"),
        (["--training.global_batch_size", "3"], "training.global_batch_size = 3 is not divisible by"),
        (
            [
                *("--world-size", "2", "--parallel.pipeline", "2", "--parallel.virtual_pipeline", "2"),
                "--training.global_batch_size",
                "6",
            ],
            "the interleaved schedule runs micro-batches in groups of parallel.pipeline = 2",
        ),
    ],
)
def test_bad_training_inputs_exit_2(
    extra: list[str],
    message: str,
    cache: Path,
    header_slice: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = train_args(cache, header_slice, tmp_path / "run")
    if extra[0] == "--data.sources":  # replace the slice, keep the rest
        i = argv.index("--data.sources")
        argv[i + 1] = extra[1]
        extra = []
    assert main([*argv, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_empty_corpus_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.h").write_text("")
    assert main(["--data.sources", str(tmp_path), "--data.cache_dir", str(tmp_path / "c")]) == 2
    assert "no usable text" in capsys.readouterr().err


def test_torchrun_entry_point_is_the_cli() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nam_trainer", "--help"], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0 and "--section.key VALUE" in run.stdout


# What megatron-core and torch said on every run before nam_runtime.quiet (apps/trainer/README.md).
LIBRARY_NOISE = (
    "No CUDA runtime is found",
    "SyntaxWarning",
    "Apex",
    "Transformer Engine",
    "full_param_layout",
    "async save is deprecated",
    "Warning",
)


def test_a_second_run_on_the_same_directory_exits_2_naming_the_first(
    cache: Path, header_slice: list[Path], tmp_path: Path
) -> None:
    """Two runs 2 s apart on one directory used to interleave metrics.jsonl (one crashed at its
    first save). The first holds the lock (stopped meanwhile); the second is refused in one line
    naming its pid; the first, continued, finishes whole. Its stderr holds only the run's own lines."""
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "nam_trainer",
        *train_args(cache, header_slice, run_dir, "--training.steps", "2"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # megatron compiled from source, as a fresh install is
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "nam-train.lock").exists():
            if first.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the first run ended or stalled before taking its lock:\n{first.communicate()[1]}"
                )
            time.sleep(0.1)
        # Held still while the second runs: on loaded cores the first had finished its two steps
        # (and freed the lock) before the second, still importing, reached the lock.
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr
    refusal = [line for line in second.stderr.splitlines() if line.startswith("nam-train:")]
    assert len(refusal) == 1 and f"is in use: pid {first.pid} on host" in refusal[0], second.stderr
    assert first.returncode == 0, err
    assert sorted(losses(run_dir)) == [1, 2] and sorted(losses(run_dir, "valid")) == [0, 2]
    assert not (run_dir / "nam-train.lock").exists()  # released at the end
    assert not [line for line in err.splitlines() if any(noise in line for noise in LIBRARY_NOISE)], err


def test_a_changed_tokenizer_or_data_is_refused_before_the_model_is_built(
    uninterrupted: Path,
    cache: Path,
    header_slice: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The issue's case: a copy of a finished run with another validation split trains a new BPE; it
    must not resume the old weights on new token ids. With the old tokenizer the data still differ:
    refused unless checkpoint.allow_new_data."""
    from nam_trainer.train import loop

    run_dir, cache = tmp_path / "run", shutil.copytree(cache, tmp_path / "cache")  # its new entries stay here
    shutil.copytree(uninterrupted, run_dir)
    meta = json.loads((run_dir / "checkpoints" / "step_0000010" / "nam_checkpoint.json").read_text())
    old_tokenizer = meta["trained_on"]["tokenizer"]["path"]
    other_split = ("--data.validation_fraction", "0.1")
    real_build = loop.build_run

    def no_model(*_args: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "build_run", no_model)
    assert main(train_args(cache, header_slice, run_dir, *other_split)) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "step_0000010: trained with another tokenizer" in err and "never resumed" in err
    assert f'tokenizer.path = "{old_tokenizer}"' in err

    same_tokenizer = (*other_split, "--tokenizer.path", old_tokenizer)
    assert main(train_args(cache, header_slice, run_dir, *same_tokenizer)) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "trained on other data (the documents differ" in err
    assert "checkpoint.allow_new_data = true" in err

    monkeypatch.setattr(loop, "build_run", real_build)
    allowed = (*same_tokenizer, "--checkpoint.allow_new_data", "true")
    assert main(train_args(cache, header_slice, run_dir, *allowed)) == 0  # at step 10: loads, nothing to do
    err = capsys.readouterr().err
    assert "resuming on other data than it was trained on" in err and "nothing to do" in err


def test_bit_flips_in_the_newest_checkpoint_resume_from_the_previous_one(
    uninterrupted: Path, cache: Path, header_slice: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's case: 8 bytes flipped at 29 offsets of the step-10 shard. The run resumes from
    step 5 instead (saying so), repeats the uninterrupted run bit for bit and keeps the damaged one."""
    from test_checkpoint_faults import flip_bits

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted, run_dir)
    flip_bits(run_dir / "checkpoints" / "step_0000010" / "__0_0.distcp")
    assert main(train_args(cache, header_slice, run_dir)) == 0
    err = capsys.readouterr().err
    assert "step_0000010: damaged checkpoint (__0_0.distcp does not match the sha256" in err
    assert "resuming from the previous good checkpoint, step_0000005" in err
    assert losses(run_dir) == losses(uninterrupted)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "damaged-step_0000010",
        "latest",
        "step_0000005",
        "step_0000010",
    ]


def test_tiny_preset_with_mla_attention_learns_and_generates(
    tmp_path: Path, cache: Path, header_slice: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """nam56r-tiny on the NAM56R-MLA family: its 13 attention layers are L (multi-latent); nam-train
    generate decodes the checkpoint (L's latent cache)."""
    from nam_runtime import dist

    mla = ["--model.family", "NAM56R-MLA", "--model.attention.q_lora_rank", "32"]
    mla += ["--model.attention.kv_lora_rank", "16", "--model.attention.qk_head_dim", "16"]
    mla += ["--model.attention.qk_pos_emb_head_dim", "8", "--model.attention.v_head_dim", "16"]
    short = ["--training.steps", "6", "--training.eval_interval", "6", "--checkpoint.interval", "6"]
    assert main(train_args(cache, header_slice, tmp_path, *mla, *short)) == 0
    valid = losses(tmp_path, "valid")
    assert valid[6] < valid[0] - 0.3, valid
    capsys.readouterr()
    generate = ["generate", "--checkpoint", str(tmp_path), "--prompt", "#include <", "--max-new-tokens", "4"]
    try:
        assert main([*generate, "--temperature", "0"]) == 0
    finally:
        dist.teardown()  # generate's loader keeps the world it set up
    out = capsys.readouterr().out
    assert out.startswith("#include <") and len(out) > len("#include <\n")


def test_tiny_preset_with_multi_token_prediction_learns(
    cache: Path, header_slice: list[Path], tmp_path: Path
) -> None:
    """One MTP depth: the main loss and the depth's both fall; validation scores the main head."""
    run_dir = tmp_path / "run"
    extra = ("--training.steps", "5", "--training.eval_interval", "5", "--model.mtp_depth", "1")
    assert main(train_args(cache, header_slice, run_dir, *extra)) == 0
    train, valid = records(run_dir, "train"), records(run_dir, "valid")
    assert train[5]["loss"] < train[1]["loss"] and train[5]["mtp/loss_1"] < train[1]["mtp/loss_1"]
    assert "mtp/loss_2" not in train[5] and not any(k.startswith("mtp/") for k in valid[5])
    assert valid[5]["loss"] < valid[0]["loss"]
