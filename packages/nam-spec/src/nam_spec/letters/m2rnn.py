"""R: the M2RNN recurrent mixer (nam_mixers.M2RNNCore) between parallel projections.

    norm -> M2RNNAdapter: q/k projection (replicated, shared heads) and v/g/forget projection
            (column-parallel) -> conv -> non-linear scan -> gated RMSNorm -> out_proj (row-parallel) -> bda

"selective" recomputes the core in backward, keeping only its two inputs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.base import LetterParams, activation_bytes
from nam_spec.letters.mixer import MixerLetter

if TYPE_CHECKING:
    pass

PATHS = ("auto", "triton", "reference")
CHECKPOINT_STEPS = 32  # nam_mixers M2RNNKernelConfig.chunk: the scan stores its state this often


class M2RNN(MixerLetter):
    letter = "R"
    name = "M2RNN"
    section = "m2rnn"

    def adapter(self, config: ModelConfig) -> type:
        from nam_spec.adapters import M2RNNAdapter

        return M2RNNAdapter

    def summary(self, config: ModelConfig) -> str:
        r = config.m2rnn
        return f"M2RNN {r.num_heads} x {r.head_dim_v} (k {r.head_dim_k})"

    def params(self, config: ModelConfig) -> LetterParams:
        h, r = config.hidden_size, config.m2rnn
        qk, hv = 2 * r.num_qk_heads * r.head_dim_k, r.num_heads * r.head_dim_v
        mm = qk * h + h * r.num_heads * (2 * r.head_dim_v + 1) + hv * h
        core = (qk + hv) * (r.conv_width + 1) + 3 * r.num_heads + r.num_heads * r.head_dim_v**2 + hv
        total = mm + core + h
        # the shared q/k head (projection and conv) and the pre-norm are replicated; the rest follows
        # the rank's value heads
        replicated = qk * h + qk * (r.conv_width + 1) + h
        return LetterParams(total, total, mm, tensor_split=total - replicated, expert=0)

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        # the shared q/k head is whole on every rank (gathered over the sequence); the rest holds the
        # rank's value heads
        a, r, t = activation_bytes(config), config.m2rnn, tokens
        heads = r.num_heads // parallel.tensor
        hv, qk = heads * r.head_dim_v, 2 * r.num_qk_heads * r.head_dim_k
        qk_proj = a * t * qk  # q/k projection output (the conv's input; the checkpoint's too)
        out = a * t * hv  # out_proj's input
        vgf = a * t * heads * (2 * r.head_dim_v + 1)  # in_proj output: v, g, x_f per head
        if policy == "selective":  # the core checkpoint keeps its two inputs only
            return qk_proj + vgf + out
        q_k = a * t * qk  # conv output split into q and k, made contiguous for the scan
        v = 2 * a * t * hv  # v before the conv (a copy out of in_proj's output) and after
        gate = 3 * 4 * t * heads  # fp32 forget gate: softplus input and output, f
        steps = micro_batch * math.ceil(config.seq_length / CHECKPOINT_STEPS)
        states = 4 * steps * heads * r.head_dim_k * r.head_dim_v  # the scan's fp32 state checkpoints
        # the fp32 epilogue: (y + D v) * silu(g), then the per-head RMSNorm, keeps six [t, hv] tensors
        # (g and v upcast, the sum, silu(g), the product, the normed product) and the rsqrt per head;
        # in fp32 the upcasts are no-ops: g stays a view that keeps in_proj's output, v is the saved v
        epilogue = (6 * 4 * t * hv if a < 4 else 4 * 4 * t * hv + vgf) + 4 * t * heads
        return qk_proj + q_k + v + gate + states + epilogue + out

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        r, tp = config.m2rnn, parallel.tensor
        out = []
        for key in ("num_heads", "head_dim_v", "head_dim_k", "num_qk_heads", "conv_width"):
            if getattr(r, key) < 1:
                out.append(f"model.m2rnn.{key} {getattr(r, key)} must be >= 1")
        if out:
            return out
        if r.num_heads % tp:
            out.append(f"model.m2rnn.num_heads {r.num_heads} is not divisible by parallel.tensor {tp}")
        if r.num_heads % r.num_qk_heads:
            out.append(
                f"model.m2rnn.num_heads {r.num_heads} is not a multiple of model.m2rnn.num_qk_heads "
                f"{r.num_qk_heads}"
            )
        if tp > 1 and not parallel.sequence_parallel:
            out.append(
                "R layers with parallel.tensor > 1 need parallel.sequence_parallel = true: the shared q/k "
                "head is replicated and its gradient is summed across ranks by the sequence-parallel reduction"
            )
        if r.path not in PATHS:
            out.append(f"model.m2rnn.path {r.path!r}; accepted: {', '.join(map(repr, PATHS))}")
        return out
