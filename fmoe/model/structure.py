"""The structures fmoe's edits leave in a model, each recorded in a config field so that `from_pretrained` can
build it again before the weights load:

- `fmoe_expert_widths` (WIDTHS_FIELD): each expert's width; uniform modules stay stock, others become RaggedExperts;
- `fmoe_expert_counts` (EXPERT_COUNTS_FIELD): experts kept per layer, when layers keep different numbers;
- `fmoe_dropped_moe` (DROPPED_MOE_FIELD): decoder layers whose MoE sublayer was removed (DroppedMoE);
- `fmoe_compressed` (COMPRESSED_FIELD): compressed experts (CompressedExperts, see fmoe.methods.compressed).

The methods (fmoe.methods) decide what to cut and call these edits; checkpoint.py rebuilds them.
"""

from __future__ import annotations

import torch
from torch import nn

from .compat import (TUPLE_BLOCKS, cut_router, family_class, own_config, select_rows, support_uneven_expert_counts,
                     width_field)
from .experts import (RaggedExperts, adopt_stock, attached_hooks, expert_widths, experts_forward, find_experts,
                      is_routed_experts, num_experts, replace_module, slice_experts, up_name)
from .hooks import ensure_aligned_implementation
from .layers import moe_layers

WIDTHS_FIELD = "fmoe_expert_widths"  # config field: {module name: [width per expert]} of a pruned model


def slice_uniform(module: nn.Module, keep: list[torch.Tensor]) -> None:
    """Slice a fused experts module in place to the same number of dims in every expert (stock class kept)."""
    for key, data in slice_experts(module, list(range(len(keep))), torch.stack(keep)).items():
        setattr(module, key, nn.Parameter(data, requires_grad=getattr(module, key).requires_grad))
    width = int(keep[0].numel())
    for attr in ("intermediate_dim", "intermediate_size"):
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, width)


def apply_widths(model: nn.Module, keep: dict[str, list[torch.Tensor]]) -> nn.Module:
    """Cut every listed experts module to `keep`; uniform modules stay stock, others become RaggedExperts."""
    modules = find_experts(model)
    for name, keeps in keep.items():
        if len({int(k.numel()) for k in keeps}) == 1:
            slice_uniform(modules[name], keeps)
        else:
            replace_module(model, name, RaggedExperts(modules[name], keeps))
    return record_widths(model)


def record_widths(model: nn.Module) -> nn.Module:
    """Write the experts' widths into the config (WIDTHS_FIELD, and the family's width field when every expert has
    the same width, so a stock loader builds this exact shape); fall back from grouped_mm where it cannot run."""
    widths = {name: expert_widths(m) for name, m in find_experts(model).items()}
    setattr(own_config(model), WIDTHS_FIELD, widths)
    uniform = {w for ws in widths.values() for w in ws}
    field = width_field(model.config.model_type)
    if field is not None and len(uniform) == 1 and not any(isinstance(m, RaggedExperts) for m in find_experts(model).values()):
        setattr(model.config, field, uniform.pop())
    ensure_aligned_implementation(model)
    return model


EXPERT_COUNTS_FIELD = "fmoe_expert_counts"  # config field {experts module name: kept count} when counts differ


def select_experts(model: nn.Module, keep: dict[str, list[int]]) -> None:
    """Cut every listed MoE layer to experts keep[name] (ascending ids): expert tensors, router rows and biases,
    expert counts and top_k of router, block and experts module. Works on the meta device (checkpoint rebuilds)."""
    layers = moe_layers(model)
    for name, ids in keep.items():
        layer, index = layers[name], torch.tensor(ids, dtype=torch.long)
        experts = model.get_submodule(name)
        if isinstance(experts, RaggedExperts):
            experts = _select_ragged(model, name, experts, ids)
        else:  # fused experts (and compressed experts' per-expert vectors)
            _select_params(experts, index, [up_name(experts), "down_proj", *VECTORS])
        router, block = model.get_submodule(layer.router), model.get_submodule(layer.block)
        cut_router(router, index)
        for module in (router, block, experts):
            if isinstance(getattr(module, "num_experts", None), int):
                module.num_experts = len(ids)
            if isinstance(getattr(module, "top_k", None), int):
                module.top_k = min(module.top_k, len(ids))
    if len({num_experts(m) for m in find_experts(model).values()}) > 1:  # the stock load-balancing loss needs one
        support_uneven_expert_counts(model)


def _select_params(module: nn.Module, index: torch.Tensor, keys: list[str]) -> None:
    """Parameters `keys` (and their `_bias`, where present) of `module` cut to `index` along the expert axis."""
    for key in keys + [f"{k}_bias" for k in keys]:
        select_rows(module, key, index)


def _select_ragged(model: nn.Module, name: str, ragged: RaggedExperts, ids: list[int]) -> nn.Module:
    """Ragged experts cut to `ids`: their width buckets cut in place, or, when the kept experts share one width,
    the stock module they were cut from (what `fmoe.methods.dims.prune.apply_widths` builds for uniform widths)."""
    position = {e: i for i, e in enumerate(ids)}
    buckets, bucket_ids = [], []
    for bucket, members in zip(ragged.buckets, ragged.bucket_ids, strict=True):
        local = [i for i, e in enumerate(members) if e in position]
        if local:
            _select_params(bucket, torch.tensor(local), [up_name(bucket), "down_proj"])
            buckets.append(bucket)
            bucket_ids.append([position[members[i]] for i in local])
    widths = [ragged.widths[e] for e in ids]
    if len(buckets) > 1:
        ragged.buckets, ragged.bucket_ids, ragged.widths = nn.ModuleList(buckets), bucket_ids, widths
        ragged.num_experts, ragged._order = len(ids), {}
        return ragged
    block = model.get_submodule(name.rpartition(".")[0])
    stock_class = family_class(block, ragged.stock_class)
    with torch.device("meta"):
        stock = stock_class(ragged.config)
    for key, p in buckets[0]._parameters.items():
        stock._parameters[key] = p
    stock.num_experts = len(ids)
    for attr in ("intermediate_dim", "intermediate_size"):
        if isinstance(getattr(stock, attr, None), int):
            setattr(stock, attr, widths[0])
    replace_module(model, name, stock)
    return stock


def rebuild_expert_counts(model: nn.Module, config=None) -> nn.Module:
    """Cut a freshly built model (meta device) to the per-layer expert counts its config records
    (`fmoe_expert_counts`, written when layers keep different numbers); a no-op without that field."""
    config = model.config if config is None else config
    counts = getattr(config, EXPERT_COUNTS_FIELD, None) or {}
    if not counts:
        return model
    modules = find_experts(model)
    wrong = [n for n, k in counts.items() if n not in modules or not 0 < int(k) <= num_experts(modules[n])]
    if wrong:
        raise ValueError(f"{EXPERT_COUNTS_FIELD} names experts modules the model does not have, or counts that do "
                         f"not fit: {wrong[:3]}; the model's modules are {sorted(modules)[:3]}...")
    select_experts(model, {name: list(range(int(k))) for name, k in counts.items()})
    return model


DROPPED_MOE_FIELD = "fmoe_dropped_moe"  # config field: [decoder layer index] whose MoE sublayer was removed


# config fields naming decoder layers, renumbered by a block drop: dicts keyed by module name (`<prefix>.<i>.…`) or
# layer index, or lists of layer indices
LAYER_FIELDS = (WIDTHS_FIELD, EXPERT_COUNTS_FIELD, DROPPED_MOE_FIELD)


class DroppedMoE(nn.Module):
    """Stands in for a removed MoE block: its output is zeros shaped like its input, so the decoder layer's
    `residual + block(norm(residual))` (times granitemoe's residual_multiplier) is the residual itself."""
    def __init__(self, returns_tuple: bool = False):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.returns_tuple else zeros

    def extra_repr(self) -> str:
        return f"returns_tuple={self.returns_tuple}"


def remove_sublayers(model: nn.Module, layers: list[int]) -> list[str]:
    """Replace the norm and MoE block of each listed layer; returns the block names."""
    by_index = {m.index: m for m in moe_layers(model).values()}
    wrong = [i for i in layers if i not in by_index]
    if wrong:
        raise ValueError(f"decoder layers {wrong} have no MoE sublayer (MoE layers: {sorted(by_index)})")
    returns_tuple = model.config.model_type in TUPLE_BLOCKS
    for i in layers:
        model.get_submodule(by_index[i].norm)  # the norm in front of the block exists under its usual name
        replace_module(model, by_index[i].norm, nn.Identity())
        replace_module(model, by_index[i].block, DroppedMoE(returns_tuple))
    return [by_index[i].block for i in layers]


def rebuild_dropped_moe(model: nn.Module, config) -> nn.Module:
    """Remove again the MoE sublayers `config.fmoe_dropped_moe` lists, in a model freshly built from `config`
    (checkpoint loading, before expert widths are applied)."""
    layers = getattr(config, DROPPED_MOE_FIELD, None) or []
    if layers:
        try:
            remove_sublayers(model, layers)
        except ValueError as err:
            raise ValueError(f"config field {DROPPED_MOE_FIELD}={layers} does not fit the model: {err}") from err
    return model


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
        self.main = self.active_experts = int(main)  # fmoe.methods.dims.prune.active_parameters reads active_experts
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


def compress_layers(model: nn.Module, main: int | None) -> int:
    """Replace every routed experts module by CompressedExperts; returns `main`."""
    layers = moe_layers(model)
    top_k = {model.get_submodule(layer.router).top_k for layer in layers.values()}
    main = max(1, min(top_k) // 2) if main is None else int(main)
    if not 1 <= main <= min(top_k):
        raise ValueError(f"main must be between 1 and the routers' top_k {min(top_k)} (experts computed per "
                         f"token), got {main}")
    for name in layers:
        replace_module(model, name, CompressedExperts(model.get_submodule(name), main))
    return main


def rebuild_compressed(model: nn.Module, config) -> nn.Module:
    """Give a model built from `config` (fmoe.model.checkpoint.empty_model) the compressed experts the config records."""
    recorded = getattr(config, COMPRESSED_FIELD, None)
    if recorded:
        compress_layers(model, recorded["main"])
    return model
