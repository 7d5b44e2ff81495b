"""The seed system's production geometry (preset ``cppmega-nam56r``: MLA in every attention layer,
Mamba-3 SISO, MTP of depth 2, hidden 4096, vocab 131072) trained on one GPU at the deepest depth
that fits.

    NAM_COMMIT=<sha> bash bench/gpu.sh cppmega

The 52 layers (about 4.7 B parameters with Adam state) do not fit one GPU, so the same pattern
LEMELEMELEMR is tiled to the largest depth whose ``nam_spec.memory`` estimate at micro-batch 1
stays under FIT of the GPU's memory (a family of that depth in a families file beside the run). The
step is bench/trainer.py's (``run_model``: the trainer's ``build_run``, bf16, no recomputation,
megatron DDP and distributed Adam, MICROBATCHES x 1 x 4096 random tokens, warm-up then the median
of timed steps, checks on parameters, initial loss and finiteness, peak against the estimate).
Rows: depth, parameters, step time, tokens/s, model TFLOP/s (nam_spec.accounting, MTP depths
included), peak GiB against the estimate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.report import Report
from bench.trainer import MICROBATCHES, estimated_peak_gib, log, make_batches, preset, run_model
from bench.world import one_rank_world

PRESET = "cppmega-nam56r"
PATTERN = "LEMELEMELEMR"
FIT = 0.85  # of the GPU's memory: the estimate is within a few % of measured peaks (RESULTS.md)


def family_file(directory: Path, depth: int) -> tuple[str, Path]:
    """A families file holding the preset's pattern at ``depth`` layers; its family's name."""
    from nam_layout import Layout

    counts = ", ".join(f'"{k}" = {n}' for k, n in sorted(Layout.tile(PATTERN, depth).counts.items()))
    name = f"CPPMEGA-{depth}"
    path = directory / f"{name}.toml"
    path.write_text(f'[family.{name}]\npattern = "{PATTERN}"\ndepth = {depth}\ncounts = {{ {counts} }}\n')
    return name, path


def deepest_fit(directory: Path, budget_gib: float) -> tuple[object, float]:
    """The preset checked at the largest depth whose estimated peak at micro-batch 1 is within
    ``budget_gib``, and that estimate."""
    for depth in range(52, 0, -1):
        name, path = family_file(directory, depth)
        checked = preset(PRESET, family=name, families_file=str(path))
        c = checked.config.model
        estimate = estimated_peak_gib(c, c.layout(), 1)
        if estimate <= budget_gib:
            return checked, estimate
    raise RuntimeError(f"{PRESET}: not even one layer fits {budget_gib:.1f} GiB")


def main(report: Report) -> None:
    import torch

    from nam_spec.accounting import model_params
    from nam_trainer.train.setup import build_run

    budget = FIT * torch.cuda.get_device_properties(0).total_memory / 2**30
    with tempfile.TemporaryDirectory() as tmp, one_rank_world() as world:
        checked, estimate = deepest_fit(Path(tmp), budget)
        c = checked.config.model  # type: ignore[attr-defined]
        layout = c.layout()
        log(
            f"{PRESET} at depth {layout.depth} ({layout.pattern}): estimate {estimate:.1f} GiB of {budget:.1f}"
        )
        run_model(
            report,
            f"{PRESET} depth {layout.depth}",
            build_run(checked, world),
            layout,
            make_batches(c, 1, MICROBATCHES, with_extras=True),
            formula_params=model_params(c, layout).total,
            params_tol=0.0,
            estimate_gib=estimate,
        )
