"""nam_runtime.wgrad: apex's wgrad_gemm_accum interface, main_grad += grad_output^T @ input."""

from __future__ import annotations

import pytest
import torch

from nam_runtime import wgrad


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2-D", "3-D"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulates_the_weight_gradient(lead: tuple[int, ...], dtype: torch.dtype) -> None:
    x, dy = torch.randn(*lead, 5, dtype=dtype), torch.randn(*lead, 4, dtype=dtype)
    main_grad = torch.randn(4, 5)
    expected = main_grad + dy.reshape(-1, 4).float().t() @ x.reshape(-1, 5).float()
    wgrad.wgrad_gemm_accum_fp32(x, dy, main_grad)
    torch.testing.assert_close(main_grad, expected, rtol=1e-5, atol=1e-5)


def test_fp16_name_accumulates_into_a_bf16_buffer() -> None:
    x, dy = torch.randn(6, 5, dtype=torch.bfloat16), torch.randn(6, 4, dtype=torch.bfloat16)
    main_grad = torch.randn(4, 5, dtype=torch.bfloat16)
    expected = main_grad.float() + dy.float().t() @ x.float()
    wgrad.wgrad_gemm_accum_fp16(x, dy, main_grad)
    assert main_grad.dtype == torch.bfloat16
    torch.testing.assert_close(main_grad.float(), expected, rtol=2e-2, atol=5e-2)
