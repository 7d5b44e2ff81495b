"""The plasticity-parts protocol (``plasticity_parts()``: the rows FIRE and DASH act on, the
neurons ReDo tracks) on plain torch modules."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from nam_plasticity import Dash, DashConfig, FireConfig, Redo, RedoConfig, apply_fire, find_blocks
from nam_plasticity.fire import fire_matrices

HEADS, V = 3, 4


class Mixer(nn.Module):
    """A raw [q; k] projection and a head-major in_proj ([v, g, f] per head), both declared."""

    def __init__(self) -> None:
        super().__init__()
        self.qk_weight = nn.Parameter(torch.randn(2 * 6, 8))
        self.in_proj = nn.Linear(8, HEADS * (2 * V + 1), bias=False)
        self.out_proj = nn.Linear(HEADS * V, 8, bias=False)

    def plasticity_parts(self) -> dict:
        return {
            "rows": {
                "qk_weight": {"parts": (("q", 6), ("k", 6))},
                "in_proj.weight": {"parts": (("v", V), ("g", V), ("f", 1)), "repeat": HEADS},
            }
        }


class GroupedMLP(nn.Module):
    """Grouped SwiGLU experts: fc1 [E, 2F, H] (gate rows, then up rows), fc2 [E, H, F]."""

    def __init__(self, experts: int = 3, hidden: int = 8, ffn: int = 5) -> None:
        super().__init__()
        self.fc1_weight = nn.Parameter(torch.randn(experts, 2 * ffn, hidden) / math.sqrt(hidden))
        self.fc2_weight = nn.Parameter(torch.randn(experts, hidden, ffn) / math.sqrt(ffn))
        self._hooks: OrderedDict[int, object] = OrderedDict()

    def plasticity_parts(self) -> dict:
        f = self.fc2_weight.shape[2]
        return {
            "rows": {
                "fc1_weight": {"parts": (("gate", f), ("up", f)), "expert_dim": 0},
                "fc2_weight": {"expert_dim": 0},
            },
            "neurons": {
                "fc1": "fc1_weight",
                "fc2": "fc2_weight",
                "gated": True,
                "init_std": 0.02,
                "activations": self.register_activation_hook,
            },
        }

    def register_activation_hook(self, hook) -> RemovableHandle:
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def activations(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """fc2's input; rows of x grouped by expert, counts[e] rows each."""
        outs = [xe @ w.T for xe, w in zip(torch.split(x, counts.tolist()), self.fc1_weight, strict=True)]
        gate, up = torch.cat(outs).chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        act = self.activations(x, counts)
        for hook in list(self._hooks.values()):
            hook(act, counts)
        outs = [a @ w.T for a, w in zip(torch.split(act, counts.tolist()), self.fc2_weight, strict=True)]
        return torch.cat(outs)


def test_declared_parts_give_the_blocks_and_override_the_built_in_rules() -> None:
    model = nn.ModuleDict({"mixer": Mixer(), "experts": GroupedMLP()})
    blocks = {b.name: b for b in find_blocks([model])}
    assert sorted(blocks) == sorted(
        ["mixer.qk_weight[q]", "mixer.qk_weight[k]", "mixer.out_proj.weight"]
        + [f"mixer.in_proj.weight[{p}]" for p in "vgf"]
        + [f"experts.fc1_weight[{e}][{p}]" for e in range(3) for p in ("gate", "up")]
        + [f"experts.fc2_weight[{e}]" for e in range(3)]
    )
    assert blocks["mixer.in_proj.weight[g]"].rows.tolist() == [4, 5, 6, 7, 13, 14, 15, 16, 22, 23, 24, 25]
    assert blocks["mixer.in_proj.weight[f]"].rows.tolist() == [8, 17, 26]
    assert blocks["mixer.in_proj.weight[f]"].global_shape == (3, 8)
    assert blocks["mixer.qk_weight[k]"].rows.tolist() == list(range(6, 12))
    up = blocks["experts.fc1_weight[2][up]"]
    assert (up.expert, up.global_shape, up.param_name) == (2, (5, 8), "experts.fc1_weight")
    w = model["experts"].fc1_weight.detach()
    assert torch.equal(up.matrix(w), w[2, 5:])
    assert blocks["experts.fc2_weight[1]"].global_shape == (8, 5)
    assert find_blocks([model], mode="qk") == []  # declared parts are not attention Q/K


@pytest.mark.parametrize(
    "name", ["mixer.in_proj.weight[f]", "experts.fc1_weight[1][up]", "experts.fc2_weight[0]"]
)
def test_fire_on_a_declared_block_changes_that_block_only(name: str) -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"mixer": Mixer(), "experts": GroupedMLP()})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    block = next(b for b in find_blocks([model]) if b.name == name)
    cfg = FireConfig(bulk="fp32", tol=1e-6)
    (record,) = apply_fire(1, [block], None, cfg)
    got = block.matrix(block.param.detach())
    rows, cols = block.global_shape
    gram = got.T @ got if rows >= cols else got @ got.T
    assert torch.allclose(
        gram, torch.eye(min(rows, cols)) * rows / cols, atol=1e-5
    )  # sqrt(d_out/d_in) * orthogonal
    ref, _ = fire_matrices(block.matrix(before[block.param_name]), cfg)
    assert torch.allclose(got, ref, atol=1e-6) and record.residual < 1e-6
    for n, p in model.named_parameters():
        mask = block.mask() if n == block.param_name else torch.zeros(p.shape, dtype=torch.bool)
        assert torch.equal(p.detach()[~mask], before[n][~mask]), n


def test_an_expert_axis_of_one_keeps_input_features_last() -> None:
    class ExpertsInTheMiddle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 2, 4))  # [rows, experts, in]

        def plasticity_parts(self) -> dict:
            return {"rows": {"w": {"parts": (("a", 2), ("b", 4)), "expert_dim": 1}}}

    module = ExpertsInTheMiddle()
    blocks = {b.name: b for b in find_blocks([module])}
    assert sorted(blocks) == ["w[0][a]", "w[0][b]", "w[1][a]", "w[1][b]"]
    assert torch.equal(blocks["w[1][b]"].matrix(module.w.detach()), module.w.detach()[2:, 1])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"parts": (("a", 5), ("b", 4))}, "do not cover"),
        ({"parts": (("a", 3), ("a", 3))}, "do not cover"),
        ({"parts": (("a", 6),), "repeat": 2}, "do not cover"),
        ({"parts": (("a", 6),), "expert_dim": 0}, "expert_dim"),
        ({"rows": 6}, "unknown keys"),
    ],
)
def test_bad_declarations_say_what_and_where(spec: dict, match: str) -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 6, bias=False)

        def plasticity_parts(self) -> dict:
            return {"rows": {"proj.weight": spec}}

    with pytest.raises(ValueError, match=match) as err:
        find_blocks([nn.ModuleDict({"bad": Bad()})])
    assert "Bad.plasticity_parts() at bad: rows['proj.weight']" in str(err.value)


def test_a_declaration_must_name_a_parameter() -> None:
    class Missing(nn.Module):
        def plasticity_parts(self) -> dict:
            return {"rows": {"in_proj.weight": {}}}

    with pytest.raises(ValueError, match="no such parameter"):
        find_blocks([Missing()])


def test_unknown_keys_and_missing_neuron_entries_say_what_and_where() -> None:
    class Typo(nn.Module):
        def plasticity_parts(self) -> dict:
            return {"row": {}}

    with pytest.raises(ValueError, match=r"Typo.plasticity_parts\(\) at <root>: unknown keys \['row'\]"):
        find_blocks([Typo()])

    class NoHook(GroupedMLP):
        def plasticity_parts(self) -> dict:
            parts = super().plasticity_parts()
            del parts["neurons"]["activations"]
            return parts

    with pytest.raises(ValueError, match=r"NoHook.plasticity_parts\(\) at moe: .*missing \['activations'\]"):
        Redo().attach([nn.ModuleDict({"moe": NoHook()})])


class Dense(nn.Module):
    """An MLP under names of its own: ReDo finds it by its declaration, not by megatron's names."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 6, bias=False)
        self.down = nn.Linear(6, 8, bias=False)

    def plasticity_parts(self) -> dict:
        def activations(hook) -> RemovableHandle:
            return self.down.register_forward_pre_hook(lambda _, args: hook(args[0], None))

        return {"neurons": {"fc1": "up.weight", "fc2": "down.weight", "activations": activations}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_redo_tracks_a_dense_mlp_that_declares_its_neurons() -> None:
    torch.manual_seed(0)
    mlp = Dense()
    redo = Redo(RedoConfig(beta=0.5))
    redo.attach([nn.ModuleDict({"mlp": mlp})])
    (layer,) = redo.layers
    assert (layer.name, layer.tensors, layer.gated) == ("mlp", ("mlp.up.weight", "mlp.down.weight"), False)
    assert layer.init_std == pytest.approx(1 / math.sqrt(3 * 8))  # nn.Linear's, fan-in 8
    x = torch.randn(5, 8)
    mlp(x)
    assert torch.allclose(layer.ema, torch.relu(mlp.up(x)).detach().abs().mean(0))


def _route(counts: list[int], hidden: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(counts), hidden, generator=g), torch.tensor(counts)


def test_redo_scores_grouped_experts_per_expert_over_their_tokens() -> None:
    torch.manual_seed(0)
    experts = GroupedMLP()
    redo = Redo(RedoConfig(tau=0.1, beta=0.5))
    redo.attach([nn.ModuleDict({"moe": experts})])
    assert [layer.name for layer in redo.layers] == ["moe.0", "moe.1", "moe.2"]
    batches = [_route([4, 0, 3], seed=1), _route([2, 0, 5], seed=2)]
    for x, counts in batches:
        experts(x, counts)
    for e in (0, 2):
        stats = []
        for x, counts in batches:
            act = experts.activations(x, counts).detach()
            start = int(counts[:e].sum())
            stats.append(act[start : start + int(counts[e])].abs().mean(0))
        want = 0.5 * stats[0] + 0.5 * stats[1]  # first tokens initialise the EMA
        assert torch.allclose(redo.layers[e].ema, want, atol=1e-6), e
    assert redo.scores(redo.layers[1]) is None  # never routed: not scored
    metrics: dict[str, float] = {}
    redo.measure(metrics)
    assert set(metrics) == {"redo/dormant_fraction/moe.0", "redo/dormant_fraction/moe.2"}
    with torch.no_grad():
        experts.eval()
        experts(*_route([0, 9, 0]))  # evaluation forwards are not counted
    assert redo.scores(redo.layers[1]) is None


def test_redo_recycles_a_dormant_unit_of_one_expert_only() -> None:
    torch.manual_seed(0)
    experts = GroupedMLP()
    with torch.no_grad():
        experts.fc1_weight[1, 3] = 0.0  # gate row 3 of expert 1: silu(0) * up = 0, dormant
    opt = torch.optim.Adam(experts.parameters(), lr=1e-3)
    redo = Redo(RedoConfig(tau=0.05), seed=3)
    redo.attach([nn.ModuleDict({"moe": experts})])
    x, counts = _route([3, 6, 2])
    experts(x, counts).square().mean().backward()
    opt.step()
    before = {n: p.detach().clone() for n, p in experts.named_parameters()}
    metrics: dict[str, float] = {}
    records = redo.apply(5, opt, metrics)
    assert [(r.block, r.rows) for r in records] == [("moe.1", [3])]
    assert records[0].tensors == ["moe.fc1_weight", "moe.fc2_weight"]
    assert metrics["redo/dormant_fraction/moe.1"] == pytest.approx(1 / 5)
    w1, w2 = experts.fc1_weight.detach(), experts.fc2_weight.detach()
    touched1 = torch.zeros_like(w1, dtype=torch.bool)
    touched1[1, [3, 8]] = True  # gate row 3 and up row 3 (= 5 + 3)
    touched2 = torch.zeros_like(w2, dtype=torch.bool)
    touched2[1, :, 3] = True
    assert torch.equal(w1[~touched1], before["fc1_weight"][~touched1])
    assert torch.equal(w2[~touched2], before["fc2_weight"][~touched2])
    assert (w1[touched1] != 0).all() and (w2[touched2] == 0).all()
    for p, touched in ((experts.fc1_weight, touched1), (experts.fc2_weight, touched2)):
        assert (opt.state[p]["exp_avg"][touched] == 0).all()
        assert (opt.state[p]["exp_avg"][~touched] != 0).all()


def test_dash_gradient_average_is_the_papers_from_zero() -> None:
    assert DashConfig().alpha == 0.3 and DashConfig().lam == 0.3
    lin = nn.Linear(4, 3, bias=False)
    dash, blocks = Dash(DashConfig()), find_blocks([lin])
    grads = [torch.randn(3, 4) for _ in range(3)]
    for g in grads:
        lin.weight.grad = g.clone()
        dash.observe(blocks, None)
    want = torch.zeros(3, 4)
    for g in grads:
        want = 0.7 * want + 0.3 * g
    assert torch.allclose(dash.ema[id(lin.weight)].view(3, 4), want)
