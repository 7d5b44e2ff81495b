"""Grouped-GEMM experts over PyTorch's grouped matmul.

megatron-core's only grouped expert class (TEGroupedMLP) needs Transformer Engine and its local
SequentialMLP runs one small GEMM per expert. ``torch.nn.functional.grouped_mm`` (torch 2.11) runs
all experts in one call: CUTLASS kernels for bf16 on sm90/sm100, a per-group loop inside ATen
elsewhere, and it runs on CPU for float32/bfloat16/float16. It refuses float64 and rows whose
byte stride is not a multiple of 16; :func:`grouped_linear` then falls back to a Python loop over
experts with the same result.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.tensor_parallel import get_expert_parallel_rng_tracker_name
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from nam_mixers.ops.moe import weighted_swiglu
from nam_spec.devices import param_device

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ActivationHook = Callable[[torch.Tensor, torch.Tensor], None]


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped_mm accepts these operands (dtype, device, 16-byte row strides)."""
    if x.device.type not in ("cpu", "cuda") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x.dtype != weight.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and weight.shape[1] % align == 0


def group_offsets(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """grouped_mm's ``offs``: the end row of each expert's block, int32 on ``device``."""
    return torch.cumsum(counts.to(device=device, dtype=torch.int32), 0, dtype=torch.int32)


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Row block e of ``x`` (``counts[e]`` rows, in order) times ``weight[e].T``.

    x [T, K], weight [E, N, K], counts [E] integers summing to T -> [T, N]. ``offsets``:
    ``group_offsets(counts, x.device)`` where the caller has it already (the two GEMMs of an
    experts layer share it); made here otherwise.
    """
    if grouped_mm_runs(x, weight):
        offs = group_offsets(counts, x.device) if offsets is None else offsets
        return F.grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=offs)
    outs = [xe @ we.T for xe, we in zip(torch.split(x, counts.tolist()), weight, strict=True)]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


class GroupedExperts(MegatronModule):
    """All local experts' SwiGLU MLPs as two grouped GEMMs.

    fc1_weight [E_local, 2 * F_local, H] holds this rank's slice of every expert's gate rows, then
    of its up rows; fc2_weight [E_local, H, F_local] the matching columns. E is split by expert
    parallelism, F by expert tensor parallelism (megatron's token dispatcher gathers the tokens
    of the expert-TP group and reduce-scatters the partial outputs). Checkpoints hold global
    [E, F, H] gate and up tensors and [E, H, F] fc2, so they load at any EP / expert-TP size.
    """

    def __init__(
        self,
        num_local_experts: int,
        config: TransformerConfig,
        *,
        pg_collection: ProcessGroupCollection | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        if not config.gated_linear_unit or config.add_bias_linear:
            raise ValueError("GroupedExperts: SwiGLU experts without bias only (gated_linear_unit, no bias)")
        self.num_local_experts = num_local_experts
        self.ep_group, self.etp_group, self.expt_dp_group = (
            pg_collection.ep,
            pg_collection.expt_tp,
            pg_collection.expt_dp,
        )
        etp = self.etp_group.size()
        if config.moe_ffn_hidden_size % etp:
            raise ValueError(
                f"GroupedExperts: expert FFN {config.moe_ffn_hidden_size} does not split over {etp} "
                "expert tensor-parallel ranks"
            )
        f, h = config.moe_ffn_hidden_size // etp, config.hidden_size
        kw = {"device": param_device(config), "dtype": config.params_dtype}
        self.fc1_weight = nn.Parameter(torch.empty(num_local_experts, 2 * f, h, **kw))
        self.fc2_weight = nn.Parameter(torch.empty(num_local_experts, h, f, **kw))
        if config.perform_initialization:  # differs across EP and expert-TP ranks, agrees within expert-DP
            with (
                torch.no_grad(),
                tensor_parallel.get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()),
            ):
                for e in range(num_local_experts):
                    config.init_method(self.fc1_weight[e])
                    config.output_layer_init_method(self.fc2_weight[e])
        for p, dim in ((self.fc1_weight, 1), (self.fc2_weight, 2)):
            p.allreduce = False  # reduced over the expert data-parallel group, not all of DP
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = etp > 1, dim, 1
        self.recompute_activation = config.recompute_granularity == "selective" and "moe_act" in (
            config.recompute_modules or []
        )
        self._activation_hooks: OrderedDict[int, ActivationHook] = OrderedDict()

    def forward(
        self, permuted_hidden: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        counts = tokens_per_expert
        # one cumsum (and, from megatron's dispatchers, one host-to-device copy of the counts) for
        # both GEMMs
        offsets = (
            group_offsets(counts, permuted_hidden.device)
            if grouped_mm_runs(permuted_hidden, self.fc1_weight)
            else None
        )
        h = grouped_linear(permuted_hidden, self.fc1_weight, counts, offsets)
        if self.recompute_activation:  # keep fc1's output only; recompute SwiGLU in backward
            act = checkpoint(
                weighted_swiglu, h, permuted_probs, use_reentrant=False, preserve_rng_state=False
            )  # no RNG
        else:
            act = weighted_swiglu(h, permuted_probs)
        for hook in list(self._activation_hooks.values()):
            hook(act, counts)
        return grouped_linear(act, self.fc2_weight, counts, offsets), None

    def backward_dw(self) -> None:  # weight gradients are not deferred
        return None

    def plasticity_parts(self) -> dict[str, Any]:
        """nam-plasticity's plasticity-parts protocol. rows: every local expert separately, fc1
        as its gate and up halves (this rank's F slice of each), fc2 whole. neurons: each
        expert's hidden units (unit i: gate row i and up row i of fc1, column i of fc2), split
        over expert TP, their activations delivered by ``register_activation_hook``."""
        f = self.fc2_weight.shape[2]
        return {
            "rows": {
                "fc1_weight": {"parts": (("gate", f), ("up", f)), "expert_dim": 0, "group": self.etp_group},
                "fc2_weight": {"expert_dim": 0, "group": self.etp_group},
            },
            "neurons": {
                "fc1": "fc1_weight",
                "fc2": "fc2_weight",
                "gated": True,
                "group": self.etp_group,
                "init_std": self.config.init_method_std,
                "activations": self.register_activation_hook,
            },
        }

    def register_activation_hook(self, hook: ActivationHook) -> RemovableHandle:
        """Call ``hook(activations [tokens, F_local], tokens_per_expert [E_local])`` with fc2's
        input (SwiGLU output times routing probability, rows grouped by expert) every forward."""
        handle = RemovableHandle(self._activation_hooks)
        self._activation_hooks[handle.id] = hook
        return handle

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Global tensors split along the expert axis by EP and the FFN axis by expert TP."""
        ep = (self.ep_group.rank(), self.ep_group.size())
        etp = (self.etp_group.rank(), self.etp_group.size())
        n = len(sharded_offsets)
        out: ShardedStateDict = {}
        for name, ffn_axis in (("fc1_weight", 1), ("fc2_weight", 2)):
            key = f"{prefix}{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key,
                getattr(self, name),
                *sharded_offsets,
                (n, *ep),
                (n + ffn_axis, *etp),
                replica_id=(0, 0, self.expt_dp_group.rank()),
                prepend_axis_num=n,
            )
        f_local = self.fc2_weight.shape[2]
        gate_up = _split_tensor_factory(out[f"{prefix}fc1_weight"], [f_local, f_local], ["gate", "up"], 1)
        out[f"{prefix}fc1_weight"] = dataclasses.replace(gate_up, merge_fn=_cat_gate_up)
        return out


def _cat_gate_up(parts: list[torch.Tensor]) -> torch.Tensor:
    """Loading: this rank's gate and up slices back into fc1 [E_local, 2 * F_local, H]."""
    return torch.cat(parts, dim=1)
