"""M: the Mamba-2 SSD mixer (nam_mixers.MambaCore) between parallel projections.

    norm -> MambaAdapter: in_proj [z, x, B, C, dt] (column-parallel) -> conv -> SSD scan ->
            gated RMSNorm -> out_proj (row-parallel) -> bda

"selective" recomputes the core (conv, scan, gated norm) in backward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nam_spec.config import ModelConfig, ParallelConfig, Recompute
from nam_spec.letters.base import LetterParams, activation_bytes
from nam_spec.letters.mixer import MixerLetter

if TYPE_CHECKING:
    pass

PATHS = ("auto", "fused", "split", "reference")


class Mamba(MixerLetter):
    letter = "M"
    name = "Mamba-2"
    section = "mamba"

    def adapter(self) -> type:
        from nam_spec.adapters import MambaAdapter

        return MambaAdapter

    def summary(self, config: ModelConfig) -> str:
        m = config.mamba
        return f"Mamba state {m.d_state}, head {m.head_dim}, groups {m.ngroups}, expand {m.expand}"

    def params(self, config: ModelConfig) -> LetterParams:
        h, s = config.hidden_size, config.mamba
        di = s.expand * h
        nh, gn = di // s.head_dim, s.ngroups * s.d_state
        mm = h * (2 * di + 2 * gn + nh) + di * h
        conv = (di + 2 * gn) * (s.conv_width + 1)
        core = conv + 3 * nh + di  # conv weight+bias, dt_bias, A_log, D, gated-norm weight
        # projections and core follow the rank's channels, groups and heads; the pre-norm is replicated
        return LetterParams(mm + core + h, mm + core + h, mm, tensor_split=mm + core, expert=0)

    def inner_activations(
        self, config: ModelConfig, tokens: int, micro_batch: int, policy: Recompute, parallel: ParallelConfig
    ) -> int:
        # every tensor holds the rank's channels, groups and heads over the whole sequence
        a, mc, tp = activation_bytes(config), config.mamba, parallel.tensor
        di = mc.expand * config.hidden_size
        d_in_proj = (2 * di + 2 * mc.ngroups * mc.d_state + di // mc.head_dim) // tp
        zxbcdt = a * tokens * d_in_proj  # in_proj output, saved whole by mamba_split_conv1d_scan_combined
        core = a * tokens * di // tp + 4 * tokens * mc.ngroups // tp  # its pre-norm y, fp32 group rstd
        out = a * tokens * di // tp  # out_proj's input
        return zxbcdt + (0 if policy == "selective" else core) + out  # the conv is recomputed

    def problems(self, config: ModelConfig, parallel: ParallelConfig) -> list[str]:
        m, tp = config.mamba, parallel.tensor
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
        if m.path not in PATHS:
            out.append(f"model.mamba.path {m.path!r}; accepted: {', '.join(map(repr, PATHS))}")
        return out
