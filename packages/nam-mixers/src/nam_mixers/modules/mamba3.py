"""The Mamba-3 SISO mixer (an M variant): projections around a core that runs on its heads.

    u [b, l, hidden] --in_proj--> [z, x, B, C, dt, A, trap]  (d_inner, d_inner, g*n, g*n, heads x 3)
                     --angle_proj--> angles                   (a rotary angles, shared by all heads)
    y = trapezoidal SSM with data-dependent A, rotary q = C and k = B (ops/mamba3) + D * x
    o = y * silu(z)  --out_proj--> [b, l, hidden]

No conv and no output norm (mamba-ssm's Mamba3 defaults); B and C are RMS-normed per group and get
a per-head bias. The angle projection is its own linear because it is shared by all heads: under
tensor parallelism it is replicated while in_proj is split by heads. The core runs on one of two
named paths (ops/mamba3): 'triton' (mamba-ssm's kernels) or 'reference' (plain PyTorch).
"""

from __future__ import annotations

import torch
from torch import nn

from nam_mixers.modules.ssm_common import (
    CorePath,
    KernelPath,
    check_positive_ints,
    check_seq_idx,
    dt_bias_init,
)
from nam_mixers.ops.mamba3 import (
    CORES,
    Mamba3Shape,
    Mamba3State,
    Mamba3Weights,
    check_available,
    mamba3_final_state,
    mamba3_step,
    prepare,
    resolve_path,
    rotary_angles,
)


class Mamba3Core(KernelPath, nn.Module):
    """Everything between the projections: (zxbcdt [b, l, d_in_proj], angles [b, l, n_angles]) ->
    [b, l, d_inner]. `nheads` and `ngroups` are the heads and B/C groups this module holds (the local
    ones under tensor parallelism)."""

    _check_available = staticmethod(check_available)
    _resolve_path = staticmethod(resolve_path)

    def __init__(
        self,
        nheads: int,
        headdim: int = 64,
        d_state: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        rope_fraction: float = 0.5,
        A_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_ints(
            "Mamba3Core",
            nheads=nheads,
            headdim=headdim,
            d_state=d_state,
            ngroups=ngroups,
            chunk_size=chunk_size,
        )
        if nheads % ngroups:
            raise ValueError(f"Mamba3Core: nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
        if rope_fraction not in (0.5, 1.0):  # mamba-ssm's Mamba3 accepts these two
            raise ValueError(f"Mamba3Core: rope_fraction must be 0.5 or 1.0, got {rope_fraction!r}")
        n_angles = rotary_angles(d_state, rope_fraction)
        if n_angles < 1:
            raise ValueError(
                f"Mamba3Core: d_state {d_state} leaves no rotary pair at rope_fraction {rope_fraction}"
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba3Core: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.shape = Mamba3Shape(nheads, headdim, ngroups, d_state, n_angles, chunk_size, A_floor, norm_eps)
        self.path = path
        self._init = (dt_min, dt_max, dt_init_floor)
        kw = {"device": device, "dtype": dtype}
        self.dt_bias = nn.Parameter(torch.empty(nheads, **kw))
        self.B_bias = nn.Parameter(torch.empty(nheads, d_state, **kw))
        self.C_bias = nn.Parameter(torch.empty(nheads, d_state, **kw))
        self.B_norm_weight = nn.Parameter(torch.empty(d_state, **kw))
        self.C_norm_weight = nn.Parameter(torch.empty(d_state, **kw))
        self.D = nn.Parameter(torch.empty(nheads, **kw))
        for p in (self.dt_bias, self.D):
            p._no_weight_decay = True  # read by optimizer parameter grouping, as in mamba-ssm
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As mamba-ssm's Mamba3: dt log-uniform in [dt_min, dt_max] (dt_bias its softplus inverse),
        B/C biases 1, norm weights 1, D 1."""
        dt_min, dt_max, dt_floor = self._init
        self.dt_bias.copy_(dt_bias_init(self.shape.nheads, dt_min, dt_max, dt_floor, self.dt_bias.device))
        for p in (self.B_bias, self.C_bias, self.B_norm_weight, self.C_norm_weight, self.D):
            p.fill_(1.0)

    def _weights(self) -> Mamba3Weights:
        return Mamba3Weights(
            self.dt_bias, self.B_bias, self.C_bias, self.B_norm_weight, self.C_norm_weight, self.D
        )

    def _check(self, zxbcdt: torch.Tensor, angles: torch.Tensor) -> None:
        s = self.shape
        if (
            zxbcdt.dim() != 3
            or zxbcdt.shape[-1] != s.d_in_proj
            or angles.shape != (*zxbcdt.shape[:2], s.n_angles)
        ):
            raise ValueError(
                f"Mamba3Core: expected the in_proj output [batch, seq, {s.d_in_proj}] ([z, x, B, C, dt, A, "
                f"trap] for {s.nheads} heads) and angles [batch, seq, {s.n_angles}], got "
                f"{tuple(zxbcdt.shape)} and {tuple(angles.shape)}"
            )

    def forward(
        self, zxbcdt: torch.Tensor, angles: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """seq_idx [b, l]: integer document index per token (non-decreasing along a row), or None."""
        self._check(zxbcdt, angles)
        path = resolve_path(self._path, zxbcdt.device)
        if seq_idx is not None:
            seq_idx = check_seq_idx(seq_idx, zxbcdt, ordered_check=path == "reference")
        return CORES[path](zxbcdt, angles, self._weights(), self.shape, seq_idx)

    def prefill(
        self, zxbcdt: torch.Tensor, angles: torch.Tensor, seq_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Mamba3State]:
        """The forward on the chosen path, and the state after its last token (of that token's
        document) from one parallel pass in float32 (ops/mamba3/step.py)."""
        y = self(zxbcdt, angles, seq_idx)
        ct = torch.promote_types(zxbcdt.dtype, torch.float32)
        return y, mamba3_final_state(
            prepare(zxbcdt.to(ct), angles.to(ct), self._weights(), self.shape), seq_idx
        )

    def step(
        self, zxbcdt: torch.Tensor, angles: torch.Tensor, state: Mamba3State
    ) -> tuple[torch.Tensor, Mamba3State]:
        """One token per row ([b, 1, ...] inputs) -> ([b, 1, d_inner], the next state), in float32."""
        ct = torch.promote_types(zxbcdt.dtype, torch.float32)
        t = prepare(zxbcdt[:, 0].to(ct), angles[:, 0].to(ct), self._weights(), self.shape)
        y, state = mamba3_step(state, t, self.D.to(ct))
        y = y * torch.nn.functional.silu(t.z)
        return y.flatten(-2).to(zxbcdt.dtype)[:, None], state

    def extra_repr(self) -> str:
        s = self.shape
        return (
            f"nheads={s.nheads}, headdim={s.headdim}, d_state={s.d_state}, ngroups={s.ngroups}, "
            f"n_angles={s.n_angles}, chunk_size={s.chunk_size}, path={self._path!r}"
        )


class Mamba3Mixer(CorePath, nn.Module):
    """The Mamba-3 SISO mixer on [batch, seq, hidden]: in_proj and angle_proj -> Mamba3Core -> out_proj."""

    def __init__(
        self,
        hidden_size: int,
        expand: int = 2,
        headdim: int = 64,
        d_state: int = 64,
        ngroups: int = 1,
        chunk_size: int = 64,
        rope_fraction: float = 0.5,
        A_floor: float = 1e-4,
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * hidden_size
        if hidden_size < 1 or expand < 1 or headdim < 1 or d_inner % headdim:
            raise ValueError(
                f"Mamba3Mixer: expand * hidden_size ({expand} * {hidden_size}) must be a positive "
                f"multiple of headdim ({headdim})"
            )
        self.hidden_size = hidden_size
        kw = {"device": device, "dtype": dtype}
        self.core = Mamba3Core(
            d_inner // headdim,
            headdim=headdim,
            d_state=d_state,
            ngroups=ngroups,
            chunk_size=chunk_size,
            rope_fraction=rope_fraction,
            A_floor=A_floor,
            path=path,
            **kw,
        )
        self.in_proj = nn.Linear(hidden_size, self.core.shape.d_in_proj, bias=False, **kw)
        self.angle_proj = nn.Linear(hidden_size, self.core.shape.n_angles, bias=False, **kw)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=False, **kw)

    def forward(self, hidden_states: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [b, l, hidden]; seq_idx [b, l] document index per token for packed rows, or None."""
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(
                f"Mamba3Mixer: expected [batch, seq, {self.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        y = self.core(self.in_proj(hidden_states), self.angle_proj(hidden_states), seq_idx)
        return self.out_proj(y)
