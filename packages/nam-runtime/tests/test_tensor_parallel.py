"""TP=2 over gloo gives the TP=1 losses and gradients of megatron's local dense GPT."""

from __future__ import annotations

import gpt
import torch

from nam_runtime import dist
from nam_runtime.testing import run_ranks


def _losses(tp: int, steps: int) -> list[float]:
    dist.initialize(tensor_parallel=tp, seed=7)
    model = gpt.model(gpt.config(moe=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    data = gpt.batch(0, 4)
    for _ in range(steps):
        opt.zero_grad()
        loss = gpt.loss(model, data)
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_tp2_matches_tp1() -> None:
    (reference,) = run_ranks(_losses, 1, tp=1, steps=3)
    tp2 = run_ranks(_losses, 2, tp=2, steps=3)
    assert tp2[0] == tp2[1]
    torch.testing.assert_close(torch.tensor(tp2[0]), torch.tensor(reference), rtol=1e-5, atol=1e-6)
    assert reference[-1] < reference[0]
