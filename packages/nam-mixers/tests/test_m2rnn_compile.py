"""The Triton kernels compile for sm_90 (the H200) on a machine without a GPU.

The interpreter tests check the arithmetic but not what only the compiler sees (layouts, tl.dot
shapes, inline PTX). Compiling needs the kernels decorated without TRITON_INTERPRET, which the other
test modules set, so it runs in a fresh process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from nam_mixers.ops.m2rnn.backward import _m2rnn_bwd_kernel
    from nam_mixers.ops.m2rnn.forward import _m2rnn_fwd_kernel

    def build(kernel, pointers, consts, num_warps):
        sig = dict(pointers, B="i32", S="i32", NC="i32") | {n: "constexpr" for n in consts}
        src = triton.compiler.ASTSource(kernel, sig, consts)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
        # "ieee" stays off tensor cores: Triton's combine pass can turn a multiply-and-sum into a tf32 dot
        assert consts["PRECISION"] != "ieee" or "mma" not in ptx, (kernel.__name__, consts)

    # (input dtype, precision, hardware tanh, block_k, num_warps, dq/dk by atomics, prefetch): the
    # bf16 and float32 defaults (at smaller block_t, which compile faster), a split, and row blocks
    # under tl.dot's 16 (multiply-and-sum).
    for dt, prec, fast, bk, nw, atomic, pre in (("bf16", "tf32", True, 16, 1, False, True),
                                                ("fp32", "ieee", False, 16, 1, False, True),
                                                ("bf16", "tf32", True, 64, 4, True, False),
                                                ("bf16", "bf16", True, 16, 1, False, False),
                                                ("fp32", "ieee", False, 4, 1, False, True),
                                                ("bf16", "bf16", True, 2, 1, False, True)):
        p = "*" + dt
        shape = dict(H=44, G=1, K=64, V=16, BK=bk, BV=16, CHUNK=32, HAS_SEQ=True, PRECISION=prec, FAST_TANH=fast)
        build(_m2rnn_fwd_kernel,
              dict(q_ptr=p, k_ptr=p, v_ptr=p, f_ptr="*fp32", w_ptr=p, h0_ptr="*fp32", seq_ptr="*i32",
                   y_ptr="*fp32", ht_ptr="*fp32", ckpt_ptr="*fp32"),
              dict(shape, BLOCK_T=8, BLOCK_T_P2=8, PREFETCH=pre, HAS_H0=True), nw)
        build(_m2rnn_bwd_kernel,
              dict(q_ptr=p, k_ptr=p, v_ptr=p, f_ptr="*fp32", w_ptr=p, seq_ptr="*i32", ckpt_ptr="*fp32", dy_ptr=p,
                   dht_ptr="*fp32", dq_ptr="*fp32", dk_ptr="*fp32", dv_ptr="*fp32", df_ptr="*fp32",
                   dw_ptr="*fp32", dh0_ptr="*fp32", scratch_ptr="*fp32"),
              dict(shape, BLOCK_T=4, BLOCK_T_P2=4, PREFETCH=pre, HAS_DHT=True, HAS_H0=True, ATOMIC_DQK=atomic), nw)
    print("compiled")
    """
)


def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=110)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
