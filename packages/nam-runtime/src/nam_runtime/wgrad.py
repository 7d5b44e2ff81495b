"""Weight gradients accumulated straight into megatron's main-gradient buffer, in torch.

The interface of apex's ``fused_weight_gradient_mlp_cuda`` extension, which megatron-core's
linear layers call with ``gradient_accumulation_fusion`` (``nam_runtime.megatron.
install_wgrad_accumulation`` puts this module in its place): ``main_grad += grad_output^T @
input``, the activations flattened to 2-D, one GEMM writing into the buffer instead of a weight
gradient that megatron's DDP hook then adds to it.
"""

from __future__ import annotations

import torch

__all__ = ["wgrad_gemm_accum_fp16", "wgrad_gemm_accum_fp32"]


def wgrad_gemm_accum_fp32(input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """``main_grad`` [out, in] += ``grad_output`` [..., out]^T @ ``input`` [..., in]."""
    a = grad_output.reshape(-1, grad_output.shape[-1]).t()
    b = input.reshape(-1, input.shape[-1])
    if a.dtype == main_grad.dtype:
        main_grad.addmm_(a, b)
    elif main_grad.is_cuda:
        # cuBLAS multiplies the bf16/fp16 activations and accumulates in fp32 into the buffer
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    else:  # aten::addmm.dtype_out is CUDA-only
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


# megatron calls this name for a bf16 / fp16 main_grad: the same accumulation
wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32
