"""Using a trained checkpoint: the loader, nam-train eval and nam-train generate on a short real
tiny-preset run; bits per byte by hand; the bad inputs (one line, exit 2)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_runs import STEPS, losses, train_args

from nam_trainer.cli import main
from nam_trainer.train.batches import validation_samples
from nam_trainer.use import load
from nam_trainer.use.evaluate import Score, score_rows
from nam_trainer.use.token_bytes import token_bytes


@pytest.fixture(scope="module", autouse=True)
def _own_world() -> Iterator[None]:
    """load() sets up a one-process world and keeps it (a notebook's session); later modules set up
    their own."""
    yield
    from nam_runtime import dist

    if dist.is_initialized():
        dist.teardown()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, prepared: object, header_slice: list[Path]) -> Path:
    run = tmp_path_factory.mktemp("use")
    cache = prepared.entry.parent.parent  # type: ignore[attr-defined]
    assert main(train_args(cache, header_slice, run)) == 0
    return run


def test_eval_gives_the_validation_loss_of_training(run_dir: Path) -> None:
    from nam_trainer.data import prepare_data

    loaded = load(run_dir)
    assert loaded.step == STEPS and not loaded.model.training
    cfg = loaded.config
    data = prepare_data(cfg, log=lambda _m: None)
    t = cfg.training
    (source,) = data.sources
    rows = [
        r
        for batch in validation_samples(0, source.validation, t.eval_iters, t.global_batch_size)
        for _, r in batch
    ]
    sums = score_rows(loaded, source.validation, rows, len(source.validation.document_names()))
    assert sums[:, 0].sum() / sums[:, 1].sum() == pytest.approx(losses(run_dir, "valid")[STEPS], rel=1e-5)


def test_bits_per_byte_by_hand(run_dir: Path) -> None:
    tokenizer = load(run_dir).tokenizer
    text = "template <typename T> // größe\n"
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    table = token_bytes(tokenizer)
    assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tokenizer.eos_id] == 0
    nats = 1.5 * len(ids)
    assert Score(nats, len(ids), int(table[ids].sum())).bits_per_byte == nats / (
        math.log(2) * len(text.encode())
    )


def test_eval_command_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    overall = result["overall"]
    assert result["step"] == STEPS and result["split"] == "validation"
    assert overall["perplexity"] == pytest.approx(math.exp(overall["loss"]))
    assert 0 < overall["bits_per_byte"] < 8 and result["worst"] and result["best"]


def test_generate_streams_the_prompt_and_its_continuation(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "--checkpoint", str(run_dir), "--prompt", "#include <", "--max-new-tokens", "8"]
    assert main([*argv, "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("#include <") and len(first) > len("#include <\n")
    assert main([*argv, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == first  # greedy is deterministic


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--prompt", ""], "prompt 1 is empty"),
        (["generate", "--prompt", "int x; " * 100], "the model's sequence is 64"),
        (["eval", "--data.sources", '["EMPTY"]'], "EMPTY"),
    ],
    ids=["empty-prompt", "prompt-too-long", "corpus-without-files"],
)
def test_bad_input_is_one_line_and_exit_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.replace("EMPTY", str(empty)) for a in argv]
    assert main([argv[0], "--checkpoint", str(run_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert message.replace("EMPTY", str(empty)) in err and len(err.splitlines()) == 1, err


def test_missing_or_foreign_checkpoint_is_one_line_and_exit_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(run_dir / "checkpoints" / f"step_{STEPS:07d}", other)
    marker = json.loads((other / "nam_checkpoint.json").read_text())
    marker["config"]["model"]["hidden_size"] = 64  # the marker of another model over these tensors
    (other / "nam_checkpoint.json").write_text(json.dumps(marker))
    assert main(["generate", "--checkpoint", str(other), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another model geometry" in err and len(err.splitlines()) == 1, err


def test_a_checkpoint_trained_with_cuda_graphs_loads_without_them(run_dir: Path, tmp_path: Path) -> None:
    """Graphs serve training calls only (and need CUDA): eval and generate build the saved model
    without them, on any machine."""
    graphed = tmp_path / "graphed"
    shutil.copytree(run_dir / "checkpoints" / f"step_{STEPS:07d}", graphed)
    marker = json.loads((graphed / "nam_checkpoint.json").read_text())
    marker["config"]["model"]["cuda_graphs"] = "MRE"  # as a GPU run with graphs saves it
    marker["config"]["model"]["moe"]["dispatcher"] = "local"
    (graphed / "nam_checkpoint.json").write_text(json.dumps(marker))
    loaded = load(graphed)
    assert loaded.config.model.cuda_graphs == "MRE" and loaded.model.decoder.graphs == {}
    assert main(["eval", "--checkpoint", str(graphed)]) == 0
