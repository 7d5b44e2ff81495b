"""M: nam-mixers' Mamba-2 SSD core (kind "mamba2") or Mamba-3 SISO core (kind "mamba3") between
parallel projections.

    mamba2: norm -> MambaAdapter: in_proj [z, x, B, C, dt] (column-parallel) -> conv -> SSD scan ->
            gated RMSNorm -> out_proj (row-parallel) -> bda
    mamba3: norm -> Mamba3Adapter: in_proj [z, x, B, C, dt, A, trap] (column-parallel) and the angle
            projection (replicated, shared by the heads) -> B/C RMSNorm, rotary, trapezoidal scan,
            D skip, z gate -> out_proj (row-parallel) -> bda

"selective" recomputes the core in backward.
"""

from __future__ import annotations

from typing import Any

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.base import LetterParams, activation_bytes
from nam_spec.letters.mixer import MixerLetter

KINDS = ("mamba2", "mamba3")
PATHS = {"mamba2": ("auto", "fused", "split", "reference"), "mamba3": ("auto", "triton", "reference")}
# the config fields each kind's adapter takes (the rest of the section belongs to the other kind)
GEOMETRY = {
    "mamba2": ("d_state", "head_dim", "ngroups", "expand", "conv_width", "chunk_size", "path"),
    "mamba3": ("d_state", "head_dim", "ngroups", "expand", "chunk_size", "rope_fraction", "A_floor", "path"),
}


def rotary_angles(d_state: int, rope_fraction: float) -> int:
    """Mamba-3's rotary angles, shared by the heads (nam-mixers' count, imported when asked)."""
    from nam_mixers.ops.mamba3 import rotary_angles as count

    return count(d_state, rope_fraction)


class Mamba(MixerLetter):
    letter = "M"
    name = "Mamba"
    section = "mamba"

    def adapter(self, config: ModelConfig) -> type:
        from nam_spec.adapters import Mamba3Adapter, MambaAdapter

        return Mamba3Adapter if config.mamba.kind == "mamba3" else MambaAdapter

    def geometry(self, config: ModelConfig) -> dict[str, Any]:
        m = config.mamba
        return {key: getattr(m, key) for key in GEOMETRY[m.kind]}

    def summary(self, config: ModelConfig) -> str:
        m = config.mamba
        kind = "Mamba-3 SISO" if m.kind == "mamba3" else "Mamba-2"
        return f"{kind} state {m.d_state}, head {m.head_dim}, groups {m.ngroups}, expand {m.expand}"

    def params(self, config: ModelConfig) -> LetterParams:
        h, s = config.hidden_size, config.mamba
        di = s.expand * h
        nh, gn = di // s.head_dim, s.ngroups * s.d_state
        if s.kind == "mamba3":
            angles = rotary_angles(s.d_state, s.rope_fraction)
            split = h * (2 * di + 2 * gn + 3 * nh) + di * h
            mm = split + angles * h
            core = nh * (2 + 2 * s.d_state)  # dt_bias, D, B and C biases per head
            replicated = angles * h + 2 * s.d_state + h  # angle projection, B/C norm weights, pre-norm
            total = mm + core + 2 * s.d_state + h
            return LetterParams(total, total, mm, tensor_split=total - replicated, expert=0)
        mm = h * (2 * di + 2 * gn + nh) + di * h
        conv = (di + 2 * gn) * (s.conv_width + 1)
        core = conv + 3 * nh + di  # conv weight+bias, dt_bias, A_log, D, gated-norm weight
        # projections and core follow the rank's channels, groups and heads; the pre-norm is replicated
        return LetterParams(mm + core + h, mm + core + h, mm, tensor_split=mm + core, expert=0)

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        # every tensor holds the rank's channels, groups and heads over the whole sequence
        a, mc, tp, t = activation_bytes(config), config.mamba, parallel.tensor, tokens
        di = mc.expand * config.hidden_size
        nh, gn = di // mc.head_dim // tp, mc.ngroups * mc.d_state // tp
        out = a * t * di // tp  # out_proj's input
        if mc.kind == "mamba3":
            angles = rotary_angles(mc.d_state, mc.rope_fraction)
            # in_proj output (z, x, trap stay views of it) and the angle projection output: the
            # checkpoint's inputs under "selective"
            inputs = a * t * (2 * di // tp + 2 * gn + 3 * nh) + a * t * angles
            if policy == "selective":
                return inputs + out
            # what mamba3_siso_combined keeps (bf16 copies): normed B and C, rotated q and scaled k
            # per head, the pre-gate output; fp32 dt, A dt and per token and head the decay cumsum,
            # q.k, scale and gamma; the angles per head in bf16 and their fp32 cumsum; the per-chunk
            # states; the B/C norms' fp32 rstd
            kernel = 2 * t * gn + 2 * t * nh * mc.d_state + 2 * t * di // tp
            fp32 = 4 * t * nh * 6 + 6 * t * nh * angles + 4 * t * mc.ngroups // tp * 2
            states = 2 * nh * mc.head_dim * mc.d_state * micro_batch * -(-config.seq_length // mc.chunk_size)
            return inputs + kernel + fp32 + states + out
        d_in_proj = (2 * di + 2 * mc.ngroups * mc.d_state + di // mc.head_dim) // tp
        zxbcdt = a * t * d_in_proj  # in_proj output, saved whole by mamba_split_conv1d_scan_combined
        core = a * t * di // tp + 4 * t * mc.ngroups // tp  # its pre-norm y, fp32 group rstd
        return zxbcdt + (0 if policy == "selective" else core) + out  # the conv is recomputed

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        m, tp = config.mamba, parallel.tensor
        if m.kind not in KINDS:
            return [f"model.mamba.kind {m.kind!r}; accepted: {', '.join(map(repr, KINDS))}"]
        out = []
        for key in ("d_state", "head_dim", "ngroups", "expand", "conv_width", "chunk_size"):
            if getattr(m, key) < 1:
                out.append(f"model.mamba.{key} {getattr(m, key)} must be >= 1")
        if out:
            return out
        d_inner = m.expand * config.hidden_size
        if d_inner % m.head_dim:
            out.append(
                f"model.mamba.expand x model.hidden_size ({d_inner}) is not divisible by "
                f"model.mamba.head_dim {m.head_dim}"
            )
        else:
            nheads = d_inner // m.head_dim
            if nheads % m.ngroups:
                out.append(f"Mamba's {nheads} heads are not divisible by model.mamba.ngroups {m.ngroups}")
            if nheads % tp or m.ngroups % tp:
                out.append(
                    f"Mamba's heads ({nheads}) and model.mamba.ngroups ({m.ngroups}) must both be "
                    f"divisible by parallel.tensor {tp}"
                )
        if m.path not in PATHS[m.kind]:
            out.append(
                f"model.mamba.path {m.path!r} with model.mamba.kind {m.kind!r}; accepted: "
                f"{', '.join(map(repr, PATHS[m.kind]))}"
            )
        if m.kind == "mamba3":
            out += _mamba3_problems(m, parallel)
        return out


def _mamba3_problems(m: Any, parallel: ParallelConfig) -> list[str]:
    out = []
    if m.rope_fraction not in (0.5, 1.0):
        out.append(f"model.mamba.rope_fraction {m.rope_fraction} with kind 'mamba3'; accepted: 0.5, 1.0")
    elif rotary_angles(m.d_state, m.rope_fraction) < 1:
        out.append(
            f"model.mamba.d_state {m.d_state} leaves no rotary pair at rope_fraction {m.rope_fraction}"
        )
    if not m.A_floor > 0:
        out.append(f"model.mamba.A_floor {m.A_floor} must be > 0")
    if m.path != "reference":  # what mamba-ssm's Triton kernels take (TMA blocks, paired angles)
        for key in ("d_state", "head_dim", "chunk_size"):
            value = getattr(m, key)
            if value & (value - 1):
                out.append(
                    f"model.mamba.{key} {value} with kind 'mamba3' must be a power of two for its Triton "
                    f"kernels (or set model.mamba.path = 'reference')"
                )
        angles = rotary_angles(m.d_state, m.rope_fraction)
        if angles % 2:
            out.append(
                f"model.mamba.d_state {m.d_state} x rope_fraction {m.rope_fraction} gives {angles} rotary "
                f"angles; mamba-ssm's Mamba-3 kernels need an even number (or path = 'reference')"
            )
    if parallel.tensor > 1 and not parallel.sequence_parallel:
        out.append(
            "M layers of kind 'mamba3' with parallel.tensor > 1 need parallel.sequence_parallel = true: the "
            "angle projection and the B/C norm weights are replicated and their gradients are summed "
            "across ranks by the sequence-parallel reduction"
        )
    return out
