"""Optimizer parameter groups: which parameters get weight decay.

No decay on: norm weights, biases, Mamba's and M2RNN's A_log, D and dt_bias (decaying them would
pull decay rates and skip gains towards zero, not regularise), and the n-gram hash tables of
nam-embed (sparse rows, touched by few tokens per step: decay would erase rare n-grams faster than
they are learned). Everything else (linear and expert weights, the word embedding, the output
layer, convolutions, M2RNN's W) decays. The same rule serves megatron's optimizer as
``no_weight_decay_cond`` and plain torch optimizers through :func:`param_groups`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or leaf.endswith("_bias") or leaf in _NO_DECAY_NAMES:
        return True
    if "norm" in name.lower():  # input/pre-mlp/final norms, gated-norm weights of the mixers
        return True
    if name.endswith("ngram.weight"):  # nam-embed's n-gram hash tables (not their projection)
        return True
    return bool(getattr(param, "_no_weight_decay", False))


def param_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float
) -> list[dict[str, object]]:
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
