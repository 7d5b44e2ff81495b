"""Save time and size of a nam-train checkpoint of nam56r-tiny on CPU gloo ranks, in the optimizer
format of the nam-trainer installed (state.SHARDED_METADATA): run it with a checkout's environment
to compare formats (fully_reshardable from this one, dp_reshardable from a commit before it).

    .venv/bin/python bench/checkpoint_format.py [WORLD]     # data-parallel ranks, default 1

The set-up is the trainer's own (nam_trainer.train.setup.build_run on the preset, vocabulary 4096,
rows of 256 tokens, before any step); nam_trainer.train.checkpoint.save_checkpoint writes SAVES
checkpoints, the median time counts. Prints a table and writes bench/checkpoint_format.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SAVES = 3


def _rank(run_root: str) -> dict[str, Any]:
    import os

    import torch.distributed as torch_dist

    from nam_trainer.config import check, load_config
    from nam_trainer.train.checkpoint import save_checkpoint, state
    from nam_trainer.train.setup import build_run, init_world

    config = load_config("nam56r-tiny", overrides=["--model.vocab_size", "4096", "--model.seq_length", "256"])
    checked = check(config, int(os.environ["WORLD_SIZE"]))
    run = build_run(checked, init_world(checked))
    seconds = []
    for i in range(SAVES):
        torch_dist.barrier()
        began = time.perf_counter()
        path = save_checkpoint(
            Path(run_root) / str(i), 1, run.chunks, run.optimizer, run.scheduler, {}, keep_last=1
        )
        seconds.append(time.perf_counter() - began)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    sharding = state.SHARDED_METADATA["distrib_optim_sharding_type"]
    return {sharding: {"save_s": statistics.median(seconds), "bytes": size}}


def main() -> None:
    from nam_runtime.testing import run_ranks

    world = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    root = tempfile.mkdtemp(prefix="nam_ckpt_format_")
    try:
        result = run_ranks(_rank, world, root, timeout_s=600)[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"nam56r-tiny (vocab 4096), {world} data-parallel CPU rank(s), median of {SAVES} saves")
    print(f"{'format':<20} {'save s':>8} {'MiB':>8}")
    for sharding, r in result.items():
        print(f"{sharding:<20} {r['save_s']:>8.2f} {r['bytes'] / 2**20:>8.2f}")
    out = Path(__file__).with_name("checkpoint_format.json")
    out.write_text(json.dumps({"world": world, "saves": SAVES, "results": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
