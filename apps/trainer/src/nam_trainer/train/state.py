"""TrainState: where a run stands, saved in every checkpoint and continued from on resume."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nam_trainer.train.checkpoint import CheckpointError


@dataclass
class TrainState:
    """The same on every rank. ``step``: the last optimizer step run (0 before the first);
    ``consumed_samples``: samples of the train order used so far (the next step's rows start
    there); ``skipped_steps``: steps whose loss was not finite, in all; ``consecutive_skips``: of
    those, how many in a row up to ``step``."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def advance(self, global_batch_size: int, skipped: bool) -> None:
        """Count one step of ``global_batch_size`` samples, skipped (no update) or not."""
        self.step += 1
        self.consumed_samples += global_batch_size
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0

    def saved(self) -> dict[str, int]:
        """The checkpoint's `state`."""
        return dataclasses.asdict(self)

    @classmethod
    def restored(cls, path: Path, saved: dict[str, Any]) -> TrainState:
        """The state of the checkpoint at ``path`` from its `state`."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if set(saved) != fields:
            raise CheckpointError(
                f"{path}: its training state has keys {sorted(saved)}, this nam-trainer expects {sorted(fields)}; "
                "resume it with the nam-trainer that wrote it, or start a new run directory"
            )
        return cls(**saved)
