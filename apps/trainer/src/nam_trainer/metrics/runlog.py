"""A run's metrics: appended to ``RUN_DIR/metrics.jsonl`` and, optionally, TensorBoard ``RUN_DIR/tb``."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from nam_trainer.metrics.records import encode, read_records

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"


class RunLog:
    """Appends one line per ``log`` call, flushed at once so a killed run keeps every line it logged.

    A resumed run opens the same directory (lines are appended, never truncated) and calls
    ``truncate_after(resumed_step)`` so that the steps it repeats appear once, in the file and in
    TensorBoard alike.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _drop_cut_short_line(self.path)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._tensorboard = tensorboard
        self._writer: SummaryWriter | None = None
        self._purge_step: int | None = None

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        """One record: ``split`` is 'train' or 'valid'; a non-finite value is written as null."""
        now = time.time()
        self._file.write(encode(step, split, now, values))
        self._file.flush()
        if self._tensorboard:
            writer = self._tb_writer()
            for key, value in values.items():
                if math.isfinite(value):
                    writer.add_scalar(f"{split}/{key}", value, step, walltime=now)
            writer.flush()

    def truncate_after(self, step: int) -> None:
        """Forget every record of a step after ``step`` (the file is replaced atomically)."""
        kept = [r for r in read_records(self.path) if r["step"] <= step]  # a bad file raises here, untouched
        self._file.close()
        tmp = self.path.with_name(f".{METRICS_FILE}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        # TensorBoard hides events of steps >= purge_step from earlier event files when a writer
        # opened with it starts; reopen so the next scalars come from such a writer.
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._purge_step = step + 1

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _tb_writer(self) -> SummaryWriter:
        if self._writer is None:
            # Imported here: it imports torch, which nam-train's data workers (they import the CLI
            # again, as spawned processes do) should not pay for.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge_step)
        return self._writer


def _drop_cut_short_line(path: Path) -> None:
    """Cut a last line without its newline (a kill mid-write), so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        os.truncate(path, data.rfind(b"\n") + 1)
