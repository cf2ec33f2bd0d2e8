"""Routed-experts discovery and the one experts forward fmoe owns (hookable, works for fused and ragged experts).

transformers v5 stores routed experts as fused 3D parameters and describes their layout with instance flags set by
`@use_experts_implementation`: `is_transposed`, `is_concatenated` (False = gate/up interleaved), `has_bias`,
`has_gate`. Everything here is driven by those flags; no per-model forward code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# hook(expert_index, token_index[S], slot_index[S], h[S, I], routing_weight[S]) -> h'[S, I]
IntermediateHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
HOOKS_ATTR = "_fmoe_hooks"  # a module's attached hooks, outermost first (see fmoe.compat.experts_hooks)


def attached_hooks(module: nn.Module) -> list[IntermediateHook]:
    return module.__dict__.get(HOOKS_ATTR, [])

_UP_NAMES = ("gate_up_proj", "up_proj")


def is_routed_experts(module: nn.Module) -> bool:
    """True for a fused transformers experts module (layout flags + 3D `down_proj`) or one of ours."""
    if isinstance(module, RaggedExperts):
        return True
    down = getattr(module, "down_proj", None)
    return hasattr(module, "has_gate") and isinstance(down, nn.Parameter) and down.dim() == 3


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """{name in model.named_modules(): routed experts module}; shared experts, routers and MLPs are not included."""
    found = {name: m for name, m in model.named_modules() if is_routed_experts(m)}
    if not found:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"no routed experts found in model type {model_type!r}: fmoe needs transformers v5 fused experts "
            "(modules decorated with @use_experts_implementation, 3D gate_up_proj/down_proj)"
        )
    return found


def up_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def num_experts(module: nn.Module) -> int:
    return len(module.down) if isinstance(module, RaggedExperts) else module.down_proj.shape[0]


def expert_widths(module: nn.Module) -> list[int]:
    """Intermediate width of every expert in the module."""
    if isinstance(module, RaggedExperts):
        return list(module.widths)
    width = module.down_proj.shape[1] if module.is_transposed else module.down_proj.shape[2]
    return [width] * num_experts(module)


def width_buckets(widths: list[int]) -> list[tuple[int, list[int]]]:
    """Experts grouped by kept width, [(width, [expert ids ascending])] in ascending width: the layout of
    RaggedExperts (bucket b stores its experts as one fused tensor, `buckets.{b}.gate_up_proj` [G_b, 2I_b, H] etc.
    in the stock layout), so each bucket runs as one grouped matmul."""
    by_width: dict[int, list[int]] = {}
    for e, w in enumerate(widths):
        by_width.setdefault(int(w), []).append(e)
    return sorted(by_width.items())


def up_rows(keep: torch.Tensor, width: int, module: nn.Module) -> torch.Tensor:
    """Indices along the up projection's output axis that belong to intermediate dims `keep` (ascending)."""
    if not module.has_gate:
        return keep
    if module.is_concatenated:  # [gate_0..gate_I, up_0..up_I]
        return torch.cat([keep, keep + width])
    return torch.stack([2 * keep, 2 * keep + 1], dim=1).reshape(-1)  # [g0, u0, g1, u1, ...]


def slice_expert(module: nn.Module, e: int, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameters of expert `e` restricted to intermediate dims `keep`, as 2D/1D tensors (same layout)."""
    width = expert_widths(module)[e]
    rows = up_rows(keep, width, module)
    up_axis, down_axis = (1, 0) if module.is_transposed else (0, 1)
    name = up_name(module)
    out = {
        name: getattr(module, name)[e].index_select(up_axis, rows),
        "down_proj": module.down_proj[e].index_select(down_axis, keep),
    }
    if module.has_bias:
        out[f"{name}_bias"] = getattr(module, f"{name}_bias")[e].index_select(0, rows)
        out["down_proj_bias"] = module.down_proj_bias[e].clone()  # own storage, not a view of the fused tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


def _fused_up(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    name = up_name(module)
    w = getattr(module, name)[e]
    y = x @ w if module.is_transposed else x @ w.t()
    return y + getattr(module, f"{name}_bias")[e] if module.has_bias else y


def _fused_down(module: nn.Module, e: int, h: torch.Tensor) -> torch.Tensor:
    w = module.down_proj[e]
    o = h @ w if module.is_transposed else h @ w.t()
    return o + module.down_proj_bias[e] if module.has_bias else o


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,  # [T, H] (batch and sequence flattened, row-major)
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
    hooks: list[IntermediateHook] = (),
) -> torch.Tensor:
    """Routed experts output [T, H], looping over the experts hit; each of `hooks` in turn sees (and may replace)
    each expert's intermediate h, the first hook the activation itself."""
    n_tokens, k = top_k_index.shape
    n_exp = num_experts(module)
    flat = top_k_index.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_exp)[:n_exp].tolist()  # ids >= E (expert parallel sentinels) skipped
    token_of, slot_of = order // k, order % k
    out = torch.zeros_like(hidden_states)
    project_up, project_down = (module.project_up, module.project_down) if isinstance(module, RaggedExperts) else (
        _fused_up, _fused_down)
    start = 0
    ragged = isinstance(module, RaggedExperts)
    for e, count in enumerate(counts):
        # a ragged expert with trainable parameters (e.g. LoRA) still runs without tokens when autograd is on: its
        # parameters then get a zero gradient, and DDP and FSDP2 need the same parameters in every rank's backward
        if count == 0 and not (ragged and torch.is_grad_enabled() and module.trains(e)):
            continue
        tokens, slots = token_of[start : start + count], slot_of[start : start + count]
        start += count
        y = project_up(module, e, hidden_states[tokens])  # [S, 2I] (gated) or [S, I]
        h = module._apply_gate(y) if module.has_gate else module.act_fn(y)  # [S, I]
        weights = top_k_weights[tokens, slots]  # [S]
        for hook in hooks:
            h = hook(e, tokens, slots, h, weights)
        o = project_down(module, e, h)  # [S, H]
        if getattr(module, "has_post_expert_norm", False):
            o = module.post_expert_norm(o)
        out.index_add_(0, tokens, (o * weights.unsqueeze(-1)).to(out.dtype))
    return out


class RaggedExperts(nn.Module):
    """Routed experts whose experts have different intermediate widths; memory proportional to kept dims.

    Expert e is a pair of `nn.Linear`s, `up[e]` (H -> 2I_e, gate/up rows in the stock order) and `down[e]`
    (I_e -> H), so peft/LoRA and FSDP treat them like any Linear. The stock class's gate function and scalars
    (gpt-oss alpha/limit) are reused, so every flag combination behaves exactly like the module it was cut from.
    """

    def __init__(self, stock: nn.Module, keep: list[torch.Tensor]):
        super().__init__()
        if not is_routed_experts(stock) or isinstance(stock, RaggedExperts):
            raise TypeError(f"RaggedExperts is cut from a fused transformers experts module, got {type(stock).__name__}")
        for key, value in vars(stock).items():  # flags, sizes, gpt-oss alpha/limit
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
                setattr(self, key, value)
        self.config = getattr(stock, "config", None)
        self.has_post_expert_norm = getattr(stock, "has_post_expert_norm", False)
        if hasattr(stock, "act_fn"):
            self.act_fn = stock.act_fn
        if self.has_post_expert_norm:
            self.post_expert_norm = stock.post_expert_norm
        self._gate_fn = type(stock)._apply_gate if self.has_gate else None
        self.stock_class = type(stock).__name__
        self.widths = [int(k.numel()) for k in keep]
        self.num_experts = len(keep)
        name, requires_grad = up_name(stock), stock.down_proj.requires_grad
        self.up, self.down = nn.ModuleList(), nn.ModuleList()
        for e, k in enumerate(keep):
            parts = slice_expert(stock, e, k)
            up_w, down_w = parts[name], parts["down_proj"]
            if stock.is_transposed:  # stored [in, out]; Linear wants [out, in]
                up_w, down_w = up_w.t(), down_w.t()
            self.up.append(_linear(up_w, parts.get(f"{name}_bias"), requires_grad))
            self.down.append(_linear(down_w, parts.get("down_proj_bias"), requires_grad))

    def _apply_gate(self, y: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, y)

    def trains(self, e: int) -> bool:
        """Does expert e have a parameter that requires a gradient (its weights, or adapters on them)?"""
        return any(p.requires_grad for layer in (self.up[e], self.down[e]) for p in layer.parameters())

    def project_up(self, module, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.up[e](x)

    def project_down(self, module, e: int, h: torch.Tensor) -> torch.Tensor:
        return self.down[e](h)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, attached_hooks(self))

    def extra_repr(self) -> str:
        return f"{self.stock_class}, widths={self.widths}"


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=requires_grad)
    return layer


def fingerprint(model: nn.Module) -> str:
    """Identity of a model's routed experts: names, shapes and a bf16 sample of each module's weights.

    Cheap (no full-weight hash) and stable across fp32/bf16 casts; it changes when experts are pruned.
    """
    samples = []
    for name, module in find_experts(model).items():
        params = list(module.parameters())
        heads = []
        for p in (params[0], params[-1]):
            p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shard: the same sample on every rank
            heads.append(p.detach().reshape(-1)[:64])
        samples.append((name, expert_widths(module), heads))
    return fingerprint_of(str(getattr(getattr(model, "config", None), "model_type", "")), samples)


def fingerprint_of(model_type: str, samples: list[tuple[str, list[int], list[torch.Tensor]]]) -> str:
    """The fingerprint from (module name, expert widths, [first 64 values of its first and last parameter]) per
    experts module, in model order: shared by `fingerprint` and checkpoints read without a model (fmoe.offline)."""
    import hashlib

    digest = hashlib.sha256(model_type.encode())
    for name, widths, heads in samples:
        digest.update(f"{name}:{widths}".encode())
        for w in heads:
            digest.update(w.reshape(-1)[:64].to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]
