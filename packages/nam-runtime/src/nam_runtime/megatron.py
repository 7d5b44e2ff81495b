"""megatron-core 0.19 (and torch 2.11) behaviours our training code works around, on CPU and GPU.

`cpu.py` makes megatron run without a GPU; the rows here are needed wherever megatron runs. Each
workaround is one row of `WORKAROUNDS`: where it applies, why, and what upstream change would make
it unnecessary. `tests/test_megatron.py` reproduces each upstream behaviour and fails when it is
gone, so a workaround that is no longer needed shows up (then delete its row and its function).

Callers: nam-spec's stack (recompute under the forward's function modes) and transformer_config
(weight gradients into main_grad), the trainer's set-up, checkpoints (which build and load the
optimizer's state through optimizer_sharded_state_dict and load_optimizer_state). This module
imports neither of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import _get_current_function_mode_stack

__all__ = [
    "SCHEDULE_KEYS",
    "WORKAROUNDS",
    "Workaround",
    "fuse_only_with_main_grad",
    "fuse_torch_adams",
    "holds_params",
    "import_before_enable",
    "inner_optimizers",
    "install_wgrad_accumulation",
    "load_distributed_optimizer",
    "load_optimizer_state",
    "merge_plain",
    "optimizer_sharded_state_dict",
    "plain_per_rank",
    "prime_adam_state",
    "reset_moe_state",
    "restore_schedule",
    "same_function_modes",
    "schedule_state",
]


@dataclass(frozen=True)
class Workaround:
    """One row of the workaround table."""

    name: str
    where: str  # the megatron-core (or torch) code whose behaviour it works around, and our callers
    why: str
    until: str  # the upstream change that would make it unnecessary


WORKAROUNDS: dict[str, Workaround] = {}


def _row(name: str, where: str, why: str, until: str) -> Workaround:
    row = Workaround(name, where, why, until)
    WORKAROUNDS[name] = row
    return row


# ---------------------------------------------------------------------------------------------
# Imports before nam_runtime.cpu.enable()
# ---------------------------------------------------------------------------------------------

_row(
    "import_before_enable",
    "nam_runtime.cpu.enable() swaps megatron's torch.compile'd helpers (megatron.core.jit.jit_fuser) "
    "for eager ones only in megatron modules already loaded; the trainer calls import_before_enable "
    "before dist.initialize",
    "a helper in a module loaded later (megatron.core.distributed, optimizer, pipeline_parallel, the "
    "MoE router nam-spec loads) stays compiled: on CPU inductor compiles C++ on its first call, tens "
    "of seconds per process. Harmless on GPU (imports only)",
    "megatron-core no longer wrapping helpers in torch.compile at import, or enable() patching modules "
    "as they are imported",
)

TRAINING_MODULES = (
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.pipeline_parallel",
)


def import_before_enable(*modules: str) -> None:
    """Import megatron's training modules and the caller's `modules` (names of modules that load
    more of megatron, e.g. a model package), before `nam_runtime.cpu.enable()` runs."""
    for name in (*TRAINING_MODULES, *modules):
        importlib.import_module(name)


# ---------------------------------------------------------------------------------------------
# megatron's process-wide MoE state
# ---------------------------------------------------------------------------------------------

_row(
    "reset_moe_state",
    "megatron.core.transformer.moe.moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale and "
    "moe.moe_logging's global metrics tracker; called by the trainer's set-up before building a model",
    "both are process-wide and outlive a model: a plain backward through an MoE layer leaves a 0-d "
    "aux-loss scale that the schedules' set_loss_scale cannot copy their [1] scale into, and the "
    "tracker keeps per-layer tables of the first model's depth (a deeper model indexes past them)",
    "megatron-core keeping this state per model, or set_loss_scale replacing the scale instead of "
    "copying into it",
)


def reset_moe_state() -> None:
    """Forget megatron's process-wide MoE state left by a model built earlier in this process (tests,
    benchmarks, notebooks); call before the first forward of the next one."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # the schedule makes its own from None
    destroy_moe_metrics_tracker()


# ---------------------------------------------------------------------------------------------
# torch's Adam inside megatron's optimizers (where Transformer Engine and Apex are absent)
# ---------------------------------------------------------------------------------------------

_row(
    "prime_adam_state",
    "megatron.core.optimizer: DistributedOptimizer.sharded_state_dict and Float16/FP32Optimizer's "
    "state dicts read each parameter's Adam `step`; the trainer's checkpoints call prime_adam_state "
    "before building one (a save before the first step, and the fresh optimizer a load fills)",
    "torch.optim.Adam creates its per-parameter state only on its first step, so megatron's state "
    "dict of an optimizer that has not stepped raises; TE's and Apex's fused Adam keep the step in "
    "the param group instead",
    "megatron-core building the state dict of an optimizer that has not stepped (or torch's Adam "
    "creating its state eagerly)",
)


def inner_optimizers(optimizer: Any) -> list[Any]:
    """The megatron optimizers inside `optimizer` (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adams(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    for opt in inner_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            yield inner


def _step_tensor(step: float | torch.Tensor, group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
    """A parameter's own Adam `step` (float32), where torch's Adam of `group` keeps it: on the
    parameter's device when the group is fused or capturable (its kernels read it there), on the
    CPU otherwise (torch's Adam._init_group)."""
    on_device = group.get("fused") or group.get("capturable")
    device = param.device if on_device else torch.device("cpu")
    return torch.as_tensor(step).to(device=device, dtype=torch.float32, copy=True)


def _place_steps(inner: torch.optim.Optimizer) -> None:
    """Move each `step` of the torch Adam `inner` where its param group now keeps it."""
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state.get(param)
            if state and "step" in state:
                state["step"] = _step_tensor(state["step"], group, param)


def prime_adam_state(optimizer: Any) -> None:
    """Give every parameter of a torch Adam inside `optimizer` that has not stepped yet the state
    its first step would create (zeros, step 0 where its group keeps it)."""
    for inner in _torch_adams(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))
                    if group.get("amsgrad"):
                        state.setdefault("max_exp_avg_sq", torch.zeros_like(param))
                    state["step"] = _step_tensor(0.0, group, param)


_row(
    "fuse_torch_adams",
    "megatron.core.optimizer.get_megatron_optimizer (without TE or Apex) builds torch.optim.AdamW "
    "(or Adam) from OptimizerConfig, which has no setting for torch's `fused`; the trainer's set-up "
    "calls fuse_torch_adams when training.fused_adam is on, and load_optimizer_state keeps each "
    "group's implementation (fused, foreach, capturable) over the checkpoint's",
    "torch then runs its default, the foreach path: several multi-tensor passes over params, grads "
    "and moments per step, where fused=True is one kernel pass. And torch's load_state_dict takes "
    "every group setting from the saved groups, so a checkpoint would turn fused on or off",
    "megatron-core's OptimizerConfig passing `fused` to torch's Adam (and torch's load_state_dict "
    "keeping the optimizer's own fused / foreach / capturable)",
)

# torch's choice of Adam kernels: the run's (its config), not the checkpoint's
_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")


def fuse_torch_adams(optimizer: Any) -> None:
    """Switch every torch Adam(W) inside `optimizer` to torch's fused implementation: defaults and
    param groups as `torch.optim.AdamW(..., fused=True)` would hold them (foreach unset: torch
    refuses both), any `step` already made moved where fused Adam keeps it."""
    for inner in _torch_adams(optimizer):
        for settings in (inner.defaults, *inner.param_groups):
            settings["fused"] = True
            settings["foreach"] = None
        inner._step_supports_amp_scaling = True  # as torch's constructor sets it for fused
        _place_steps(inner)


def _implementations(opt: Any) -> list[list[dict[str, Any]]]:
    return [
        [{key: group.get(key) for key in _IMPLEMENTATION_KEYS} for group in inner.param_groups]
        for inner in _torch_adams(opt)
    ]


def _keep_implementations(opt: Any, kept: list[list[dict[str, Any]]]) -> None:
    """Put back the implementation of each param group (from _implementations before a load), and
    each `step` where it then belongs."""
    for inner, groups in zip(_torch_adams(opt), kept, strict=True):
        for group, implementation in zip(inner.param_groups, groups, strict=True):
            group.update(implementation)
        _place_steps(inner)


_row(
    "load_distributed_optimizer",
    "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.load_state_dict (without TE or "
    "Apex) with its fully_reshardable loader; load_optimizer_state loads every distributed optimizer "
    "through load_distributed_optimizer",
    "with torch's Adam the distributed optimizer saves the step in its param groups; its load puts one "
    "shared step tensor in every parameter's state (torch's Adam then adds 1 to it once per "
    "parameter), and load_parameter_state_from_fully_reshardable then copies every tensor of that "
    "state from the checkpoint, which holds no `step` for it: KeyError 'step'",
    "megatron-core restoring a separate per-parameter `step` tensor, at the saved value, and its "
    "fully_reshardable loader skipping `step` on both sides",
)


def load_distributed_optimizer(opt: Any, state_dict: dict[str, Any]) -> None:
    """Load a DistributedOptimizer's fully_reshardable state dict (as dist_checkpointing read it):
    its param groups, then the parameter state (main params, Adam moments) without megatron's
    shared `step`, then each parameter's Adam `step` as saved, in its own tensor where its group
    keeps it."""
    state_dict = dict(state_dict)
    param_state = state_dict.pop("param_state")
    sharding = state_dict.pop("param_state_sharding_type")
    if sharding != "fully_reshardable":
        raise ValueError(f"load_distributed_optimizer: {sharding} state; it loads fully_reshardable only")
    opt.load_state_dict(state_dict)  # param groups (and the grad scaler), no parameter state
    adams = list(_torch_adams(opt))
    for inner in adams:
        for state in inner.state.values():
            state.pop("step", None)
    opt.load_parameter_state_from_fully_reshardable(param_state)
    for inner in adams:
        for group in inner.param_groups:
            step = float(group.pop("step"))  # torch's Adam keeps it per parameter only
            for param in group["params"]:
                inner.state[param]["step"] = _step_tensor(step, group, param)


# ---------------------------------------------------------------------------------------------
# The optimizer's sharded state dict (ChainedOptimizer's, part by part)
# ---------------------------------------------------------------------------------------------


def optimizer_sharded_state_dict(
    optimizer: Any, model_sharded: dict[str, Any], metadata: dict[str, Any], is_loading: bool
) -> dict[str, Any]:
    """The sharded state dict of each megatron optimizer inside `optimizer` as `chained_<i>`, with
    the rows below: an optimizer without parameters on this rank is left out (holds_params), and a
    non-distributed one's plain values are stored per rank (plain_per_rank). Tensor keys name the
    model parameter they belong to (megatron's fully reshardable form, no `chained_<i>.` prefix), so
    they are the same at every parallel layout."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts: dict[str, Any] = {}
    for index, opt in enumerate(inner_optimizers(optimizer)):
        if not holds_params(opt):
            continue
        part = opt.sharded_state_dict(model_sharded, is_loading, metadata=metadata)
        if not isinstance(opt, DistributedOptimizer):
            _common_step_on_cpu(part)
            part = plain_per_rank(part, f"optimizer.chained_{index}.plain")
        parts[f"chained_{index}"] = part
    return parts


def _common_step_on_cpu(part: dict[str, Any]) -> None:
    """The shared Adam `step` of a Float16 / FP32Optimizer state dict on the CPU, as unfused Adam
    keeps it: fused or not, the checkpoint holds the same (a device tensor there would load only
    where that device is)."""
    state = part.get("optimizer", part)["state"]
    if isinstance(state.get("common_step"), torch.Tensor):
        state["common_step"] = state["common_step"].cpu()


def load_optimizer_state(optimizer: Any, loaded: dict[str, Any]) -> None:
    """Load into each megatron optimizer inside `optimizer` its part of `loaded` (what
    dist_checkpointing read for optimizer_sharded_state_dict(..., is_loading=True)); its torch
    Adams keep their own implementation (fuse_torch_adams' row)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for index, opt in enumerate(inner_optimizers(optimizer)):
        if not holds_params(opt):
            continue
        part = loaded[f"chained_{index}"]
        kept = _implementations(opt)
        if isinstance(opt, DistributedOptimizer):
            load_distributed_optimizer(opt, part)
        else:
            opt.load_state_dict(merge_plain(part))
        _keep_implementations(opt, kept)


_row(
    "holds_params",
    "megatron.core.optimizer.get_megatron_optimizer gives every rank the same param groups, so a "
    "pipeline stage without expert layers gets an expert optimizer whose group is empty; "
    "DistributedOptimizer.state_dict (without TE or Apex) asserts that its parameters share one Adam "
    "`step`; optimizer_sharded_state_dict and load_optimizer_state skip an optimizer for which "
    "holds_params is False",
    "with torch's Adam the step lives in per-parameter state, and an optimizer without parameters has "
    "none, so megatron cannot build its state dict (prime_adam_state has nothing to prime); there is "
    "nothing of it to save on this rank",
    "DistributedOptimizer.state_dict accepting an optimizer without parameters (or get_megatron_optimizer "
    "leaving it out)",
)


def holds_params(opt: Any) -> bool:
    """Whether the megatron optimizer `opt` (one inside a ChainedOptimizer) has parameters on this rank."""
    inner = getattr(opt, "optimizer", None)
    return inner is not None and any(group["params"] for group in inner.param_groups)


_row(
    "plain_per_rank",
    "megatron.core.dist_checkpointing.save / load: the values of a sharded state dict that are not "
    "sharded (the common state dict) are written by rank 0 only and read by every rank; "
    "optimizer_sharded_state_dict stores those of megatron's non-distributed optimizers (Float16 / "
    "FP32Optimizer) through plain_per_rank, load_optimizer_state reads them back with merge_plain",
    "those optimizers leave their param groups (with the indices of this rank's parameters) and Adam's "
    "common step as plain values, and pipeline stages hold other parameters: every stage would load "
    "rank 0's groups. The distributed optimizer wraps its own in per-rank ShardedObjects already",
    "megatron's non-distributed optimizers wrapping their plain values in ShardedObjects of their "
    "model-parallel rank, as DistributedOptimizer does",
)


def plain_per_rank(part: dict[str, Any], key: str) -> dict[str, Any]:
    """A megatron optimizer's sharded state dict as {"sharded": its sharded values, "plain": the
    rest as this rank's own ShardedObject `<key>.rank_<rank>`}; merge_plain undoes it."""
    from megatron.core.dist_checkpointing.dict_utils import extract_matching_values
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedBase,
        ShardedObject,
    )

    sharded, plain = extract_matching_values(
        part, lambda v: isinstance(v, ShardedBase | LocalNonpersistentObject)
    )
    rank = torch.distributed.get_rank()
    return {"sharded": sharded, "plain": ShardedObject(f"{key}.rank_{rank}", plain, (1,), (0,), replica_id=0)}


def merge_plain(part: dict[str, Any]) -> dict[str, Any]:
    """The state dict that plain_per_rank split, as dist_checkpointing loaded it."""
    from megatron.core.dist_checkpointing.dict_utils import merge

    return merge(part["sharded"], part["plain"])


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule
# ---------------------------------------------------------------------------------------------

_row(
    "restore_schedule",
    "megatron.core.optimizer_param_scheduler.OptimizerParamScheduler.state_dict / load_state_dict; "
    "the trainer's checkpoints save schedule_state and call restore_schedule",
    "state_dict() leaves out init_lr, wsd_decay_steps and lr_wsd_decay_style; load_state_dict() adds "
    "the saved step count to the current one (a scheduler already stepped to step 1, as the trainer's "
    "set-up leaves it, ends one step ahead), sets the weight decay before restoring its schedule, and "
    "asserts or overrides the saved values when its flags say so",
    "OptimizerParamScheduler saving its whole schedule and loading it as saved",
)

# The attributes that define the schedule (OptimizerParamScheduler 0.19).
SCHEDULE_KEYS = (
    "max_lr",
    "min_lr",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_decay_style",
    "start_wd",
    "end_wd",
    "wd_incr_steps",
    "wd_incr_style",
    "num_steps",
    "init_lr",
    "wsd_decay_steps",
    "lr_wsd_decay_style",
)


def schedule_state(scheduler: Any) -> dict[str, Any]:
    """The whole schedule of an OptimizerParamScheduler, plain values."""
    return {key: getattr(scheduler, key) for key in SCHEDULE_KEYS}


def restore_schedule(scheduler: Any, saved: dict[str, Any]) -> list[str]:
    """Set the schedule exactly as `saved` (from schedule_state), with the learning rate and weight
    decay of every param group at its step; returns what differed from `scheduler`'s configured
    schedule, as "key configured -> saved" (the step count aside)."""
    differing = [
        f"{key} {getattr(scheduler, key)!r} -> {saved[key]!r}"
        for key in SCHEDULE_KEYS
        if key != "num_steps" and getattr(scheduler, key) != saved[key]
    ]
    for key in SCHEDULE_KEYS:
        setattr(scheduler, key, saved[key])
    scheduler.step(0)
    return differing


# ---------------------------------------------------------------------------------------------
# Weight gradients straight into main_grad (gradient_accumulation_fusion without apex)
# ---------------------------------------------------------------------------------------------

_LAYERS = "megatron.core.tensor_parallel.layers"

_row(
    "install_wgrad_accumulation",
    f"{_LAYERS}: `fused_weight_gradient_mlp_cuda` (apex's extension) and `_grad_accum_fusion_available`, "
    "which LinearWithGradAccumulationAndAsyncCommunication.backward calls and Column/RowParallelLinear "
    "check at construction when config.gradient_accumulation_fusion is on; nam-spec's transformer_config "
    "installs it before it turns fusion on",
    "without apex megatron refuses the fusion, and every linear returns a weight gradient that DDP's hook "
    "then adds to main_grad, one separate add per weight per micro-batch; nam_runtime.wgrad is the same "
    "GEMM accumulating into main_grad in torch (addmm with out_dtype on CUDA)",
    "megatron-core falling back to torch's addmm(out_dtype=...) where apex is absent",
)


def install_wgrad_accumulation() -> None:
    """Let megatron's linear layers accumulate weight gradients into ``main_grad`` with
    nam_runtime.wgrad in place of apex's extension (idempotent; before building the layers)."""
    from nam_runtime import wgrad

    layers = importlib.import_module(_LAYERS)
    layers.fused_weight_gradient_mlp_cuda = wgrad
    layers._grad_accum_fusion_available = True
    function = layers.LinearWithGradAccumulationAndAsyncCommunication
    if not getattr(function.forward, "_fuses_only_with_main_grad", False):
        function.forward = staticmethod(fuse_only_with_main_grad(function.forward))


_row(
    "fuse_only_with_main_grad",
    f"{_LAYERS}.LinearWithGradAccumulationAndAsyncCommunication.forward; installed by "
    "install_wgrad_accumulation",
    "with gradient_accumulation_fusion on, a weight without main_grad (a model used without megatron's "
    "DDP: nam-spec's tests, nam-train's load / evaluate / generate) keeps the fused flag in ctx, and the "
    "backward then reads main_grad of None (AttributeError); the flag is turned off for it, so such a "
    "weight gets its plain .grad",
    "megatron-core deciding the fused backward by the presence of main_grad, as its forward already "
    "does for the buffer it saves",
)


def fuse_only_with_main_grad(forward: Callable[..., Any]) -> Callable[..., Any]:
    """megatron's linear forward whose backward fuses only where the weight has a main_grad."""

    @functools.wraps(forward)
    def fused_where_main_grad(ctx: Any, *args: Any) -> Any:
        out = forward(ctx, *args)
        if ctx.main_grad is None:
            ctx.gradient_accumulation_fusion = False
        return out

    fused_where_main_grad._fuses_only_with_main_grad = True  # type: ignore[attr-defined]
    return fused_where_main_grad


# ---------------------------------------------------------------------------------------------
# Activation recomputation (torch.utils.checkpoint) under torch function modes
# ---------------------------------------------------------------------------------------------

_row(
    "same_function_modes",
    "torch.utils.checkpoint.checkpoint(use_reentrant=False): the recompute runs inside the autograd "
    "engine; nam-spec's stack passes same_function_modes as context_fn for full recomputation",
    "autograd runs the recompute with an empty torch function mode stack, so a mode of the forward "
    "(nam_runtime.cpu's device mapping, without which megatron's layers allocate on CUDA) is off "
    "there",
    "torch.utils.checkpoint re-entering the forward's function modes for the recompute",
)


def same_function_modes() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: the forward as it is, the recompute under the torch
    function modes active at the forward."""
    return contextlib.nullcontext(), _entered(_get_current_function_mode_stack())


@contextlib.contextmanager
def _entered(modes: list[Any]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for mode in modes:
            stack.enter_context(mode)
        yield
