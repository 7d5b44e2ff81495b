"""write_report and `nam-train report`: PNGs per figure group, clear errors for unusable input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from nam_trainer.cli import main
from nam_trainer.metrics import MetricsError, RunLog
from nam_trainer.metrics.report import write_report

FIGURES = ["loss", "throughput", "optimizer", "dormant", "moe", "plasticity", "other"]


def _synthetic_run(run_dir: Path, steps: int = 60) -> None:
    """A run's worth of every kind of key the loop logs, one NaN loss included."""
    with RunLog(run_dir, tensorboard=False) as log:
        for step in range(1, steps + 1):
            loss = math.nan if step == 17 else 8.0 / math.sqrt(step)
            values = {
                "loss": loss,
                "lr": 3e-4 * min(1.0, step / 10),
                "grad_norm": 1.0 / step,
                "skipped_steps": int(step >= 17),
                "tokens_per_s": 4.0e4 + step,
                "tflops": 250.0 + step,
                "mfu": 0.25,
                "moe/aux_loss": 0.01,
                "dormant_fraction": 0.1 / step,
                "custom_metric": float(step),
            }
            for layer in range(3):
                values[f"moe/load_imbalance/layer{layer}"] = 1.0 + layer / step
                values[f"plasticity/redo/dormant_fraction/layer{layer}"] = layer / (10 * step)
            values["plasticity/stp/loss"] = 0.5
            log.log(step, "train", values)
            if step % 20 == 0:
                log.log(
                    step, "valid", {"loss": 8.1 / math.sqrt(step), "ppl": math.exp(8.1 / math.sqrt(step))}
                )


def test_report_writes_a_non_empty_png_per_figure_group(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    paths = write_report(tmp_path)
    assert paths == [tmp_path / "report" / f"{name}.png" for name in FIGURES]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(path)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400
        assert pixels[..., :3].std() > 0.05, f"{path.name} looks blank"


def test_only_the_groups_present_are_drawn(tmp_path: Path) -> None:
    with RunLog(tmp_path, tensorboard=False) as log:
        log.log(1, "train", {"loss": 2.0})
        log.log(2, "train", {"loss": 1.0, "moe/aux_loss": 0.1})
    assert [p.name for p in write_report(tmp_path)] == ["loss.png", "moe.png"]


def test_a_key_group_named_like_a_fixed_figure_gets_its_own_file(tmp_path: Path) -> None:
    with RunLog(tmp_path, tensorboard=False) as log:
        log.log(1, "train", {"loss": 2.0, "loss/z_loss": 0.1})
    assert [p.name for p in write_report(tmp_path)] == ["loss.png", "loss-keys.png"]


def test_a_step_logged_twice_counts_once(tmp_path: Path) -> None:
    from nam_trainer.metrics.report import load_series

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "split": "train", "time": 0, "loss": 5.0}\n'
        '{"step": 1, "split": "train", "time": 0, "loss": 9.0}\n'
        '{"step": 2, "split": "train", "time": 1, "loss": 4.0}\n'
        '{"step": 3, "split": "train", "time": 1, "loss": null}\n'
    )
    steps, values = load_series(tmp_path / "metrics.jsonl")[("train", "loss")]
    assert steps == [1, 2, 3] and values[:2] == [9.0, 4.0] and math.isnan(values[2])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no metrics file"),
        ("", "no records yet"),
        ('{"step": 1, "split": "train", "time": 0}\n{"step": 2,\n', "metrics.jsonl:2: not JSON"),
        ("[1, 2]\n", "metrics.jsonl:1: expected a JSON object, got list"),
        ('{"split": "train", "time": 0}\n', "metrics.jsonl:1: 'step' must be an integer >= 0, got None"),
        ('{"step": 1, "split": "eval", "time": 0}\n', "metrics.jsonl:1: 'split' must be one of train, valid"),
        ('{"step": 1, "split": "train", "loss": "low"}\n', "metrics.jsonl:1: 'loss' = 'low': values must be"),
        (b"\xff\xfe\n", "not UTF-8"),
    ],
)
def test_unusable_metrics_files_are_errors_that_say_where(
    tmp_path: Path, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / "metrics.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(MetricsError, match=message):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_missing_run_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match=f"{tmp_path / 'nope'}: no such run directory"):
        write_report(tmp_path / "nope")


def test_cli_report_prints_the_written_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _synthetic_run(tmp_path, steps=5)
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [str(tmp_path / "report" / f"{name}.png") for name in FIGURES]
    assert all(Path(line).stat().st_size > 0 for line in out)


def test_cli_report_bad_input_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"nam-train report: {tmp_path / 'missing'}: no such run directory\n"
    (tmp_path / "metrics.jsonl").write_text("oops\n")
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'}:1: not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["report"])
    assert exit_info.value.code == 2
