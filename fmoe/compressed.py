"""Compressed Experts (He et al. 2025): each token computes only its `main` highest-weight experts; the others
(auxiliary) are replaced by trained vectors that rescale the main experts' inputs and activation.

Every expert e owns c1_e, c3_e in R^H and c2_e in R^I (`compress_gate`, `compress_up`, `compress_act`; ones at
init). For a token whose top-k experts, sorted by routing weight, split into main experts M and auxiliary ones A,

    c̄ = Σ_{a∈A} (w_a / Σ_A w) c_a                     (each of c1, c3, c2)
    y = Σ_{i∈M} α_i · down_i(act(gate_i(x ⊙ c̄1)) ⊙ up_i(x ⊙ c̄3) ⊙ c̄2)   (+ the family's biases)
    α_i = w_i · Σ_{M∪A} w / Σ_M w

α keeps the token's top-k weight sum (so `norm_topk_prob`, DeepSeek's routed_scaling_factor and unnormalised
routers keep their output scale); with main == k it is the routing weight itself. The module holds the stock
module's expert Parameters under their stock names, so `find_experts`, fmoe's hooks and peft's
`target_parameters` treat it as the routed experts; active parameters fall by (k - main) experts per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .compat import own_config
from .experts import RaggedExperts, adopt_stock, attached_hooks, experts_forward, is_routed_experts, replace_module

COMPRESSED_FIELD = "fmoe_compressed"  # config field: {"main": experts computed per token} of a compressed model
VECTORS = ("compress_gate", "compress_up", "compress_act")  # parameter names of the trained vectors


class CompressedExperts(nn.Module):
    """A uniform fused experts module that computes `main` experts per token (see the module docstring). Every
    expert id must be local (no expert-parallel sentinels): auxiliary experts' vectors are read by id."""

    def __init__(self, stock: nn.Module, main: int):
        super().__init__()
        if isinstance(stock, (RaggedExperts, CompressedExperts)) or not is_routed_experts(stock):
            raise TypeError(f"CompressedExperts is made from a uniform fused transformers experts module, got "
                            f"{type(stock).__name__}")
        if main < 1:
            raise ValueError(f"main must be at least 1 (experts computed per token), got {main}")
        adopt_stock(self, stock)
        for key, param in stock.named_parameters(recurse=False):  # the same Parameters, under the same names
            setattr(self, key, param)
        self.main = self.active_experts = int(main)  # fmoe.prune.active_parameters reads active_experts
        down = stock.down_proj  # [E, H, I] ([E, I, H] transposed)
        n, hidden, width = down.shape[0], down.shape[1 + self.is_transposed], down.shape[2 - self.is_transposed]
        sizes = {"compress_gate": hidden, "compress_up": hidden, "compress_act": width}
        for key in VECTORS if self.has_gate else VECTORS[1:]:  # no gate projection: nothing for c1 to scale
            setattr(self, key, nn.Parameter(torch.ones(n, sizes[key], dtype=down.dtype, device=down.device)))

    def _apply_gate(self, y: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, y)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]; the stock forward when K <= main."""
        hooks = attached_hooks(self)
        k = top_k_index.shape[1]
        if k <= self.main:
            return experts_forward(self, hidden_states, top_k_index, top_k_weights, hooks)
        weights, order = top_k_weights.sort(dim=-1, descending=True, stable=True)  # [T, K]
        ids = top_k_index.gather(1, order)  # [T, K]
        main_w, aux_w = weights[:, : self.main], weights[:, self.main :]  # [T, M], [T, A]
        main_sum, aux_sum = main_w.sum(-1, keepdim=True), aux_w.sum(-1, keepdim=True)  # [T, 1]
        alpha = main_w * (weights.sum(-1, keepdim=True) / main_sum.where(main_sum != 0, 1))  # [T, M]
        share = (aux_w / aux_sum.where(aux_sum != 0, 1)).where(aux_sum != 0, 1 / (k - self.main))  # [T, A]
        aux = ids[:, self.main :]  # [T, A]

        def mix(vectors: torch.Tensor) -> torch.Tensor:  # [E, D] -> [T, D], in the input's dtype
            return torch.einsum("ta,tad->td", share.to(vectors.dtype), vectors[aux]).to(hidden_states.dtype)

        scale_act = mix(self.compress_act)  # [T, I]

        def scale_intermediate(routing, h):  # h [S, I] of rows (token, main expert)
            return h * scale_act[routing.tokens].to(h.dtype)

        x_up = hidden_states * mix(self.compress_up)  # [T, H]
        x = hidden_states * mix(self.compress_gate) if self.has_gate else x_up
        # the scaling is part of the model: hooks that edit or measure h see it already applied
        return experts_forward(self, x, ids[:, : self.main], alpha, [scale_intermediate, *hooks], hidden_up=x_up)

    def extra_repr(self) -> str:
        return f"{self.stock_class}, main={self.main}"


def _compress(model: nn.Module, main: int | None) -> int:
    """Replace every routed experts module by CompressedExperts; returns `main`."""
    from .compat import moe_layers

    layers = moe_layers(model)
    top_k = {model.get_submodule(layer.router).top_k for layer in layers.values()}
    main = max(1, min(top_k) // 2) if main is None else int(main)
    if not 1 <= main <= min(top_k):
        raise ValueError(f"main must be between 1 and the routers' top_k {min(top_k)} (experts computed per "
                         f"token), got {main}")
    for name in layers:
        replace_module(model, name, CompressedExperts(model.get_submodule(name), main))
    return main


def compress_experts(model: nn.Module, main: int | None = None) -> nn.Module:
    """Make every MoE layer of `model` compute `main` experts per token (default max(1, top_k // 2)), the others
    replaced by trainable vectors (ones: train them, with or without LoRA, see fmoe.lightning.recovery). In place;
    returns the model. Records COMPRESSED_FIELD in the config, so fmoe.save_pretrained / from_pretrained keep it."""
    from .compat import has_hooks, moe_layers

    if has_hooks(model):
        raise RuntimeError("cannot compress a model while fmoe hooks are attached (inside fmoe.masked or a scoring "
                           "pass); compress after the block ends")
    modules = {name: model.get_submodule(name) for name in moe_layers(model)}
    if getattr(model.config, COMPRESSED_FIELD, None) or any(isinstance(m, CompressedExperts) for m in modules.values()):
        raise ValueError("the model's experts are compressed already")
    ragged = [name for name, m in modules.items() if isinstance(m, RaggedExperts)]
    if ragged:
        raise ValueError(f"cannot compress experts of different widths ({ragged[0]} is RaggedExperts): prune "
                         "dims uniformly (expert scope), then compress")
    main = _compress(model, main)
    setattr(own_config(model), COMPRESSED_FIELD, {"main": main})
    return model


def rebuild_compressed(model: nn.Module, config) -> nn.Module:
    """Give a model built from `config` (fmoe.checkpoint.empty_model) the compressed experts the config records."""
    recorded = getattr(config, COMPRESSED_FIELD, None)
    if recorded:
        _compress(model, recorded["main"])
    return model
