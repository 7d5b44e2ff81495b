"""What the loop reports after each step and each evaluation: the values of metrics.jsonl (and
TensorBoard) on rank 0, the progress line, and notes between progress lines.

A train record holds loss, lr, skipped_steps, tokens_per_s, tflops, then where they apply
grad_norm, mfu and peak_memory_gib (GPU), mtp/loss_<k> per multi-token-prediction depth k, then
plasticity/* and moe/* metrics; a validation
record holds loss and ppl. MoE metrics are collectives: every rank calls `train` and `validation`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nam_trainer.metrics import Progress, RunLog
from nam_trainer.train.moe import MoEMetrics
from nam_trainer.train.setup import Run
from nam_trainer.train.step import StepResult

PEAK_TFLOPS = 989.0  # H200 dense bf16 datasheet (DESIGN.md; 806 measured)


class StepMetrics:
    def __init__(
        self,
        run: Run,
        run_dir: Path,
        steps: int,
        start: int,
        tokens_per_step: int,
        microbatches: int,
    ) -> None:
        from nam_spec.accounting import model_flops_per_token

        world = run.world
        rank0 = world.rank == 0
        self.moe = MoEMetrics(run.chunks, run.model, run.layout, world.device)
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = model_flops_per_token(run.model, run.layout) * tokens_per_step
        self.world_size = world.world_size
        self.microbatches = microbatches
        self.on_gpu = world.device.type == "cuda"
        self.log = RunLog(run_dir) if rank0 else None
        if self.log is not None:
            self.log.truncate_after(start)  # a resumed run rewrites the steps after its checkpoint
        self.progress = Progress(steps, start, enabled=rank0)

    def train(
        self,
        step: int,
        result: StepResult,
        lr: float,
        seconds: float,
        skipped_steps: int,
        plasticity: dict[str, float],
    ) -> None:
        """Record one training step (`plasticity`: what the plan's step reported)."""
        extra = {f"plasticity/{k}": v for k, v in plasticity.items()}
        extra.update(self.moe.collect(self.microbatches))
        tflops = self.flops_per_step / seconds / self.world_size / 1e12
        values: dict[str, Any] = {
            "loss": result.loss,
            "lr": lr,
            "skipped_steps": skipped_steps,
            "tokens_per_s": self.tokens_per_step / seconds,
            "tflops": tflops,
            **({"grad_norm": result.grad_norm} if result.grad_norm is not None else {}),
            **({"mfu": tflops / PEAK_TFLOPS} if self.on_gpu else {}),
            # the measured peak that --dry-run's memory estimate is checked against
            **({"peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if self.on_gpu else {}),
            **{f"mtp/loss_{k}": v for k, v in enumerate(result.mtp_losses, 1)},
            **extra,
        }
        if self.log is not None:
            self.log.log(step, "train", values)
        self.progress.update(step, values)

    def validation(self, step: int, loss: float, per_source: list[float]) -> None:
        """Record an evaluation's loss (and each source's, when there are several); forget the MoE
        statistics its forwards recorded."""
        self.moe.discard()
        sources = {f"sources/loss/{i}": v for i, v in enumerate(per_source)} if len(per_source) > 1 else {}
        if self.log is not None:
            self.log.log(step, "valid", {"loss": loss, "ppl": _ppl(loss), **sources})
        each = "".join(f", source {i} {v:.4f}" for i, v in enumerate(per_source)) if sources else ""
        self.progress.write(f"step {step}: validation loss {loss:.4f}, perplexity {_ppl(loss):.2f}{each}")

    def note(self, message: str) -> None:
        """A line between progress lines (rank 0)."""
        self.progress.write(message)

    def close(self) -> None:
        """End the progress line and close the log (idempotent: every exit calls it)."""
        self.progress.close()
        if self.log is not None:
            self.log.close()


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
