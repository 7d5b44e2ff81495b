"""nam_runtime.megatron: each test reproduces the upstream behaviour its workaround exists for, and
fails once megatron-core or torch no longer behaves that way (then drop the row), and checks
that the workaround answers it."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import traceback
import types
from pathlib import Path
from typing import Any

import gpt
import pytest
import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils.checkpoint import checkpoint

from nam_runtime import dist, megatron
from nam_runtime.testing import run_ranks


def test_every_workaround_is_documented() -> None:
    for row in megatron.WORKAROUNDS.values():
        assert row.where and row.why and row.until, row.name
        assert callable(getattr(megatron, row.name)), row.name  # each row names its function


def test_readme_table_lists_exactly_the_workarounds() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## The workarounds", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    assert rows == list(megatron.WORKAROUNDS)


# ---------------------------------------------------------------------------------------------
# import_before_enable
# ---------------------------------------------------------------------------------------------

_COMPILED_LEFT = """
import inspect, json, sys, warnings
warnings.simplefilter("ignore")
from nam_runtime import cpu, megatron
{first}
{second}
left = []
for name, mod in list(sys.modules.items()):
    if name.startswith("megatron.") and mod is not None:
        for value in vars(mod).values():
            members = vars(value).values() if inspect.isclass(value) and value.__module__ == name else ()
            for fn in (value, *(m.__func__ if isinstance(m, staticmethod) else m for m in members)):
                if cpu._is_megatron_compiled(fn):
                    left.append(fn._torchdynamo_orig_callable.__qualname__)
print(json.dumps(left))
"""


def _compiled_left(first: str, second: str) -> list[str]:
    script = _COMPILED_LEFT.format(first=first, second=second)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="cpu.enable() is a no-op with CUDA")
def test_import_before_enable() -> None:
    # megatron compiles helpers at import; enable() makes eager only those of modules loaded by then
    after = _compiled_left("cpu.enable()", "megatron.import_before_enable()")
    assert after, "megatron's training modules no longer load torch.compile'd helpers: drop the row"
    assert _compiled_left("megatron.import_before_enable()", "cpu.enable()") == []


# ---------------------------------------------------------------------------------------------
# reset_moe_state
# ---------------------------------------------------------------------------------------------


def test_reset_moe_state() -> None:
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    megatron.reset_moe_state()
    x, aux = torch.ones(2, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    MoEAuxLossAutoScaler.apply(x, aux).sum().backward()  # a plain backward, outside the schedules
    with pytest.raises(RuntimeError, match="broadcast shape"):
        MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # what the schedules do
    get_moe_metrics_tracker().ensure_initialized("load_balancing_loss", 2, device="cpu")
    get_moe_metrics_tracker().ensure_initialized("load_balancing_loss", 4, device="cpu")  # a deeper model
    assert get_moe_metrics_tracker().metrics["load_balancing_loss"].values.shape == (2,)

    megatron.reset_moe_state()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    get_moe_metrics_tracker().ensure_initialized("load_balancing_loss", 4, device="cpu")
    assert get_moe_metrics_tracker().metrics["load_balancing_loss"].values.shape == (4,)
    megatron.reset_moe_state()


# ---------------------------------------------------------------------------------------------
# prime_adam_state, load_distributed_optimizer
# ---------------------------------------------------------------------------------------------

_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "singleton_local_shards": False}


def _optimizer(**config: Any) -> tuple[Any, Any]:
    """This stage's part of a GPT (gpt.config(**config)) in megatron's DDP, and its distributed
    optimizer (a ChainedOptimizer, of the dense and the expert parameters; torch's Adam: no TE, no
    Apex)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    cfg = gpt.config(**config)
    module = gpt.model(cfg)
    for name, param in module.named_parameters():
        if ".experts." in name:  # as nam-spec marks its experts (megatron's only at EP > 1)
            param.allreduce = False  # reduced over the expert data-parallel group: their own optimizer
    ddp = DistributedDataParallel(
        cfg, DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True), module
    )
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [ddp]
    )
    return module, opt


def _steps(opt: Any) -> list[tuple[int, float]]:
    return [(id(s["step"]), float(s["step"])) for s in opt.optimizer.state.values()]


def _adam_rank(directory: str) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    dist.initialize(seed=1)
    module, opt = _optimizer(moe=False, layers=2)
    unprimed = None
    try:
        opt.sharded_state_dict(module.sharded_state_dict(), False, metadata=_METADATA)
    except (KeyError, AssertionError, IndexError) as exc:
        unprimed = repr(exc)
    megatron.prime_adam_state(opt)
    for _ in range(2):
        opt.zero_grad()
        opt.step()  # zero gradients: the steps count all the same
    sharded = {"optimizer": opt.sharded_state_dict(module.sharded_state_dict(), False, metadata=_METADATA)}
    dist_checkpointing.save(sharded, directory, content_metadata=dict(_METADATA))

    module, fresh = _optimizer(moe=False, layers=2)
    megatron.prime_adam_state(fresh)
    target = {"optimizer": fresh.sharded_state_dict(module.sharded_state_dict(), True, metadata=_METADATA)}
    loaded = dist_checkpointing.load(target, directory)
    as_megatron_loads = None
    try:
        fresh.load_state_dict(copy.deepcopy(loaded["optimizer"]))
    except KeyError as exc:
        as_megatron_loads = repr(exc)
    module, fresh = _optimizer(moe=False, layers=2)
    megatron.prime_adam_state(fresh)
    target = {"optimizer": fresh.sharded_state_dict(module.sharded_state_dict(), True, metadata=_METADATA)}
    (inner,) = megatron.inner_optimizers(fresh)  # a ChainedOptimizer of one: its state dict is that one's
    megatron.load_distributed_optimizer(inner, dist_checkpointing.load(target, directory)["optimizer"])
    pairs = [
        (p, q)
        for old_group, new_group in zip(opt.optimizer.param_groups, fresh.optimizer.param_groups, strict=True)
        for p, q in zip(old_group["params"], new_group["params"], strict=True)
    ]
    same = all(  # the main params (another initialisation before the load) and the moments
        torch.equal(p, q)
        and all(
            torch.equal(opt.optimizer.state[p][k], fresh.optimizer.state[q][k])
            for k in ("exp_avg", "exp_avg_sq")
        )
        for p, q in pairs
    )
    return {
        "unprimed": unprimed,
        "as_megatron_loads": as_megatron_loads,
        "restored": _steps(fresh),
        "same": same,
    }


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A distributed optimizer stepped twice, saved and loaded into a fresh one, on one CPU rank."""
    (result,) = run_ranks(_adam_rank, 1, str(tmp_path_factory.mktemp("adam")))
    return result


@pytest.mark.skipif(torch.cuda.is_available(), reason="one CPU rank")
def test_prime_adam_state(adam_run: dict[str, Any]) -> None:
    # megatron cannot build the state dict of a torch Adam that has not stepped
    assert adam_run["unprimed"] is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="one CPU rank")
def test_load_distributed_optimizer(adam_run: dict[str, Any]) -> None:
    # megatron's own load copies a `step` the fully_reshardable checkpoint does not hold
    assert adam_run["as_megatron_loads"] == "KeyError('step')", adam_run["as_megatron_loads"]
    ids, values = zip(*adam_run["restored"], strict=True)
    assert len(set(ids)) == len(ids) and set(values) == {2.0}  # one step tensor per parameter, as saved
    assert adam_run["same"]


# ---------------------------------------------------------------------------------------------
# fuse_torch_adams (and the `step` placement of prime_adam_state and load_optimizer_state)
# ---------------------------------------------------------------------------------------------


def _adams(opt: Any) -> list[torch.optim.Optimizer]:
    return [sub.optimizer for sub in megatron.inner_optimizers(opt)]


def _implementation(opt: Any) -> set[tuple[Any, Any]]:
    """(fused, foreach) of the param groups of its torch Adams (what their step reads)."""
    return {(g["fused"], g["foreach"]) for inner in _adams(opt) for g in inner.param_groups}


def _step_places(opt: Any) -> list[tuple[int, float, bool, torch.dtype]]:
    """Per parameter: its step tensor's id and value, whether it is on the parameter's device, its dtype."""
    return [
        (id(s["step"]), float(s["step"]), s["step"].device == p.device, s["step"].dtype)
        for inner in _adams(opt)
        for g in inner.param_groups
        for p in g["params"]
        for s in [inner.state[p]]
    ]


def test_fuse_torch_adams_places_step_where_fused_adam_keeps_it() -> None:
    # params on the meta device: a `step` on the CPU and one on the parameter's device differ here
    param = torch.nn.Parameter(torch.empty(3, device="meta"))
    opt = types.SimpleNamespace(optimizer=torch.optim.AdamW([param]))  # a megatron optimizer's shape
    megatron.prime_adam_state(opt)
    assert opt.optimizer.state[param]["step"].device.type == "cpu"  # unfused: torch keeps it there
    megatron.fuse_torch_adams(opt)
    assert _implementation(opt) == {(True, None)}
    assert (opt.optimizer.defaults["fused"], opt.optimizer.defaults["foreach"]) == (True, None)
    assert opt.optimizer._step_supports_amp_scaling  # as torch.optim.AdamW(..., fused=True) holds them
    step = opt.optimizer.state[param]["step"]
    assert step.device.type == "meta" and step.dtype == torch.float32
    fresh = types.SimpleNamespace(optimizer=torch.optim.AdamW([param]))
    megatron.fuse_torch_adams(fresh)
    megatron.prime_adam_state(fresh)  # fused before any state: primed where fused Adam keeps it
    assert fresh.optimizer.state[param]["step"].device.type == "meta"


def _fused_rank(directory: str) -> dict[str, Any]:
    """Two optimizers, unfused and fused, each stepped twice and saved; each checkpoint loaded into
    a fresh optimizer of the other kind, by megatron's way and by load_optimizer_state."""
    from megatron.core import dist_checkpointing

    dist.initialize(seed=1)
    out: dict[str, Any] = {}
    for fused in (False, True):
        module, opt = _optimizer(moe=False, layers=2)
        out.setdefault("megatron_builds", _implementation(opt))
        if fused:
            megatron.fuse_torch_adams(opt)
        megatron.prime_adam_state(opt)
        for _ in range(2):
            opt.zero_grad()
            opt.step()
        parts = megatron.optimizer_sharded_state_dict(opt, module.sharded_state_dict(), _METADATA, False)
        path = Path(directory) / f"fused_{fused}"
        path.mkdir()
        dist_checkpointing.save({"optimizer": parts}, str(path), content_metadata=dict(_METADATA))

        for keep in (False, True):  # megatron's own load (of the one part), then ours
            module, fresh = _optimizer(moe=False, layers=2)
            if not fused:
                megatron.fuse_torch_adams(fresh)
            megatron.prime_adam_state(fresh)
            target = megatron.optimizer_sharded_state_dict(
                fresh, module.sharded_state_dict(), _METADATA, True
            )
            loaded = dist_checkpointing.load({"optimizer": target}, str(path))["optimizer"]
            if keep:
                megatron.load_optimizer_state(fresh, loaded)
            else:
                (inner,) = megatron.inner_optimizers(fresh)
                megatron.load_distributed_optimizer(inner, loaded["chained_0"])
            out[(fused, keep)] = {"implementation": _implementation(fresh), "steps": _step_places(fresh)}
    return out


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    (result,) = run_ranks(_fused_rank, 1, str(tmp_path_factory.mktemp("fused")))
    return result


@pytest.mark.skipif(torch.cuda.is_available(), reason="one CPU rank")
def test_fuse_torch_adams(fused_run: dict[str, Any]) -> None:
    # megatron builds torch's AdamW without `fused`: torch then takes its foreach path
    assert fused_run["megatron_builds"] == {(None, None)}
    # torch's load_state_dict takes the implementation from the saved groups
    assert fused_run[(False, False)]["implementation"] == {(None, None)}
    assert fused_run[(True, False)]["implementation"] == {(True, None)}
    # load_optimizer_state keeps the run's, and each `step` where that run's Adam keeps it
    assert fused_run[(False, True)]["implementation"] == {(True, None)}
    assert fused_run[(True, True)]["implementation"] == {(None, None)}
    for saved in (False, True):
        ids, values, on_param_device, dtypes = zip(*fused_run[(saved, True)]["steps"], strict=True)
        assert len(set(ids)) == len(ids) and set(values) == {2.0}  # one step tensor per parameter, as saved
        assert all(on_param_device) and set(dtypes) == {torch.float32}


# ---------------------------------------------------------------------------------------------
# holds_params, plain_per_rank (optimizer_sharded_state_dict, load_optimizer_state)
# ---------------------------------------------------------------------------------------------


def _paramless_rank() -> dict[str, Any]:
    dist.initialize(pipeline_parallel=2, seed=1)
    module, opt = _optimizer(moe=True, layers=2)  # layer 1 is the MoE one: stage 0 holds no experts
    megatron.prime_adam_state(opt)
    model_sharded = module.sharded_state_dict()
    refused = None
    try:
        opt.sharded_state_dict(model_sharded, False, metadata=_METADATA)  # megatron's own, every part
    except AssertionError as exc:
        refused = traceback.extract_tb(exc.__traceback__)[-1].name
    parts = megatron.optimizer_sharded_state_dict(opt, model_sharded, _METADATA, is_loading=False)
    return {
        "held": [megatron.holds_params(sub) for sub in megatron.inner_optimizers(opt)],
        "refused": refused,
        "parts": sorted(parts),
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks")
def test_holds_params() -> None:
    stage0, stage1 = run_ranks(_paramless_rank, 2)
    # the stage without expert layers has an expert optimizer without parameters, and megatron
    # cannot build its state dict
    assert stage0["held"] == [True, False] and stage0["refused"] == "state_dict"
    assert stage1["held"] == [True, True] and stage1["refused"] is None
    assert stage0["parts"] == ["chained_0"] and stage1["parts"] == ["chained_0", "chained_1"]


def _groups(rank: int) -> dict[str, Any]:
    return {"param_groups": [{"params": list(range(rank + 1)), "lr": 0.1}]}  # this stage's parameters


def _plain_rank(directory: str) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    rank = dist.initialize(seed=1).rank
    state = {"common": _groups(rank), "own": megatron.plain_per_rank(_groups(rank), "own")}
    dist_checkpointing.save(state, directory)
    state = {"common": _groups(rank), "own": megatron.plain_per_rank(_groups(rank), "own")}
    loaded = dist_checkpointing.load(state, directory)
    return {"common": loaded["common"], "own": megatron.merge_plain(loaded["own"])}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU ranks")
def test_plain_per_rank(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(_plain_rank, 2, str(tmp_path))
    assert rank1["common"] == _groups(0)  # dist_checkpointing stores plain values from rank 0 only
    assert rank0["own"] == _groups(0) and rank1["own"] == _groups(1)


# ---------------------------------------------------------------------------------------------
# restore_schedule
# ---------------------------------------------------------------------------------------------


def _scheduler(warmup: int, decay: int) -> Any:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = types.SimpleNamespace(param_groups=[{"params": []}])
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=1e-2,
        min_lr=1e-3,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style="cosine",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    scheduler.step(1)  # the trainer's set-up: the counter holds the step about to run
    return scheduler


def test_restore_schedule() -> None:
    saved = _scheduler(2, 20)
    for _ in range(3):
        saved.step(1)
    assert "init_lr" not in saved.state_dict()  # megatron's state dict misses part of the schedule
    same = _scheduler(2, 20)
    same.load_state_dict(saved.state_dict())
    assert same.num_steps == saved.num_steps + 1  # added to the step count it had

    other = _scheduler(5, 40)
    differing = megatron.restore_schedule(other, megatron.schedule_state(saved))
    assert differing == ["lr_warmup_steps 5 -> 2", "lr_decay_steps 40 -> 20", "wd_incr_steps 40 -> 20"]
    assert megatron.schedule_state(other) == megatron.schedule_state(saved)
    assert other.optimizer.param_groups[0]["lr"] == saved.optimizer.param_groups[0]["lr"]


# ---------------------------------------------------------------------------------------------
# install_wgrad_accumulation, fuse_only_with_main_grad
# ---------------------------------------------------------------------------------------------

# A fresh process: the installation is process-wide and cannot be undone.
_WGRAD = """
import json, warnings
warnings.simplefilter("ignore")
import torch
from megatron.core.tensor_parallel import layers
from nam_runtime import cpu, megatron, wgrad

cpu.enable()  # megatron's backward allocates the dummy weight gradient on torch.cuda.current_device()

def backward(main_grad):
    torch.manual_seed(0)
    w, x = torch.nn.Parameter(torch.randn(3, 4)), torch.randn(2, 5, 4)
    if main_grad:
        w.main_grad, w.grad_added_to_main_grad = torch.ones(3, 4), False
    y = layers.LinearWithGradAccumulationAndAsyncCommunication.apply(x, w, None, True, False, False, None, 0, None, 1)
    try:
        y.sum().backward()
    except AttributeError as err:
        return repr(err)
    dense = torch.ones(2, 5, 3).reshape(-1, 3).t() @ x.reshape(-1, 4)
    if main_grad:
        return {"main_grad": torch.allclose(w.main_grad, 1 + dense), "marked": w.grad_added_to_main_grad}
    return {"grad": torch.allclose(w.grad, dense)}

out = {"available": layers._grad_accum_fusion_available}
layers.fused_weight_gradient_mlp_cuda = wgrad  # the op alone, without the forward's gate
out["upstream_without_main_grad"] = backward(False)
megatron.install_wgrad_accumulation()
megatron.install_wgrad_accumulation()  # idempotent
out["without_main_grad"] = backward(False)
out["with_main_grad"] = backward(True)
print(json.dumps(out))
"""


def test_install_wgrad_accumulation() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _WGRAD], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["available"] is False, "megatron finds apex's extension: drop install_wgrad_accumulation"
    assert "'NoneType' object has no attribute 'dtype'" in result["upstream_without_main_grad"], (
        "megatron's fused backward no longer fails on a weight without main_grad: drop fuse_only_with_main_grad"
    )
    assert result["without_main_grad"] == {"grad": True}
    assert result["with_main_grad"] == {"main_grad": True, "marked": True}


# ---------------------------------------------------------------------------------------------
# same_function_modes
# ---------------------------------------------------------------------------------------------


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def _recompute_modes(**context: Any) -> list[int]:
    seen: list[int] = []

    def layer(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(_get_current_function_mode_stack()))
        return x.sin()

    x = torch.ones(3, requires_grad=True)
    with _Mode():
        checkpoint(layer, x, use_reentrant=False, **context).sum().backward()
    return seen  # [forward, recompute]


def test_same_function_modes() -> None:
    assert _recompute_modes() == [1, 0]  # torch recomputes without the forward's modes
    assert _recompute_modes(context_fn=megatron.same_function_modes) == [1, 1]
