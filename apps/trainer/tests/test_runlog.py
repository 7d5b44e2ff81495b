"""RunLog: metrics.jsonl lines, resume truncation, non-finite values, TensorBoard scalars."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nam_trainer.metrics import MetricsError, RunLog, read_records


def _strict_json(line: str) -> dict:
    def reject(name: str) -> None:
        raise AssertionError(f"invalid JSON constant {name} in {line!r}")

    return json.loads(line, parse_constant=reject)


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_records_round_trip_with_step_split_and_time(tmp_path: Path) -> None:
    before = time.time()
    with RunLog(tmp_path, tensorboard=False) as log:
        log.log(1, "train", {"loss": 3.5, "lr": 1e-4, "skipped_steps": 0})
        log.log(2, "train", {"loss": 3.25, "lr": 2e-4, "skipped_steps": 1})
        log.log(2, "valid", {"loss": 3.4, "ppl": math.exp(3.4)})
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == [(1, "train"), (2, "train"), (2, "valid")]
    assert records[1] == {
        "step": 2,
        "split": "train",
        "time": records[1]["time"],
        "loss": 3.25,
        "lr": 2e-4,
        "skipped_steps": 1,
    }
    assert isinstance(records[1]["skipped_steps"], int)
    assert before <= records[0]["time"] <= records[2]["time"] <= time.time()
    assert not (tmp_path / "tb").exists()


def test_each_line_is_on_disk_before_close(tmp_path: Path) -> None:
    log = RunLog(tmp_path, tensorboard=False)
    log.log(7, "train", {"loss": 1.0})
    # Another reader sees the line while the log is still open: a killed run keeps it.
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == [7]
    log.close()


def test_non_finite_values_are_null_in_json_and_absent_in_tensorboard(tmp_path: Path) -> None:
    with RunLog(tmp_path) as log:
        log.log(1, "train", {"loss": 2.0, "grad_norm": 1.5})
        log.log(2, "train", {"loss": math.nan, "grad_norm": math.inf})
        log.log(3, "train", {"loss": 1.0, "grad_norm": -math.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    second = _strict_json(lines[1])
    assert second["loss"] is None and second["grad_norm"] is None
    assert _strict_json(lines[2])["grad_norm"] is None
    assert [s for s, _ in _scalars(tmp_path, "train/loss")] == [1, 3]
    assert [s for s, _ in _scalars(tmp_path, "train/grad_norm")] == [1]


@pytest.mark.parametrize(
    ("step", "split", "values", "message"),
    [
        (1, "train", {"loss": "3.0"}, "metric 'loss' = '3.0': must be an int or float"),
        (1, "train", {"ok": True}, "must be an int or float"),
        (1, "train", {"time": 1.0}, "metric name 'time'"),
        (1, "train", {"": 1.0}, "metric name ''"),
        (1, "validation", {"loss": 1.0}, "split must be one of train, valid, got 'validation'"),
        (-1, "train", {"loss": 1.0}, "step must be an integer >= 0, got -1"),
        (1.0, "train", {"loss": 1.0}, "step must be an integer >= 0, got 1.0"),
    ],
)
def test_bad_records_are_refused_and_nothing_is_written(
    tmp_path: Path, step: object, split: str, values: dict, message: str
) -> None:
    with (
        RunLog(tmp_path) as log,
        pytest.raises(MetricsError, match=message.replace("(", r"\(").replace(")", r"\)")),
    ):
        log.log(step, split, values)  # type: ignore[arg-type]
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resume_appends_and_truncate_after_drops_the_repeated_steps(tmp_path: Path) -> None:
    with RunLog(tmp_path) as log:
        for step in range(1, 6):
            log.log(step, "train", {"loss": 10.0 + step})
        log.log(4, "valid", {"loss": 20.0})
    with RunLog(tmp_path) as log:  # the run resumes from its checkpoint at step 3
        assert len(read_records(log.path)) == 6  # opening appends, never truncates
        log.truncate_after(3)
        assert [r["step"] for r in read_records(log.path)] == [1, 2, 3]
        for step in (4, 5):
            log.log(step, "train", {"loss": 100.0 + step})
    records = read_records(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [
        (1, 11.0),
        (2, 12.0),
        (3, 13.0),
        (4, 104.0),
        (5, 105.0),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tb"]  # no temporary file left
    # TensorBoard hides the first run's steps 4 and 5 behind the resumed run's purge step.
    assert _scalars(tmp_path, "train/loss") == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 104.0), (5, 105.0)]
    assert _scalars(tmp_path, "valid/loss") == []


def test_truncate_after_on_a_fresh_run_dir_makes_an_empty_file(tmp_path: Path) -> None:
    with RunLog(tmp_path / "run", tensorboard=False) as log:
        log.truncate_after(0)
        log.log(1, "train", {"loss": 1.0})
    assert [r["step"] for r in read_records(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_a_line_cut_short_by_a_kill_is_dropped_on_open(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "time": 1.0, "loss": 2.0}\n{"step": 2, "split": "tr')
    assert [r["step"] for r in read_records(path)] == [1]  # a reader skips the unfinished line
    with RunLog(tmp_path, tensorboard=False) as log:
        log.log(2, "train", {"loss": 1.5})
    assert [(r["step"], r["loss"]) for r in read_records(path)] == [(1, 2.0), (2, 1.5)]


def test_a_malformed_line_in_the_middle_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "split": "train", "time": 1.0}\nnot json\n{"step": 3, "split": "train", "time": 1.0}\n'
    )
    with RunLog(tmp_path, tensorboard=False) as log:
        with pytest.raises(MetricsError, match=f"{path}:2: not JSON"):
            log.truncate_after(5)
        assert path.read_text().count("\n") == 3  # left as it was, and still open for appends
        log.log(4, "train", {"loss": 1.0})
    assert path.read_text().count("\n") == 4
