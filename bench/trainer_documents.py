"""The nam56r-small training step with document boundaries off and on, in one run.

    NAM_COMMIT=<sha> bash bench/gpu.sh trainer_documents

bench/trainer.py's step of ours (the trainer's set-up of the ``nam56r-small`` preset, bf16, no
recomputation, MICRO_BATCH x MICROBATCHES rows of 4096 tokens, the same fixed batch every step),
run twice on freshly built models: ``off``, the batches as bench/trainer.py makes them but with
position ids restarting at each document segment; ``on``, the same batches plus ``packed_seq_params`` from
``nam_spec.documents.document_boundaries``, as nam-train passes them with
``data.document_masking = true``. The rows' documents follow the default corpus's lengths
(bench/document_lengths.json; rows start mid-document). Rows: each step's time and tokens/s, and
on / off (goal: under 1.03). The checks of bench/trainer.py's ``run_model`` (parameters against
the formula, initial loss, finite losses) run for both.
"""

from __future__ import annotations

from typing import Any

from bench.document_lengths import load_lengths, packed_document_ids
from bench.report import Report
from bench.trainer import MICRO_BATCH, MICROBATCHES, log, make_batches, preset, run_model
from bench.world import in_fresh_process

GOAL = 1.03  # on / off step time


def with_documents(batches: list[dict], boundaries: bool, seed: int = 0) -> list[dict]:
    """``batches`` with position ids restarting at each document segment and, with ``boundaries``, their
    ``packed_seq_params`` (cu_seqlens on the batches' device)."""
    import torch

    from nam_spec.documents import document_boundaries, has_boundaries

    out = []
    for i, batch in enumerate(batches):
        b, s = batch["input_ids"].shape
        ids = torch.from_numpy(packed_document_ids(load_lengths(), b, s, seed=seed + i))
        device = batch["input_ids"].device
        params = document_boundaries(ids, device)
        cu = params.cu_seqlens_q.long()
        flat = torch.arange(b * s, device=device)
        position_ids = flat - cu[torch.searchsorted(cu[1:], flat, right=True)]
        changed = {**batch, "position_ids": position_ids.view(b, s)}
        if boundaries and has_boundaries(ids):  # as the trainer's collate decides
            changed["packed_seq_params"] = params
        out.append(changed)
    return out


def main(report: Report) -> None:
    results = {}
    for name, boundaries in (("documents off", False), ("documents on", True)):
        results[name] = in_fresh_process(report, _bench, name, boundaries)
        if results[name] is None:
            raise RuntimeError(f"the {name} case failed (its traceback is in the table)")
    ratio = results["documents on"]["ms"] / results["documents off"]["ms"]
    report.row(f"documents on / off step time (goal < {GOAL})", ratio=ratio)
    report.check(f"documents on / off step time - {GOAL}", max(ratio - GOAL, 0.0), 0.0)
    log(f"step with document boundaries / without = {ratio:.3f} (goal < {GOAL})")


def _bench(report: Report, world: Any, name: str, boundaries: bool) -> dict[str, Any]:
    from nam_spec.accounting import model_params
    from nam_trainer.train.setup import build_run

    checked = preset()
    log(f"building ours on the GPU ({name})")
    run = build_run(checked, world)
    c, layout = run.model, run.layout
    batches = with_documents(make_batches(c, MICRO_BATCH, MICROBATCHES, with_extras=True), boundaries)
    if boundaries:
        segments = sum(
            int(b["packed_seq_params"].cu_seqlens_q.numel()) - 1 for b in batches if "packed_seq_params" in b
        )
        log(
            f"{segments} document segments in the {sum('packed_seq_params' in b for b in batches)} of "
            f"{MICROBATCHES} micro-batches ({MICRO_BATCH} x {c.seq_length}) that hold a boundary"
        )
    result = run_model(
        report,
        f"ours {name}",
        run,
        layout,
        batches,
        formula_params=model_params(c, layout).total,
        params_tol=0.0,
    )
    return {k: v for k, v in result.items() if isinstance(v, int | float | str)}
