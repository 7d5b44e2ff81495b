"""NamStack: the layers of one pipeline stage, built per letter from the specs.

Modelled on megatron-core's HybridStack: layers numbered globally (1-based ``layer_number``; the
checkpoint key of local layer i is ``layers.<global index>``), ``set_input_tensor`` for pipeline
schedules, final norm on the last stage. Added here: per-letter activation recomputation
("selective" recomputes the layer's memory-heavy inner part, "full" the whole layer), the
hidden-state hook of DESIGN.md and CUDA graphs per layer (nam_spec.graphs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import sharded_state_dict_default
from megatron.core.utils import make_viewless_tensor
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

from nam_runtime.megatron import same_function_modes
from nam_spec.graphs import LayerGraph

HiddenStateHook = Callable[[int, str, torch.Tensor], torch.Tensor | None]
"""hook(layer_number (1-based, global), letter, hidden_states [s_local, b, h]) after each layer;
a returned tensor (equal in value, e.g. one carrying a regulariser's gradient as nam-plasticity's
STP does) replaces the hidden states for the rest of the forward, None keeps them."""


class NamStack(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        kinds: str,
        offset: int,
        specs: dict[str, ModuleSpec],
        layer_configs: dict[str, TransformerConfig],
        recompute: dict[str, str],
        final_norm: Any,
        pg_collection: ProcessGroupCollection,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> None:
        super().__init__(config)
        self.kinds, self.offset = kinds, offset
        self.pre_process, self.post_process = pre_process, post_process
        self.input_tensor: torch.Tensor | None = None
        self.tp_group = pg_collection.tp
        self.full_recompute = {k for k, v in recompute.items() if v == "full"}
        self.layers = torch.nn.ModuleList(
            build_module(
                specs[letter],
                config=layer_configs[letter],
                layer_number=offset + i + 1,
                pg_collection=pg_collection,
                add_layer_offset=False,
            )
            for i, letter in enumerate(kinds)
        )
        self.final_norm = (
            final_norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
            if post_process
            else None
        )
        self._hooks: OrderedDict[int, HiddenStateHook] = OrderedDict()  # weak-referenceable for handles
        self.graphs: dict[int, LayerGraph] = {}  # layer index -> its CUDA graphs (nam_spec.graphs)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        self.input_tensor = input_tensor

    def register_hidden_state_hook(self, hook: HiddenStateHook) -> RemovableHandle:
        """Call ``hook`` with every layer's output of each forward (sequence-first, local shard);
        the stack continues with the tensor it returns, if any."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = hook
        return handle

    def forward(
        self,
        hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        rotary_pos_emb: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if not self.pre_process:
            hidden_states = self.input_tensor
        graphs = self.graphs if self.training and torch.is_grad_enabled() else {}
        for i, (letter, layer) in enumerate(zip(self.kinds, self.layers, strict=True)):
            kwargs = {
                "attention_mask": attention_mask,
                "rotary_pos_emb": rotary_pos_emb,
                "packed_seq_params": packed_seq_params,
            }
            if i in graphs:
                eager = partial(_run_layer, layer, hidden_states, kwargs)
                hidden_states = graphs[i](hidden_states, packed_seq_params, eager)
            elif self.training and letter in self.full_recompute:
                hidden_states = checkpoint(
                    _run_layer,
                    layer,
                    hidden_states,
                    kwargs,
                    use_reentrant=False,
                    context_fn=same_function_modes,  # CPU: keep nam_runtime's device mode
                )
            else:
                hidden_states = _run_layer(layer, hidden_states, kwargs)
            for hook in list(self._hooks.values()):
                out = hook(layer.layer_number, letter, hidden_states)
                hidden_states = hidden_states if out is None else out
        if self.final_norm is not None:
            hidden_states = self.final_norm(hidden_states)
        # pipeline stages send this tensor on; it must own its storage (megatron's convention)
        return make_viewless_tensor(hidden_states, requires_grad=hidden_states.requires_grad, keep_graph=True)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        out: ShardedStateDict = {}
        for i, layer in enumerate(self.layers):
            local, global_ = f"{prefix}layers.{i}.", f"{prefix}layers.{layer.layer_number - 1}."
            sd = layer.sharded_state_dict(local, (), metadata)
            replace_prefix_for_sharding(sd, local, global_)
            out.update(sd)
        if self.final_norm is not None:
            out.update(
                sharded_state_dict_default(
                    self.final_norm, f"{prefix}final_norm.", sharded_offsets, metadata, tp_group=self.tp_group
                )
            )
        return out


def _run_layer(layer: torch.nn.Module, hidden_states: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden_states, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # TransformerLayer returns (hidden, context)
