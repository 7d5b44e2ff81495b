"""nam_embed.lookup.embedding: the table gradient straight into megatron DDP's main_grad."""

from __future__ import annotations

import torch

from nam_embed.hashing import NgramHashConfig
from nam_embed.lookup import embedding
from nam_embed.ngram import NgramHashEmbedding


def _with_main_grad(weight: torch.nn.Parameter) -> torch.nn.Parameter:
    # what megatron's DDP gives every parameter it wraps
    weight.main_grad = torch.ones_like(weight, dtype=torch.float32)
    weight.grad_added_to_main_grad = False
    return weight


def test_accumulates_every_use_into_main_grad() -> None:
    torch.manual_seed(0)
    table = torch.randn(10, 3)
    indices = [torch.tensor([[1, 4, 1], [9, 0, 4]]), torch.tensor([4, 4, 7])]  # repeats, 2-D and 1-D
    grads = [torch.randn(*i.shape, 3) for i in indices]

    dense = torch.nn.Parameter(table.clone())
    sum(
        (torch.nn.functional.embedding(i, dense) * g).sum() for i, g in zip(indices, grads, strict=True)
    ).backward()

    fused = _with_main_grad(torch.nn.Parameter(table.clone()))
    out = [embedding(i, fused) for i in indices]  # one weight used twice in one backward
    for o, i in zip(out, indices, strict=True):
        torch.testing.assert_close(o, torch.nn.functional.embedding(i, table))
    sum((o * g).sum() for o, g in zip(out, grads, strict=True)).backward()

    torch.testing.assert_close(fused.main_grad, 1 + dense.grad)
    assert fused.grad_added_to_main_grad
    assert fused.grad is not None and fused.grad.shape == table.shape  # reaches DDP's hook, which drops it


def test_zero_out_wgrad_gives_zeros_for_the_hook() -> None:
    weight = _with_main_grad(torch.nn.Parameter(torch.randn(5, 2)))
    weight.zero_out_wgrad = True  # megatron's mark for a weight that other uses give a real gradient
    embedding(torch.tensor([0, 3]), weight).sum().backward()
    assert not weight.grad.any()


def test_plain_gradient_without_main_grad_or_outside_autograd() -> None:
    weight = torch.nn.Parameter(torch.randn(5, 2))
    embedding(torch.tensor([0, 3, 3]), weight).sum().backward()
    torch.testing.assert_close(weight.grad, torch.tensor([[1.0, 1.0], [0, 0], [0, 0], [2, 2], [0, 0]]))
    _with_main_grad(weight)
    with torch.no_grad():
        embedding(torch.tensor([1]), weight)
    assert not weight.grad_added_to_main_grad


def test_ngram_tables_into_main_grad_equal_the_dense_gradient() -> None:
    cfg = NgramHashConfig(orders=(2, 3), heads=2, table_size=1000, dim=4, seed=5)
    torch.manual_seed(0)
    ids, target = torch.randint(0, 500, (2, 24)), torch.randn(2, 24, 8)
    # two row shards (tensor parallelism) of each; the projection non-zero so that the tables learn
    for row_range in ((0, cfg.rows // 2), (cfg.rows // 2, cfg.rows)):
        dense = NgramHashEmbedding(cfg, 8, row_range=row_range)
        torch.nn.init.normal_(dense.proj.weight)
        fused = NgramHashEmbedding(cfg, 8, row_range=row_range, gradient_accumulation_fusion=True)
        fused.load_state_dict(dense.state_dict())
        _with_main_grad(fused.weight)
        for module in (dense, fused):
            ((module(ids) - target) ** 2).sum().backward()
        assert dense.weight.grad.any()
        torch.testing.assert_close(fused.weight.main_grad, 1 + dense.weight.grad)
