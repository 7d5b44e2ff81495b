"""Collects correctness checks and timings from benchmarks and renders them."""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Check:
    bench: str
    name: str
    error: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.error == self.error and self.error <= self.tol  # NaN never passes


@dataclass
class Row:
    bench: str
    case: str
    ms: float | None = None
    floor_ms: float | None = None
    peak_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    commit: str
    date: str = field(default_factory=lambda: dt.date.today().isoformat())
    checks: list[Check] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    device: str = ""
    _bench: str = ""

    def begin(self, bench: str) -> None:
        self._bench = bench
        if not self.device:
            self.device = _device_name()

    def check(self, name: str, error: float, tol: float) -> bool:
        """Record a relative error against its tolerance; returns whether it passed."""
        c = Check(self._bench, name, float(error), tol)
        self.checks.append(c)
        return c.ok

    def row(
        self,
        case: str,
        ms: float | None = None,
        floor_ms: float | None = None,
        peak_gib: float | None = None,
        **extra: Any,
    ) -> None:
        self.rows.append(Row(self._bench, case, ms, floor_ms, peak_gib, extra))

    def time(self, case: str, fn: Callable[[], Any], floor_ms: float | None = None, **extra: Any) -> float:
        """Median time of fn in ms (CUDA events via triton.testing.do_bench) and its peak memory."""
        import torch
        from triton.testing import do_bench

        fn()  # warm-up and compile outside the timed region
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        self.row(case, ms=ms, floor_ms=floor_ms, peak_gib=peak, **extra)
        return ms

    @property
    def bench(self) -> str:
        """The benchmark now running (``begin``)."""
        return self._bench

    def fail(self, bench: str, tb: str) -> None:
        """Record a benchmark's traceback (after any it already has); printed now too, so a run
        cut off by its time limit still shows it."""
        print(f"FAILED {bench}:\n{tb}", flush=True)
        self.failures[bench] = f"{self.failures[bench]}\n{tb}" if bench in self.failures else tb

    @property
    def ok(self) -> bool:
        return not self.failures and all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "commit": self.commit,
            "date": self.date,
            "device": self.device,
            "host": platform.node(),
            "checks": [asdict(c) | {"ok": c.ok} for c in self.checks],
            "rows": [asdict(r) for r in self.rows],
            "failures": self.failures,
        }

    def table(self, bench: str | None = None) -> str:
        """The checks and rows of one benchmark, or of all of them."""
        lines = [f"# commit {self.commit}  date {self.date}  device {self.device}"]
        for name, tb in self.failures.items():
            if bench in (None, name):
                lines.append(f"FAILED {name}:\n{tb}")
        lines.append(f"{'bench':<10} {'check':<48} {'error':>10} {'tol':>9}  ok")
        for c in (c for c in self.checks if bench in (None, c.bench)):
            lines.append(
                f"{c.bench:<10} {c.name:<48} {c.error:>10.2e} {c.tol:>9.1e}  {'yes' if c.ok else 'NO'}"
            )
        lines.append(
            f"{'bench':<10} {'case':<48} {'ms':>9} {'floor ms':>9} {'x floor':>8} {'peak GiB':>9}  extra"
        )
        for r in (r for r in self.rows if bench in (None, r.bench)):
            ratio = r.ms / r.floor_ms if r.ms and r.floor_ms else None
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in r.extra.items())
            lines.append(
                f"{r.bench:<10} {r.case:<48} {_fmt(r.ms):>9} {_fmt(r.floor_ms):>9} {_fmt(ratio):>8} "
                f"{_fmt(r.peak_gib):>9}  {extra}"
            )
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "no torch"
