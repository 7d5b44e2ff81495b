"""Stand-in for nam_runtime.cpu until it lands (issue 3): the megatron-core calls into CUDA that
nam-spec's CPU tests reach, answered on CPU. Applied only when CUDA is absent.

| what | where in megatron-core | why it is right on CPU |
|---|---|---|
| torch.cuda.current_device -> "cpu" | MoE router buffers, TP mappings' gather buffers | tensors land on CPU |
| torch.cuda.synchronize -> no-op | dist_checkpointing's async preload | CPU work is synchronous |
| RNG tracker without CUDA states | embedding under SP, activation checkpointing | the CPU generator (which checkpointing still saves and restores) is the only one in use; test configs have dropout 0 |
"""

from __future__ import annotations

import contextlib

import torch


class _CpuRngTracker:
    def fork(self, *args: object, **kwargs: object) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        return None


def cpu_megatron() -> None:
    try:
        import nam_runtime.cpu as runtime_cpu  # the real thing, once it exists

        runtime_cpu.install()
        return
    except (ImportError, AttributeError):
        pass
    apply_standin()


def apply_standin() -> None:
    if torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel as tensor_parallel
    import megatron.core.tensor_parallel.random as tp_random

    tracker = _CpuRngTracker()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    tensor_parallel.get_cuda_rng_tracker = tp_random.get_cuda_rng_tracker = lambda *args, **kwargs: tracker
    tp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    tp_random._set_cuda_rng_state = lambda *args, **kwargs: None
