"""The MoE inside a model: its decoder layers and, per MoE sublayer, the names of its block, router, routed experts
and the norm in front (by the family table in compat.py)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .compat import MOE_BLOCK_NAMES, POST_ATTENTION_NORM, ROUTER_NAMES
from .experts import find_experts


@dataclass
class MoELayer:
    """One decoder layer's MoE sublayer, by name in model.named_modules()."""

    index: int  # decoder layer index
    layer: str  # "model.layers.3"
    block: str  # "model.layers.3.mlp": MoE block (router, routed and shared experts)
    experts: str  # "model.layers.3.mlp.experts"
    router: str  # "model.layers.3.mlp.gate"
    norm: str  # "model.layers.3.post_attention_layernorm": the norm in front of the block


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's decoder layers: the `layers` list whose items hold a self-attention."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "layers" and isinstance(module, nn.ModuleList) and len(module) and all(
                hasattr(layer, "self_attn") for layer in module):
            return name, module
    raise ValueError(f"no decoder layers (a `layers` ModuleList with self_attn) in {type(model).__name__}")


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """{experts module name: its MoELayer}, in layer order; dense layers (DeepSeek's first_k_dense_replace) are
    not included."""
    prefix, layers = decoder_layers(model)
    experts = find_experts(model)
    found = {}
    for index, layer in enumerate(layers):
        for block_name in MOE_BLOCK_NAMES:
            block = getattr(layer, block_name, None)
            name = f"{prefix}.{index}.{block_name}"
            if block is None or f"{name}.experts" not in experts:
                continue
            router = next((r for r in ROUTER_NAMES if hasattr(getattr(block, r, None), "weight")), None)
            if router is None:
                raise ValueError(f"{name} ({type(block).__name__}) has no router named {' or '.join(ROUTER_NAMES)}")
            found[f"{name}.experts"] = MoELayer(index, f"{prefix}.{index}", name, f"{name}.experts",
                                                f"{name}.{router}", f"{prefix}.{index}.{POST_ATTENTION_NORM}")
    return found
