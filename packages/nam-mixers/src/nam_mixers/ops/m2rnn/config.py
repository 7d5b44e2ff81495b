"""Launch configuration of the M2RNN Triton kernels: what the GPU sweep varies and the default it pins."""

from __future__ import annotations

from dataclasses import dataclass, field

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
DQK_REDUCTIONS = ("per_head", "atomic")


@dataclass(frozen=True)
class PassConfig:
    """One kernel's launch shape.

    block_t: time steps per unrolled block (the compiler sees that many steps' loads at once).
    block_k: state rows per program, a power of two. A head's K rows split over ceil(K / block_k)
        programs; y (forward) and dv (backward) are written per row block in float32 and summed
        afterwards, ceil(K / block_k) * B*S*H*V*4 bytes while the pass runs (deterministic, no
        atomics). From 16 rows the state products run on tl.dot (tensor cores, or CUDA cores for
        "ieee"); below 16, tl.dot's minimum, as float32 multiply-and-sum on CUDA cores, where
        `precision` does not apply. 16 stays the default: fewer rows add programs where
        B*H*ceil(K/16) programs leave SMs idle (NAM56R B1: 176 on 132 SMs), but on the H200
        (860e114, NAM56R, fwd / fwd+bwd ms) they lost fwd+bwd at B1 (16: 1.27 / 4.65, 4: 1.06 /
        5.19, 2: 1.08 / 6.36) and both at B4 (16: 1.36 / 5.85, 4: 2.77 / 16.4, 2: 4.23 / 20.2).
    num_warps: warps per program.
    precision: how the state matmuls run: "ieee" exact fp32 on CUDA cores, "tf32" one tensor-core
        pass, "tf32x3" three, "bf16" with both operands rounded to bfloat16 (the state itself stays
        float32; the product's result then feeds the next step's product without a register shuffle,
        ~15% fewer instructions per step; CUDA only). None picks "ieee" for float32 inputs; for 16-bit
        inputs, whose own rounding is already bf16's, "bf16" on CUDA (fastest on the H200 at the same
        error against float64, bench/RESULTS.md) and "tf32" under the interpreter.
    fast_tanh: the hardware tanh.approx.f32 (relative error 2^-11) instead of exp and a division;
        None uses it for 16-bit inputs on CUDA. The Triton interpreter cannot run it.
    prefetch: load k, q, v as [block_t, rows] tiles one block ahead and store y once per block, so
        no load waits behind a store inside the step chain (the backward also takes f and the document
        starts as tiles, and stores dq, dk, dv, df per block).
    """

    block_t: int = 16
    block_k: int = 16
    num_warps: int = 1
    precision: str | None = None
    fast_tanh: bool | None = None
    prefetch: bool = False

    def __post_init__(self) -> None:
        if self.block_t < 1:
            raise ValueError(f"PassConfig.block_t must be >= 1, got {self.block_t}")
        if self.block_k < 1 or self.block_k & (self.block_k - 1):
            raise ValueError(f"PassConfig.block_k must be a power of two (1, 2, 4, ...), got {self.block_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"PassConfig.num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(
                f"PassConfig.precision must be one of {PRECISIONS} or None, got {self.precision!r}"
            )

    def dot_precision(self, input_is_fp32: bool, on_cuda: bool) -> str:
        if self.precision == "bf16" and not on_cuda:
            raise ValueError(
                "PassConfig.precision='bf16' needs CUDA tensors: the Triton interpreter's bf16 dot is wrong"
            )
        if self.precision is not None:
            return self.precision
        if input_is_fp32:
            return "ieee"
        return "bf16" if on_cuda else "tf32"

    def use_fast_tanh(self, input_is_fp32: bool, on_cuda: bool) -> bool:
        if self.fast_tanh is None:
            return on_cuda and not input_is_fp32
        if self.fast_tanh and not on_cuda:
            raise ValueError(
                "PassConfig.fast_tanh=True needs CUDA tensors: the Triton interpreter cannot run PTX"
            )
        return self.fast_tanh


@dataclass(frozen=True)
class M2RNNKernelConfig:
    """Forward and backward launch shapes and the checkpoint interval.

    chunk: the forward stores the state every `chunk` steps; the backward recomputes each chunk from
        its checkpoint. Activation memory is B*H*ceil(S/chunk)*K*V*4 bytes; the backward's scratch is
        B*H*chunk*K*max(V,16)*4 bytes, which should stay in L2 (23 MiB at NAM56R, B4, chunk 32).
        A multiple of both passes' block_t.
    dqk: how the backward sums dq and dk over the value heads sharing a q/k head: "per_head" writes
        them per head and sums afterwards (deterministic; B*S*H*K*8 bytes while the backward runs,
        352 MiB at NAM56R B4 S4096), "atomic" adds them with float32 atomics (no buffer, not
        bitwise reproducible, and H heads contend for the same addresses).
    """

    forward: PassConfig = field(default_factory=lambda: PassConfig(block_t=4, prefetch=True))
    backward: PassConfig = field(default_factory=lambda: PassConfig(block_t=2, prefetch=True))
    chunk: int = 32
    dqk: str = "per_head"

    def __post_init__(self) -> None:
        if self.dqk not in DQK_REDUCTIONS:
            raise ValueError(f"M2RNNKernelConfig.dqk must be one of {DQK_REDUCTIONS}, got {self.dqk!r}")
        for name, p in (("forward", self.forward), ("backward", self.backward)):
            if self.chunk < 1 or self.chunk % p.block_t:
                raise ValueError(
                    f"M2RNNKernelConfig.chunk ({self.chunk}) must be a positive multiple of "
                    f"{name}.block_t ({p.block_t})"
                )
