import math

import pytest
import torch

from nam_plasticity import FireConfig, fire_matrices, polar_factor
from nam_plasticity.polar import cubic_for_interval


def svd_polar(w: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u @ vh).float()


def gram_defect(q: torch.Tensor) -> float:
    g = q.double().mT @ q.double() if q.shape[-2] >= q.shape[-1] else q.double() @ q.double().mT
    return float(torch.linalg.matrix_norm(g - torch.eye(g.shape[-1], dtype=g.dtype), ord=2).max())


@pytest.mark.parametrize("shape", [(192, 192), (384, 96), (96, 384)])
def test_fp32_bulk_matches_svd_polar_factor(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    r = polar_factor(w, bulk="fp32", tol=1e-4)
    assert r.converged and float(r.residual) < 1e-4
    assert gram_defect(r.q) < 1e-4
    ref = svd_polar(w)
    assert float((r.q - ref).norm() / ref.norm()) < 1e-4


def test_bf16_bulk_is_orthogonal_to_the_reported_tolerance_and_near_the_polar_factor() -> None:
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(2))
    r = polar_factor(w, bulk="bf16", tol=1e-3)
    assert r.steps_low_precision > 0 and r.steps_fp32 >= 1
    assert r.q.dtype == torch.float32
    assert float(r.residual) < 1e-3
    assert gram_defect(r.q) < 1.1e-3  # the estimate is a lower bound of the spectral defect, hence the slack
    ref = svd_polar(w)
    assert float((r.q - ref).norm() / ref.norm()) < 2e-2  # bf16 rounding of the iterate, not the polish


def test_batch_matches_one_at_a_time() -> None:
    w = torch.randn(3, 64, 48, generator=torch.Generator().manual_seed(3))
    batched = polar_factor(w, bulk="fp32", tol=1e-5)
    for i in range(3):
        ref = svd_polar(w[i])
        assert torch.allclose(batched.q[i], ref, atol=1e-5)
    assert batched.residual.shape == (3,)


def test_residual_sees_a_lone_unconverged_singular_value() -> None:
    # One direction at 1e-6 of the others: max|G - I| alone would call an early stop converged.
    n = 256
    u = svd_polar(torch.randn(n, n, generator=torch.Generator().manual_seed(4)))
    v = svd_polar(torch.randn(n, n, generator=torch.Generator().manual_seed(5)))
    s = torch.ones(n)
    s[0] = 1e-6
    w = u @ torch.diag(s) @ v.mT
    early = polar_factor(w, bulk="fp32", tol=1e-4, max_steps=6)
    assert not early.converged and float(early.residual) > 0.5
    full = polar_factor(w, bulk="fp32", tol=1e-4)
    assert full.converged and gram_defect(full.q) < 1e-4


def test_cubic_equioscillates_on_its_interval() -> None:
    lo, hi = 1e-3, 2.0
    a, c, new_lo, new_hi = cubic_for_interval(lo, hi)
    p = lambda x: a * x - c * x**3  # noqa: E731
    peak = math.sqrt(a / (3 * c))
    assert p(lo) == pytest.approx(new_lo) and p(hi) == pytest.approx(new_lo)
    assert p(peak) == pytest.approx(new_hi)
    assert (new_lo + new_hi) / 2 == pytest.approx(1.0)
    a, c, *_ = cubic_for_interval(1.0, 1.0)  # a point interval gives the classical step
    assert (a, c) == pytest.approx((1.5, 0.5))


def test_fire_scale_uses_the_global_shape() -> None:
    w = torch.randn(128, 32, generator=torch.Generator().manual_seed(6))
    out, _ = fire_matrices(w, FireConfig(bulk="fp32", tol=1e-5))
    assert torch.allclose(out, svd_polar(w) * 2.0, atol=1e-4)  # sqrt(128 / 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bulk": "fp8"}, "bulk must be one of"),
        ({"tol": 0.5, "bulk_tol": 0.1}, "tol <= bulk_tol"),
        ({"group": object()}, "needs side and global_shape"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        polar_factor(torch.randn(8, 8), **kwargs)


def test_non_matrix_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        polar_factor(torch.randn(8))
