"""Grouped-GEMM experts over PyTorch's grouped matmul.

megatron-core's only grouped expert class (TEGroupedMLP) needs Transformer Engine and its local
SequentialMLP runs one small GEMM per expert. ``torch.nn.functional.grouped_mm`` (torch 2.11) runs
all experts in one call: CUTLASS kernels for bf16 on sm90/sm100, a per-group loop inside ATen
elsewhere, and it runs on CPU for float32/bfloat16/float16. It refuses float64 and rows whose
byte stride is not a multiple of 16; :func:`grouped_linear` then falls back to a Python loop over
experts with the same result. Experts are never split by tensor parallelism here (megatron's
expert_tensor_parallel_size = 1): at FFN 896 the split GEMMs would be too thin to pay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict, ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import get_expert_parallel_rng_tracker_name
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from torch import nn
from torch.utils.checkpoint import checkpoint

from nam_spec.devices import param_device

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped_mm accepts these operands (dtype, device, 16-byte row strides)."""
    if x.device.type not in ("cpu", "cuda") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if x.dtype != weight.dtype:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and weight.shape[1] % align == 0


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block e of ``x`` (``counts[e]`` rows, in order) times ``weight[e].T``.

    x [T, K], weight [E, N, K], counts [E] integers summing to T -> [T, N].
    """
    if grouped_mm_runs(x, weight):
        offs = torch.cumsum(counts.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
        return F.grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=offs)
    outs = [xe @ we.T for xe, we in zip(torch.split(x, counts.tolist()), weight, strict=True)]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


class GroupedExperts(MegatronModule):
    """All local experts' SwiGLU MLPs as two grouped GEMMs (fc1 [E, 2F, H]: gate then up; fc2 [E, H, F])."""

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
        if pg_collection.expt_tp.size() != 1:
            raise ValueError(
                f"GroupedExperts: the expert tensor-parallel group has {pg_collection.expt_tp.size()} ranks; "
                "experts are not split here: initialise megatron's parallel state with expert_tensor_parallel_size=1"
            )
        if not config.gated_linear_unit or config.add_bias_linear:
            raise ValueError("GroupedExperts: SwiGLU experts without bias only (gated_linear_unit, no bias)")
        self.num_local_experts = num_local_experts
        self.ep_group, self.expt_dp_group = pg_collection.ep, pg_collection.expt_dp
        f, h = config.moe_ffn_hidden_size, config.hidden_size
        device = param_device(config)
        kw = {"device": device, "dtype": config.params_dtype}
        self.fc1_weight = nn.Parameter(torch.empty(num_local_experts, 2 * f, h, **kw))
        self.fc2_weight = nn.Parameter(torch.empty(num_local_experts, h, f, **kw))
        if config.perform_initialization:  # experts differ across EP ranks, agree within expert-DP
            with (
                torch.no_grad(),
                tensor_parallel.get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()),
            ):
                for e in range(num_local_experts):
                    config.init_method(self.fc1_weight[e])
                    config.output_layer_init_method(self.fc2_weight[e])
        for p in (self.fc1_weight, self.fc2_weight):
            p.allreduce = False  # reduced over the expert data-parallel group, not all of DP
            p.tensor_model_parallel = False
        self.recompute_activation = config.recompute_granularity == "selective" and "moe_act" in (
            config.recompute_modules or []
        )

    def forward(
        self, permuted_hidden: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        counts = tokens_per_expert
        h = grouped_linear(permuted_hidden, self.fc1_weight, counts)
        probs = permuted_probs.unsqueeze(-1)
        if self.recompute_activation:  # keep fc1's output only; recompute SwiGLU in backward
            act = checkpoint(_swiglu_weighted, h, probs, use_reentrant=False)
        else:
            act = _swiglu_weighted(h, probs)
        return grouped_linear(act, self.fc2_weight, counts), None

    def backward_dw(self) -> None:  # weight gradients are not deferred
        return None

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Global [num_experts, ...] tensors split along the expert axis by EP; one replica saves."""
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        out: ShardedStateDict = {}
        for name in ("fc1_weight", "fc2_weight"):
            tensor = getattr(self, name)
            out[f"{prefix}{name}"] = ShardedTensor.from_rank_offsets(
                f"{prefix}{name}",
                tensor,
                *sharded_offsets,
                (len(sharded_offsets), ep_rank, ep_size),
                replica_id=(0, 0, self.expt_dp_group.rank()),
                prepend_axis_num=len(sharded_offsets),
            )
        return out


def _swiglu_weighted(h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up * probs).to(h.dtype)
