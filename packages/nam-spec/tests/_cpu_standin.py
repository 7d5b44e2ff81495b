"""Stand-in for nam_runtime.cpu until it lands (issue 3): the three megatron-core calls into CUDA
that nam-spec's CPU tests reach, answered on CPU. Applied only when CUDA is absent.

| what | where in megatron-core | why it is safe here |
|---|---|---|
| torch.cuda.current_device -> "cpu" | MoE router buffers, TP mappings' gather buffers | tensors land on CPU |
| torch.cuda.synchronize -> no-op | dist_checkpointing's async preload | CPU work is synchronous |
| RNG tracker fork -> no-op | embedding dropout under SP, TP regions | our test configs use dropout 0 |
"""

from __future__ import annotations

import contextlib

import torch


def cpu_megatron() -> None:
    try:
        import nam_runtime.cpu as runtime_cpu  # the real thing, once it exists

        runtime_cpu.install()
        return
    except (ImportError, AttributeError):
        pass
    if torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel as tensor_parallel

    class _NoRngTracker:
        def fork(self, *args: object, **kwargs: object) -> contextlib.AbstractContextManager[None]:
            return contextlib.nullcontext()

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    tensor_parallel.get_cuda_rng_tracker = lambda *args, **kwargs: _NoRngTracker()
