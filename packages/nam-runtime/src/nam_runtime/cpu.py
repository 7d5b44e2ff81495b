"""megatron-core 0.19 on CPU: the listed compatibility patches.

megatron-core has no CPU path. `enable()` makes its model code, DDP wrapper, distributed
optimizer, schedules and dist_checkpointing run on CPU with gloo, and does nothing when CUDA is
available. Every patch is one row of `PATCHES` (what, where in megatron-core, why) and counts
its hits, so the test suite can prove each one is still needed. This module is a crutch to drop
when megatron-core grows a CPU path.

Two kinds of patch:
- function replacements inside megatron-core (the CUDA RNG tracker, its torch.compile'd helpers,
  ...), installed wherever megatron bound the original name;
- `CpuDeviceMode`, a TorchFunctionMode that maps the literal CUDA devices megatron passes to
  torch (`device='cuda'`, `device=torch.cuda.current_device()`, `.cuda()`, `.to('cuda')`) to
  the CPU and answers megatron's `tensor.type() == 'torch.cuda.FloatTensor'` checks; it is
  entered for the process and around every run of the autograd engine.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["PATCHES", "CpuDeviceMode", "Patch", "enable", "enabled", "hits", "merge_hits", "reset_hits"]


@dataclass
class Patch:
    """One row of the patch table."""

    name: str
    where: str  # the megatron-core (or torch) object it replaces or the call sites it serves
    why: str
    hits: int = 0


PATCHES: dict[str, Patch] = {}
_LOCK = threading.Lock()
_ENABLED = False


def _row(name: str, where: str, why: str) -> Patch:
    patch = Patch(name, where, why)
    PATCHES[name] = patch
    return patch


def _hit(name: str) -> None:
    PATCHES[name].hits += 1


def hits() -> dict[str, int]:
    """Hit count of every listed patch in this process."""
    return {name: patch.hits for name, patch in PATCHES.items()}


def merge_hits(counts: dict[str, int]) -> None:
    """Add hit counts recorded in another process (a spawned rank) to this process's table."""
    for name, count in counts.items():
        if name not in PATCHES:
            raise KeyError(f"unknown nam_runtime.cpu patch {name!r}; listed: {sorted(PATCHES)}")
        PATCHES[name].hits += count


def reset_hits() -> None:
    for patch in PATCHES.values():
        patch.hits = 0


def enabled() -> bool:
    """Whether the CPU patches are installed in this process."""
    return _ENABLED


# ---------------------------------------------------------------------------------------------
# The torch function mode: CUDA device arguments, .cuda(), tensor.type() strings.
# ---------------------------------------------------------------------------------------------

_DEVICE_ARG = _row(
    "mode.device_argument",
    "device='cuda' / device=torch.cuda.current_device() / .to('cuda') in transformer.utils (causal mask), "
    "moe.router, utils.GlobalMemoryBuffer and local_multi_tensor_l2_norm, distributed.param_and_grad_buffer, "
    "optimizer.optimizer, optimizer.clip_grads, pipeline_parallel.schedules and p2p_communication, "
    "tensor_parallel.data, dist_checkpointing.strategies.state_dict_saver",
    "megatron allocates its buffers, flags and reductions on a literal CUDA device",
)
_TENSOR_CUDA = _row(
    "mode.tensor_cuda",
    "Tensor.cuda() in tensor_parallel.data.broadcast_data (also in optimizer state loading and "
    "dist_checkpointing.exchange_utils, which the suite does not reach)",
    "megatron moves tensors to the GPU with .cuda(); on CPU they stay where they are",
)
_TYPE_STRING = _row(
    "mode.tensor_type_string",
    "param.type() == 'torch.cuda.FloatTensor' in optimizer.distrib_optimizer (__init__, param groups) "
    "and optimizer.clip_grads.clip_grad_by_total_norm_fp32",
    "megatron accepts only CUDA tensor type strings for parameters and gradients",
)


def _is_cuda(device: Any) -> bool:
    # An int is what torch.cuda.current_device() returns; as a device argument it means cuda:N.
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, torch.device) and device.type == "cuda"


def _map_to_args(args: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    # Tensor.to(device, ...) / Tensor.to(device, dtype): the device is the first positional
    # argument after self when it is not a dtype or a tensor.
    if len(args) >= 2 and _is_cuda(args[1]):
        return (args[0], torch.device("cpu"), *args[2:]), True
    return args, False


class CpuDeviceMode(TorchFunctionMode):
    """Maps CUDA device arguments to the CPU, keeps `.cuda()` tensors where they are, and answers
    `Tensor.type()` with the CUDA type string megatron checks for."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            _hit(_TENSOR_CUDA.name)
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            if name.startswith("torch.") and not name.startswith("torch.cuda."):
                _hit(_TYPE_STRING.name)
                return "torch.cuda." + name.removeprefix("torch.")
            return name
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            _hit(_DEVICE_ARG.name)
            kwargs = {**kwargs, "device": torch.device("cpu")}
        elif func is torch.Tensor.to:
            args, mapped = _map_to_args(args)
            if mapped:
                _hit(_DEVICE_ARG.name)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# torch.cuda.current_device: called in 68 megatron-core modules to pick the device.
# ---------------------------------------------------------------------------------------------

_CURRENT_DEVICE = _row(
    "torch.cuda.current_device",
    "torch.cuda.current_device, called in ~70 megatron-core modules; the suite reaches moe.router, "
    "utils.GlobalMemoryBuffer, distributed.param_and_grad_buffer, pipeline_parallel.p2p_communication, "
    "tensor_parallel.data, dist_checkpointing.strategies.state_dict_saver",
    "it initialises CUDA and raises without a GPU; megatron only passes its result on as a device "
    "argument, which CpuDeviceMode maps to the CPU",
)


def _current_device() -> int:
    _hit(_CURRENT_DEVICE.name)
    return 0


_CURRENT_STREAM = _row(
    "torch.cuda.current_stream",
    "torch.cuda.current_stream in distributed.param_and_grad_buffer start_grad_sync (it waits on "
    "CUDA-graph events there); ~70 call sites in all",
    "it initialises CUDA and raises without a GPU; CPU work is synchronous, so a stream whose waits "
    "are no-ops keeps megatron's ordering",
)


class CpuStream:
    """What `torch.cuda.current_stream()` returns on CPU: work is already in order, so waiting and
    synchronising are no-ops."""

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_STREAM = CpuStream()


def _current_stream(device: Any = None) -> CpuStream:
    _hit(_CURRENT_STREAM.name)
    return _CPU_STREAM


_SYNCHRONIZE = _row(
    "torch.cuda.synchronize",
    "torch.cuda.synchronize in pipeline_parallel.p2p_communication._communicate (batch_p2p_sync, the "
    "default) and dist_checkpointing.strategies.filesystem_async.preload_tensors; ~40 call sites in all",
    "it initialises CUDA and raises without a GPU; on CPU the gloo requests are already waited on",
)


def _synchronize(device: Any = None) -> None:
    _hit(_SYNCHRONIZE.name)


# ---------------------------------------------------------------------------------------------
# The autograd engine: megatron's backward functions must run under the mode too.
# ---------------------------------------------------------------------------------------------

_ENGINE = _row(
    "torch.autograd._engine_run_backward",
    "torch.autograd._engine_run_backward, the engine call behind Tensor.backward, torch.autograd.backward "
    "and torch.autograd.grad; it runs the backward of tensor_parallel.mappings (sequence-parallel "
    "all-gather / reduce-scatter, expert all-to-all) and of tensor_parallel.layers."
    "LinearWithGradAccumulationAndAsyncCommunication, which allocate on torch.cuda.current_device()",
    "a torch function mode is off while its own handler runs, and every autograd entry point is "
    "dispatched through the mode, so the engine would run megatron's backward functions without it "
    "(and a backward started on another thread never had it): the engine runs with the mode entered",
)


def _engine_with_mode(run: Callable[..., Any]) -> Callable[..., Any]:
    def engine_run_backward(*args: Any, **kwargs: Any) -> Any:
        _hit(_ENGINE.name)
        with CpuDeviceMode():
            return run(*args, **kwargs)

    return engine_run_backward


# ---------------------------------------------------------------------------------------------
# megatron's torch.compile'd helpers (jit_fuser): eager on CPU.
# ---------------------------------------------------------------------------------------------

_COMPILED = _row(
    "compile.megatron_helpers",
    "functions megatron-core wraps in torch.compile (megatron.core.jit.jit_fuser or @torch.compile) in "
    "the megatron modules loaded when enable() runs: fusions.*, activations, transformer.utils, "
    "transformer.torch_norm.L2Norm._norm, moe.router.TopKRouter._apply_expert_bias (the suite reaches "
    "this one: the router's expert bias), moe.token_dispatcher",
    "on CPU inductor compiles C++ for each of them, ~20 s per process; the eager function they wrap is "
    "the same math. torch.compile outside megatron is left alone",
)


def _eager(compiled: Callable[..., Any]) -> Callable[..., Any]:
    original = compiled._torchdynamo_orig_callable  # type: ignore[attr-defined]

    @functools.wraps(original)
    def eager(*args: Any, **kwargs: Any) -> Any:
        _hit(_COMPILED.name)
        return original(*args, **kwargs)

    return eager


def _is_megatron_compiled(obj: Any) -> bool:
    original = getattr(obj, "_torchdynamo_orig_callable", None) if inspect.isfunction(obj) else None
    return original is not None and getattr(original, "__module__", "").startswith("megatron.")


def _replace_compiled_helpers() -> None:
    """Swap every torch.compile'd megatron function bound in a loaded megatron module (module
    attributes, plain and static methods of its classes) for its eager original."""
    swapped: dict[int, Callable[..., Any]] = {}  # one eager function per compiled one, however often bound

    def swap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if id(fn) not in swapped:
            swapped[id(fn)] = _eager(fn)
        return swapped[id(fn)]

    for name, mod in list(sys.modules.items()):
        if not name.startswith("megatron.") or mod is None:
            continue
        for attr, value in list(vars(mod).items()):
            if _is_megatron_compiled(value):
                setattr(mod, attr, swap(value))
            elif inspect.isclass(value) and value.__module__ == name:
                for cls_attr, member in list(vars(value).items()):
                    if _is_megatron_compiled(member):
                        setattr(value, cls_attr, swap(member))
                    elif isinstance(member, staticmethod) and _is_megatron_compiled(member.__func__):
                        setattr(value, cls_attr, staticmethod(swap(member.__func__)))


# ---------------------------------------------------------------------------------------------
# The CUDA RNG tracker (tensor_parallel/random.py): on CPU its states are CPU generator states.
# ---------------------------------------------------------------------------------------------

_RANDOM = "megatron.core.tensor_parallel.random"

_GET_RNG = _row(
    "random._get_cuda_rng_state",
    f"{_RANDOM}._get_cuda_rng_state",
    "reads the CUDA generator; on CPU the tracker forks the CPU default generator",
)
_SET_RNG = _row(
    "random._set_cuda_rng_state",
    f"{_RANDOM}._set_cuda_rng_state",
    "writes the CUDA generator; on CPU the tracker forks the CPU default generator",
)
_TRACKER_ADD = _row(
    "random.CudaRNGStatesTracker.add",
    f"{_RANDOM}.CudaRNGStatesTracker.add (called by model_parallel_cuda_manual_seed)",
    "seeds a new state through torch.cuda.manual_seed/get_rng_state; on CPU a fresh CPU generator",
)
_TRACKER_FORK = _row(
    "random.CudaRNGStatesTracker.fork",
    f"{_RANDOM}.CudaRNGStatesTracker.fork (weight init, dropout in attention)",
    "warns that the CPU RNG changed inside every fork, which on CPU is the forked generator itself",
)


def _get_cuda_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    _hit(_GET_RNG.name)
    return torch.get_rng_state()


def _set_cuda_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    _hit(_SET_RNG.name)
    torch.set_rng_state(new_state)


def _tracker_add(self: Any, name: str, seed: int) -> None:
    _hit(_TRACKER_ADD.name)
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


@contextlib.contextmanager
def _tracker_fork(self: Any, name: str = "model-parallel-rng") -> Iterator[None]:
    # megatron's fork without its CPU-RNG-changed warning; the state bookkeeping is the same.
    _hit(_TRACKER_FORK.name)
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    random = sys.modules[_RANDOM]
    orig_state = random._get_cuda_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    random._set_cuda_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(
                f"current state name {self._current_state_name} is not the same as the desired "
                f"state name {name}."
            )
        self.states_[name] = random._get_cuda_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        random._set_cuda_rng_state(orig_state)
        self._current_state_name = orig_name


# ---------------------------------------------------------------------------------------------
# MoE all-to-all token dispatch: device-to-host copies on a side CUDA stream.
# ---------------------------------------------------------------------------------------------

_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher"

_DTOH = _row(
    "moe.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
    f"{_DISPATCHER}.MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize and its class attribute "
    "cuda_dtoh_stream (a torch.cuda.Stream made in __init__)",
    "copies the split sizes to the host (as numpy arrays) on a side CUDA stream and syncs on a CUDA "
    "event; on CPU they are already on the host and only become numpy arrays",
)


class _NoStream:
    """Stands in for the dispatcher's side CUDA stream, which the CPU path never uses."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"nam_runtime.cpu: the MoE dispatcher's CUDA stream was used ({name}) on CPU")


def _dtoh_and_synchronize(self: Any, point: str, tokens_per_expert: torch.Tensor | None = None) -> Any:
    # megatron's host copies without the side stream and event: the tensors are already on the
    # host, but the all-to-all split sizes must become numpy arrays as they do there.
    _hit(_DTOH.name)
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for attr in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, attr, None)
            if torch.is_tensor(value):
                setattr(self, attr, value.numpy())
    return tokens_per_expert


# ---------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------


def _replace_function(module_name: str, attr: str, new: Callable[..., Any]) -> None:
    """Replace `module.attr` and every binding of the same object in loaded megatron modules
    (`from x import f` copies the name)."""
    old = getattr(importlib.import_module(module_name), attr)
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.") and mod is not None and getattr(mod, attr, None) is old:
            setattr(mod, attr, new)


def _replace_method(module_name: str, cls_name: str, attr: str, new: Callable[..., Any]) -> None:
    setattr(getattr(importlib.import_module(module_name), cls_name), attr, new)


def enable() -> bool:
    """Install the CPU patches if CUDA is unavailable; return whether they are active.

    Idempotent, process-wide and irreversible for the life of the process: call it before
    building megatron modules (nam_runtime.dist.initialize does).
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return True
        if torch.cuda.is_available():
            return False
        # the only torch attributes replaced: each raises without a GPU and megatron calls it everywhere
        torch.cuda.current_device = _current_device
        torch.cuda.current_stream = _current_stream
        torch.cuda.synchronize = _synchronize
        # torch.autograd binds the engine call by name; Tensor.backward goes through it as well
        torch.autograd._engine_run_backward = _engine_with_mode(torch.autograd._engine_run_backward)
        _replace_compiled_helpers()
        _replace_function(_RANDOM, "_get_cuda_rng_state", _get_cuda_rng_state)
        _replace_function(_RANDOM, "_set_cuda_rng_state", _set_cuda_rng_state)
        _replace_method(_RANDOM, "CudaRNGStatesTracker", "add", _tracker_add)
        _replace_method(_RANDOM, "CudaRNGStatesTracker", "fork", _tracker_fork)
        _replace_method(
            _DISPATCHER, "MoEAlltoAllTokenDispatcher", "_maybe_dtoh_and_synchronize", _dtoh_and_synchronize
        )
        importlib.import_module(_DISPATCHER).MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()
        # Entered for the rest of the process, on this thread (CPU autograd runs here too).
        CpuDeviceMode().__enter__()
        _ENABLED = True
        return True
