"""``nam-train report RUN_DIR``: PNG plots of a run's metrics.jsonl, written to RUN_DIR/report.

Fixed figures for the keys the loop logs (loss, throughput, optimizer), then one figure per key
group: a key ``group/metric/series`` is drawn as line ``series`` in panel ``group/metric`` of
``group.png`` (``moe/``, ``plasticity/``, ...; top-level keys starting with ``dormant`` go to
``dormant.png``); keys nothing else claims go to ``other.png``. matplotlib renders through Agg
with no pyplot state, so reports can be written from any thread or process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from nam_trainer.metrics.records import RESERVED, SPLITS, MetricsError, read_records
from nam_trainer.metrics.runlog import METRICS_FILE

REPORT_DIR = "report"
# Panels with more lines than this carry a count in the title instead of a legend.
MAX_LEGEND = 12


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]
    log_y: bool = False


FIXED = {
    "loss": (
        Panel("loss (nats/token)", ("loss",)),
        Panel("validation perplexity", ("ppl",), log_y=True),
    ),
    "throughput": (
        Panel("tokens/s", ("tokens_per_s",)),
        Panel("model TFLOP/s per GPU", ("tflops",)),
        Panel("MFU (fraction of peak)", ("mfu",)),
    ),
    "optimizer": (
        Panel("learning rate", ("lr",)),
        Panel("gradient norm", ("grad_norm",)),
        Panel("skipped steps (non-finite loss)", ("skipped_steps",)),
    ),
}

# (split, key) -> (steps, values); None values (non-finite when logged) become gaps.
Series = dict[tuple[str, str], tuple[list[int], list[float]]]


def write_report(run_dir: Path) -> list[Path]:
    """Write the report's PNGs; returns their paths. Raises MetricsError for unusable input."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MetricsError(f"{run_dir}: no such run directory")
    series = load_series(run_dir / METRICS_FILE)
    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    written = []
    for name, panels in _figures(series):
        path = out / f"{name}.png"
        _draw(panels, series).savefig(path, dpi=100)
        written.append(path)
    return written


def load_series(path: Path) -> Series:
    """Each (split, key)'s points in step order; for a step logged twice the later record counts."""
    records = read_records(path)
    if not records:
        raise MetricsError(f"{path}: no records yet (the run has not logged a step)")
    latest = {(r["split"], r["step"]): r for r in records}
    series: Series = {}
    for (split, step), record in sorted(latest.items(), key=lambda item: item[0][1]):
        for key, value in record.items():
            if key not in RESERVED:
                steps, values = series.setdefault((split, key), ([], []))
                steps.append(step)
                values.append(math.nan if value is None else value)
    return series


def _figures(series: Series) -> list[tuple[str, list[Panel]]]:
    keys = sorted({key for _, key in series})
    figures = []
    claimed = set()
    for name, panels in FIXED.items():
        present = [p for p in panels if any(k in keys for k in p.keys)]
        claimed.update(k for p in panels for k in p.keys)
        if present:
            figures.append((name, present))
    groups: dict[str, dict[str, list[str]]] = {}
    for key in keys:
        if key in claimed:
            continue
        parts = key.split("/")
        group = (
            (parts[0] or "other") if len(parts) > 1 else "dormant" if key.startswith("dormant") else "other"
        )
        if group in FIXED:  # e.g. "loss/..." keys: their own figure, not over the fixed one
            group += "-keys"
        panel = "/".join(parts[:-1]) if len(parts) > 2 else key
        groups.setdefault(group, {}).setdefault(panel, []).append(key)
    for group in sorted(groups, key=lambda g: (g == "other", g)):
        # A panel of one key is titled by the whole key, so a lone series keeps its name.
        panels = [Panel(title if len(ks) > 1 else ks[0], tuple(ks)) for title, ks in groups[group].items()]
        figures.append((group, panels))
    return figures


def _draw(panels: list[Panel], series: Series) -> Figure:
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5 * cols, 3.5 * rows), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        lines = [(split, key) for key in panel.keys for split in SPLITS if (split, key) in series]
        several_splits = len({split for split, _ in lines}) > 1
        for split, key in lines:
            steps, values = series[(split, key)]
            name = key.rsplit("/", 1)[-1] if len(panel.keys) > 1 else ""
            label = " ".join(filter(None, [name, split if several_splits or not name else ""]))
            ax.plot(steps, values, label=label, marker="." if len(steps) <= 50 else None)
        if panel.log_y and all(v > 0 for line in lines for v in series[line][1] if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_title(panel.title if len(lines) <= MAX_LEGEND else f"{panel.title} ({len(lines)} series)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if 1 < len(lines) <= MAX_LEGEND:
            ax.legend(fontsize="small")
    return fig
