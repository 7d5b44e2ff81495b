"""Generation and evaluation throughput of nam56r-small (random weights, bf16, local backend).

    bash bench/gpu.sh generate

Check first: the logits of nam_spec.decode.Decoder (prefill of PROMPT tokens, then steps) against
one full forward over the same tokens (relative error, bf16). Then, at batch 1 and 32, NEW tokens
after a PROMPT-token prompt: "cached" is the Decoder (one parallel prefill, then one token per step
with each letter's state), "recompute" runs the whole prefix through the model for every new
token; tokens/s = batch x NEW / time. Eval: forward with labels (the per-token loss nam-train eval
sums) over batch 1 x sequence 4096.
"""

from __future__ import annotations

from typing import Any

from bench.report import Report
from bench.world import one_rank_world

PROMPT, NEW, EVAL_SEQ = 128, 64, 4096
CHANNELS = ("category", "dependency", "depth", "sibling", "node_type")


def _inputs(config: Any, b: int, n: int) -> tuple[Any, dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, n), generator=g).cuda()
    return ids, {c: torch.randint(0, 4, (b, n), generator=g).cuda() for c in CHANNELS}


def main(report: Report) -> None:
    with one_rank_world():
        _bench(report)


def _bench(report: Report) -> None:
    import torch

    from nam_spec import build_model
    from nam_spec.decode import Decoder
    from nam_spec.presets import preset

    config = preset("nam56r-small", params_dtype="bfloat16", recompute="none")
    torch.manual_seed(0)
    model = build_model(config.layout(), config).cuda().eval()

    def full(ids: Any, st: dict[str, Any]) -> Any:
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        with torch.no_grad():
            return model(ids, pos, structure=st).float()

    def decode(ids: Any, st: dict[str, Any], prompt: int) -> list[Any]:
        rows = range(ids.shape[0])
        with Decoder(model) as d:
            out = [
                d.prefill(
                    [ids[r, :prompt] for r in rows],
                    None,
                    [{c: v[r, :prompt] for c, v in st.items()} for r in rows],
                )
            ]
            for t in range(prompt, ids.shape[1]):
                out.append(d.step(ids[:, t], {c: v[:, t] for c, v in st.items()}))
        return out

    ids, st = _inputs(config, 2, 24)
    ref, got = full(ids, st), decode(ids, st, 16)
    err = max(float((g - ref[:, 15 + i]).norm() / ref[:, 15 + i].norm()) for i, g in enumerate(got))
    report.check("decoder logits vs full forward (bf16)", err, 5e-2)

    for b in (1, 32):
        ids, st = _inputs(config, b, PROMPT + NEW)
        ms = report.time(
            f"cached decode b{b} prompt {PROMPT} +{NEW}", lambda ids=ids, st=st: decode(ids, st, PROMPT)
        )
        cached = b * NEW / (ms / 1e3)

        def recompute(ids: Any = ids, st: dict[str, Any] = st) -> None:
            for t in range(PROMPT, PROMPT + NEW):
                full(ids[:, :t], {c: v[:, :t] for c, v in st.items()})[:, -1].argmax(-1)

        ms_re = report.time(f"recompute prefix b{b} prompt {PROMPT} +{NEW}", recompute)
        report.row(
            f"generate b{b} tokens/s",
            cached_tokens_per_s=round(cached, 1),
            recompute_tokens_per_s=round(b * NEW / (ms_re / 1e3), 1),
        )

    ids, st = _inputs(config, 1, EVAL_SEQ + 1)
    pos = torch.arange(EVAL_SEQ, device=ids.device)[None]

    def score() -> None:
        with torch.no_grad():
            model(ids[:, :-1], pos, labels=ids[:, 1:], structure={c: v[:, :-1] for c, v in st.items()})

    ms = report.time(f"eval forward b1 s{EVAL_SEQ}", score)
    report.row("eval tokens/s", tokens_per_s=round(EVAL_SEQ / (ms / 1e3), 1))
