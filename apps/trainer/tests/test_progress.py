"""Progress: plain lines off a terminal, the redrawn line on one, ETA from the smoothed step time."""

from __future__ import annotations

import io

import pytest

from nam_trainer.metrics import Progress

VALUES = {"loss": 3.21456, "tokens_per_s": 45_200.0, "tflops": 312.4, "mfu": 0.3158, "lr": 3e-4}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_n_steps_with_eta_excluding_the_warm_up_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = Clock()
    bar = Progress(100, every_steps=5, every_s=1e9, clock=clock)
    clock.now = 30.0  # the first step holds compilation: it must not count in the step time
    bar.update(1, VALUES)
    for step in range(2, 12):  # then one second per step
        clock.now += 1.0
        bar.update(step, VALUES)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 1/100", "step 6/100", "step 11/100"]
    assert lines[0] == (
        "step 1/100 | loss 3.2146 | 45.2k tok/s | 312 TFLOP/s | MFU 31.6% | lr 3.00e-04 | 30s elapsed, ETA --"
    )
    assert lines[1].endswith("| 35s elapsed, ETA 1m34s")  # 94 steps left at 1 s
    assert lines[2].endswith("| 40s elapsed, ETA 1m29s")


def test_plain_line_every_m_seconds_and_the_last_state_on_close(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    bar = Progress(1000, every_steps=500, every_s=10.0, clock=clock)
    for step in range(1, 25):
        clock.now += 1.0
        bar.update(step, {"loss": 1.0})
    bar.close()
    steps = [line.split(" | ")[0] for line in capsys.readouterr().err.splitlines()]
    assert steps == ["step 1/1000", "step 11/1000", "step 21/1000", "step 24/1000"]


def test_resumed_run_counts_from_its_start_step(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    bar = Progress(100, start_step=50, every_steps=1, clock=clock)
    clock.now = 10.0
    bar.update(51, {})
    clock.now = 14.0  # two steps in 4 s
    bar.update(53, {})
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 51/100 | 10s elapsed, ETA --", "step 53/100 | 14s elapsed, ETA 1m34s"]


def test_the_final_step_is_always_shown_and_hours_are_formatted(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    bar = Progress(10, every_steps=100, every_s=1e9, clock=clock)
    for step in range(1, 11):
        clock.now += 900.0
        bar.update(step, {})
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["step 1/10 | 15m00s elapsed, ETA --", "step 10/10 | 2h30m00s elapsed, ETA 0s"]
    bar.close()
    assert capsys.readouterr().err == ""


def test_terminal_line_is_redrawn_in_place_and_messages_keep_it() -> None:
    clock, out = Clock(), Terminal()
    bar = Progress(4, clock=clock, stream=out)
    for step in (1, 2):
        clock.now += 1.0
        bar.update(step, {"loss": 10.0 / step})
    first = "step 1/4 | loss 10.0000 | 1s elapsed, ETA --"
    second = "step 2/4 | loss 5.0000 | 2s elapsed, ETA 2s"
    assert out.getvalue() == f"\r{first}\r{second} "  # padded over the longer first line, no newline
    bar.write("checkpoint written")
    assert out.getvalue().endswith(f"\r{' ' * len(second)}\rcheckpoint written\n{second}")
    clock.now += 0.01  # within the redraw interval: held back, shown by close()
    bar.update(3, {"loss": 1.0})
    assert "step 3/4" not in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\rstep 3/4 | loss 1.0000 | 2s elapsed, ETA 1s\n")


def test_disabled_progress_writes_nothing() -> None:
    out = Terminal()
    bar = Progress(10, enabled=False, stream=out)
    bar.update(1, VALUES)
    bar.close()
    assert out.getvalue() == ""


def test_bad_step_range_is_refused() -> None:
    with pytest.raises(ValueError, match="0 <= start_step <= total_steps, got 10, 11"):
        Progress(10, start_step=11)


@pytest.mark.parametrize("columns", [80, 60, 40])
def test_terminal_line_fits_the_width_and_keeps_the_eta(
    columns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 80 columns the full line (~110 characters) lost its ETA to the cut."""
    monkeypatch.setenv("COLUMNS", str(columns))  # what shutil.get_terminal_size reads first
    clock, out = Clock(), Terminal()
    bar = Progress(10_000, start_step=999, clock=clock, stream=out)
    for step in (1000, 1001):
        clock.now += 3725.0
        bar.update(step, VALUES)
    line = out.getvalue().rsplit("\r", 1)[1].rstrip()
    assert len(line) < columns and line.startswith("step 1001/10000 | ") and line.endswith("ETA 9311h27m55s")
    if columns == 80:
        assert "loss 3.2146" in line and "lr" not in line  # the rightmost values go first
    bar.close()
