"""describe(): one row per layer (number, letter, module class, parameters) plus totals by letter
and active parameters, for a built model (counted from its tensors, meta included) or for a
layout and config (from the analytic formula)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nam_layout import VARIANTS, Layout
from nam_spec.accounting import model_flops_per_token, model_params
from nam_spec.config import ModelConfig
from nam_spec.letters import LETTERS


@dataclass
class LayerRow:
    layer: int  # 1-based, global
    letter: str
    module: str  # class path of the layer
    core: str  # class path of what the letter computes inside it
    params: int


@dataclass
class Description:
    rows: list[LayerRow]
    by_letter: dict[str, int]
    total: int
    active: int
    formula_total: int
    model_flops_per_token: float
    extra: dict[str, int] = field(default_factory=dict)  # embedding, output, final norm

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": [r.__dict__ for r in self.rows],
            "by_letter": self.by_letter,
            "extra": self.extra,
            "total": self.total,
            "active": self.active,
            "formula_total": self.formula_total,
            "model_flops_per_token": self.model_flops_per_token,
        }

    def table(self) -> str:
        lines = [f"{'layer':>5}  {'letter':<6} {'module':<58} {'core':<52} {'params':>14}"]
        lines += [
            f"{r.layer:>5}  {r.letter:<6} {r.module:<58} {r.core:<52} {r.params:>14,}" for r in self.rows
        ]
        lines.append("")
        for k, v in {**self.by_letter, **self.extra}.items():
            label = f"{k} ({VARIANTS[k]} variant)" if k in VARIANTS else k
            lines.append(f"  {label:<16} {v:>16,}")
        lines.append(f"  {'total':<16} {self.total:>16,}   (formula {self.formula_total:,})")
        lines.append(f"  {'active':<16} {self.active:>16,}   (routed experts at top_k / num_experts)")
        lines.append(f"  model FLOPs per token (fwd+bwd) {self.model_flops_per_token:.4g}")
        return "\n".join(lines)


def _path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _spec_core(core: Any) -> str:
    """The class a spec names for the letter's computation (TE's may be placeholders without TE)."""
    return _path(core) if isinstance(core, type) else repr(core)


def describe(target: Any, config: ModelConfig | None = None) -> Description:
    """``target``: a NamModel, or a Layout with ``config`` (analytic counts, spec classes)."""
    from nam_spec.model import NamModel

    if isinstance(target, NamModel):
        config, layout = target.model_config, target.layout
        stack = target.decoder
        rows = [
            LayerRow(
                layer.layer_number,
                letter,
                _path(layer),
                _path(LETTERS[letter].core(layer)),
                sum(p.numel() for p in layer.parameters()),
            )
            for letter, layer in zip(stack.kinds, stack.layers, strict=True)
        ]
        extra = {}
        if target.pre_process:
            extras = target.embedding.extra_parameters()
            extra["embedding"] = target.embedding.word_embeddings.weight.numel()
            extra["embedding_extras"] = sum(p.numel() for p in extras)
        if target.post_process:
            extra["final_norm"] = sum(p.numel() for p in stack.final_norm.parameters())
            if target.output_layer.weight is not None:
                extra["output"] = target.output_layer.weight.numel()
        if target.mtp_process:
            extra["mtp"] = sum(p.numel() for p in target.mtp.parameters())
    elif isinstance(target, Layout):
        if config is None:
            raise ValueError("describe(layout) needs the ModelConfig to count parameters")
        from nam_spec.backends import local_backend, te_backend
        from nam_spec.specs import layer_specs

        layout = target
        # naming classes needs no TE installed: the te spec is inspected, never built, here
        backend = te_backend(check=False) if config.backend == "te" else local_backend()
        specs = layer_specs(backend, config)
        p = model_params(config, layout)
        rows = [
            LayerRow(
                i + 1,
                k,
                _path(specs[k].module),
                _spec_core(LETTERS[k].spec_core(specs[k])),
                p.per_letter[k].total,
            )
            for i, k in enumerate(layout.kinds)
        ]
        extra = {
            "embedding": p.embedding,
            "embedding_extras": p.embedding_extras,
            "output": p.output,
            "final_norm": p.final_norm,
            **({"mtp": p.mtp_depth * p.mtp.total} if p.mtp_depth else {}),
        }
    else:
        raise TypeError(f"describe() takes a NamModel or a Layout, got {type(target).__name__}")
    formula = model_params(config, layout)
    by_letter: dict[str, int] = {}
    for r in rows:
        by_letter[r.letter] = by_letter.get(r.letter, 0) + r.params
    total = sum(by_letter.values()) + sum(extra.values())
    # inactive parameters per layer (routed experts beyond top-k) from the letter's formula
    inactive = sum((formula.per_letter[r.letter].total - formula.per_letter[r.letter].active) for r in rows)
    return Description(
        rows,
        by_letter,
        total,
        total - inactive,
        formula.total,
        model_flops_per_token(config, layout),
        extra,
    )
