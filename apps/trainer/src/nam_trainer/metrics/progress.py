"""The live progress line of a training run (the caller shows it on rank 0 only).

On a terminal one line is redrawn in place (carriage return), fitted to the terminal's width
(values dropped from the right, the step and the ETA kept); anywhere else (CI logs, files) a
plain line is printed every ``every_steps`` steps or ``every_s`` seconds, whichever comes first.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

# Weight of the newest step time in the smoothed one the ETA is computed from.
SMOOTHING = 0.2
# Redraws of the terminal line at most this often (a tiny model can run hundreds of steps a second).
REDRAW_S = 0.1


class Progress:
    """``update(step, values)`` after each logged step; ``values`` may hold ``loss``, ``tokens_per_s``,
    ``tflops``, ``mfu`` (a fraction) and ``lr``, shown when present."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        *,
        stream: TextIO | None = None,
        every_steps: int | None = None,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total_steps < 1 or not 0 <= start_step <= total_steps:
            raise ValueError(
                f"need total_steps >= 1 and 0 <= start_step <= total_steps, got {total_steps}, {start_step}"
            )
        self.total_steps = total_steps
        self.enabled = enabled
        self._stream = sys.stderr if stream is None else stream
        self._tty = self._stream.isatty()
        self._every_steps = every_steps or max(1, total_steps // 20)
        self._every_s = every_s
        self._clock = clock
        self._start = clock()
        # (time, step) of the previous update; None until the first one, whose interval holds
        # compilation and warm-up and so is left out of the step time.
        self._last: tuple[float, int] | None = None
        self._step_s: float | None = None
        self._shown: tuple[float, int] | None = None  # when and at which step a line was last shown
        self._pending: list[str] = []  # the parts of the newest line, not yet shown
        self._drawn, self._width = "", 0  # the line on the terminal now

    def update(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if self._last is not None and step > self._last[1]:
            per_step = (now - self._last[0]) / (step - self._last[1])
            self._step_s = (
                per_step if self._step_s is None else SMOOTHING * per_step + (1 - SMOOTHING) * self._step_s
            )
        self._last = (now, step)
        self._pending = self._parts(step, values, now)
        if self._due(step, now):
            self._show(now, step)

    def write(self, message: str) -> None:
        """Print a message (a checkpoint written, an evaluation) without breaking the live line."""
        if self._tty and self._width:
            self._stream.write("\r" + " " * self._width + "\r" + message + "\n" + self._drawn)
        else:
            self._stream.write(message + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Show the newest state if it was held back, and end the terminal line."""
        if not self.enabled:
            return
        if self._pending and self._last is not None:
            self._show(*self._last)
        if self._tty and self._shown is not None:
            self._stream.write("\n")
            self._stream.flush()
        self._drawn, self._width = "", 0
        self.enabled = False

    def _due(self, step: int, now: float) -> bool:
        if self._shown is None or step >= self.total_steps:
            return True
        shown_at, shown_step = self._shown
        if self._tty:
            return now - shown_at >= REDRAW_S
        return step - shown_step >= self._every_steps or now - shown_at >= self._every_s

    def _show(self, now: float, step: int) -> None:
        if self._tty:
            columns = shutil.get_terminal_size().columns - 1  # a full-width line would wrap and break \r
            line = _fit(self._pending, columns)
            self._stream.write("\r" + line.ljust(self._width))
            self._drawn, self._width = line, len(line)
        else:
            self._stream.write(" | ".join(self._pending) + "\n")
        self._stream.flush()
        self._shown = (now, step)
        self._pending = []

    def _parts(self, step: int, values: dict[str, float], now: float) -> list[str]:
        """The line's parts: the step first, the elapsed time and ETA last."""
        parts = [f"step {step}/{self.total_steps}"]
        if "loss" in values:
            parts.append(f"loss {values['loss']:.4f}")
        if "tokens_per_s" in values:
            parts.append(f"{_si(values['tokens_per_s'])} tok/s")
        if "tflops" in values:
            parts.append(f"{values['tflops']:.3g} TFLOP/s")
        if "mfu" in values:
            parts.append(f"MFU {100 * values['mfu']:.1f}%")
        if "lr" in values:
            parts.append(f"lr {values['lr']:.2e}")
        eta = "--" if self._step_s is None else _duration(self._step_s * (self.total_steps - step))
        parts.append(f"{_duration(now - self._start)} elapsed, ETA {eta}")
        return parts


def _fit(parts: list[str], width: int) -> str:
    """The line in ``width`` columns: the values between the step and the times are dropped from
    the right (lr first, loss last), then the elapsed time; only a terminal narrower than
    ``step | ETA`` cuts the line itself."""
    keep = list(parts)
    while len(" | ".join(keep)) > width and len(keep) > 2:
        del keep[-2]
    line = " | ".join(keep)
    if len(line) > width:
        times = keep[-1]
        line = f"{keep[0]} | {times[times.rindex('ETA') :]}"
    return line[:width]


def _si(value: float) -> str:
    """3 significant digits with a k/M/G suffix: 45200 -> 45.2k."""
    if not math.isfinite(value):
        return str(value)
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    """1h02m03s, 4m05s or 12s."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"
