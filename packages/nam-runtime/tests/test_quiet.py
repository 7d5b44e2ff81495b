"""quiet(): the library messages of the noise table are gone, every other message stays."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from nam_runtime.quiet import NOISE, Noise, quiet

# Imports that make megatron-core and torch say the rows' import-time messages.
PROBE = """
import logging, warnings
from nam_runtime.quiet import quiet
quiet()
import torch.utils.cpp_extension
import megatron.core.optimizer, megatron.core.models.backends
import megatron.core.inference.contexts.kv_block_allocator
import megatron.core.distributed.distributed_data_parallel as ddp
ddp.logger.warning("DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True.")
ddp.logger.warning("another DDP warning")
warnings.warn("our own warning")
import os, tempfile, numpy, torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
prefix = os.path.join(tempfile.mkdtemp(), "rows")  # opening one says the rank notice, outside torchrun
builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
builder.add_item(torch.arange(4, dtype=torch.int32))
builder.end_document()
builder.finalize(prefix + ".idx")
assert len(IndexedDataset(prefix)) == 1
import torch.distributed.checkpoint as dcp  # without a process group, as one-process loads are
dcp.save({"x": torch.zeros(2)}, storage_writer=dcp.FileSystemWriter(prefix + ".ckpt"))
dcp.load({"x": torch.zeros(2)}, dcp.FileSystemReader(prefix + ".ckpt"))  # by position, as megatron
"""


def test_library_noise_is_gone_and_other_messages_stay() -> None:
    # without RANK, so megatron's rank notice is said
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")},
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONDONTWRITEBYTECODE": "1",
    }  # compile, so SyntaxWarnings are said
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "another DDP warning" in done.stderr and "our own warning" in done.stderr
    for said in (
        "Apex",
        "invalid escape sequence",
        "No CUDA runtime",
        "full_param_layout",
        "determine rank",
        "torch.distributed is disabled",
        "argument order of load",
    ):
        assert said not in done.stderr, done.stderr


@pytest.mark.parametrize("row", [r for r in NOISE if r.category is None], ids=lambda r: r.source)
def test_log_rows_drop_only_their_message(row: Noise, caplog: pytest.LogCaptureFixture) -> None:
    quiet()
    logger = logging.getLogger(row.source)
    with caplog.at_level(logging.WARNING, logger=row.source):
        logger.warning(row.message + " and more")  # the log rows' patterns are literal text
        logger.warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]
