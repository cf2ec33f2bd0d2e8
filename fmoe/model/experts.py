"""Routed-experts discovery and the one experts forward fmoe owns (hookable, works for fused and ragged experts).

transformers v5 stores routed experts as fused 3D parameters and describes their layout with instance flags set by
`@use_experts_implementation`: `is_transposed`, `is_concatenated` (False = gate/up interleaved), `has_bias`,
`has_gate`. Everything here is driven by those flags; no per-model forward code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .compat import grouped_linear

# hook(routing: Routing, h[S, I]) -> h'[S, I], once per grouped call (a layer, or a width bucket of ragged experts).
# A hook may also define `on_output(routing, o[S, H]) -> o'`: it sees each row's expert output before the routing
# weight multiplies it (expert-level statistics: REAP's norm, a mask on the expert's output).
IntermediateHook = Callable[["Routing", torch.Tensor], torch.Tensor]
HOOKS_ATTR = "_fmoe_hooks"  # a module's attached hooks, outermost first (see fmoe.model.hooks.experts_hooks)


def attached_hooks(module: nn.Module) -> list[IntermediateHook]:
    return module.__dict__.get(HOOKS_ATTR, [])

_UP_NAMES = ("gate_up_proj", "up_proj")


def is_routed_experts(module: nn.Module) -> bool:
    """True for a fused transformers experts module (layout flags + 3D `down_proj`) or one of ours."""
    if isinstance(module, RaggedExperts):
        return True
    if isinstance(module, ExpertBucket):  # a part of RaggedExperts, not a layer's experts
        return False
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


def fused_parts(module: nn.Module) -> dict[str, nn.Module]:
    """{relative name: module holding fused expert tensors}: the module itself, or each bucket of ragged experts."""
    if isinstance(module, RaggedExperts):
        return {f"buckets.{b}": bucket for b, bucket in enumerate(module.buckets)}
    return {"": module}


def up_name(module: nn.Module) -> str:
    return "gate_up_proj" if module.has_gate else "up_proj"


def num_experts(module: nn.Module) -> int:
    return module.num_experts if isinstance(module, RaggedExperts) else module.down_proj.shape[0]


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
        return torch.cat([keep, keep + width], dim=-1)
    return torch.stack([2 * keep, 2 * keep + 1], dim=-1).flatten(-2)  # [g0, u0, g1, u1, ...]


def expert_parameters(module: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """Expert e's slices (views) of a fused module's tensors: up projection, down projection and their biases."""
    keys = [up_name(module), "down_proj"]
    keys += [f"{key}_bias" for key in keys] if module.has_bias else []
    return {key: getattr(module, key)[e] for key in keys}


def slice_expert(module: nn.Module, e: int, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parameters of expert `e` restricted to intermediate dims `keep`, as 2D/1D tensors (same layout)."""
    width = expert_widths(module)[e]
    rows = up_rows(keep, width, module)
    up_axis, down_axis = (1, 0) if module.is_transposed else (0, 1)
    name = up_name(module)
    params = module.expert_parameters(e) if isinstance(module, RaggedExperts) else expert_parameters(module, e)
    out = {name: params[name].index_select(up_axis, rows), "down_proj": params["down_proj"].index_select(down_axis, keep)}
    if module.has_bias:
        out[f"{name}_bias"] = params[f"{name}_bias"].index_select(0, rows)
        out["down_proj_bias"] = params["down_proj_bias"].clone()  # own storage, not a view of the fused tensor
    return {k: v.detach().contiguous() for k, v in out.items()}


@torch.no_grad()
def slice_experts(module: nn.Module, ids: list[int], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused tensors [G, ...] (the module's layout) of experts `ids` restricted to dims keep [G, w] (ascending rows,
    one width): one gather per tensor, so pruning copies each kept weight once."""
    if isinstance(module, RaggedExperts):
        slices = [slice_expert(module, e, k) for e, k in zip(ids, keep, strict=True)]
        return {key: torch.stack([s[key] for s in slices]) for key in slices[0]}
    name = up_name(module)
    up, down = getattr(module, name), module.down_proj
    experts = torch.tensor(ids, device=down.device)[:, None]  # [G, 1]
    keep = keep.to(down.device)
    rows = up_rows(keep, expert_widths(module)[0], module)  # [G, 2w] or [G, w]
    hidden = torch.arange(down.shape[2 if module.is_transposed else 1], device=down.device)[None, :, None]
    if module.is_transposed:  # up [E, H, 2I], down [E, I, H]
        out = {name: up[experts[:, :, None], hidden, rows[:, None, :]], "down_proj": down[experts, keep]}
    else:  # up [E, 2I, H], down [E, H, I]
        out = {name: up[experts, rows], "down_proj": down[experts[:, :, None], hidden, keep[:, None, :]]}
    if module.has_bias:
        out[f"{name}_bias"] = getattr(module, f"{name}_bias")[experts, rows]
        out["down_proj_bias"] = module.down_proj_bias[experts[:, 0]]
    return {k: v.detach().contiguous() for k, v in out.items()}


@dataclass
class Routing:
    """The (token, slot) pairs one grouped call computes, sorted by expert (row r is slot `slots[r]` of token
    `tokens[r]`). A uniform module computes all its experts in one call; ragged experts one call per width bucket."""

    ids: torch.Tensor  # [G] the experts of this call (module-wide ids, ascending)
    local: torch.Tensor  # [S] each row's expert as an index into `ids`
    offsets: torch.Tensor  # [G] int32 cumulative row ends per expert (grouped_mm's `offs`)
    tokens: torch.Tensor  # [S]
    slots: torch.Tensor  # [S]
    weights: torch.Tensor  # [S] routing weight
    real: torch.Tensor | None  # [S] bool, False on expert-parallel sentinel rows (ids >= E); None: all rows real
    group: int = 0  # which call: the width bucket of ragged experts (0 for a uniform module)

    @property
    def experts(self) -> torch.Tensor:
        """[S] module-wide expert id of each row."""
        return self.ids[self.local]


def _real_rows_only(t: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    return t if real is None else t.where(real[:, None], 0.0)


def gate_rows(width: int, module: nn.Module) -> torch.Tensor:
    """[2I] bool: which outputs of a gated up projection are gate rows (the rest are up rows)."""
    rows = torch.zeros(2 * width, dtype=torch.bool)
    rows[slice(0, width) if module.is_concatenated else slice(0, None, 2)] = True  # [gate.., up..] or [g, u, ...]
    return rows


def grouped_experts(module: nn.Module, x: torch.Tensor, routing: Routing, hooks=(),
                    x_up: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted output [S, H] of rows x [S, H] through the experts of `module` (fused tensors in the stock layout,
    described by its flags), one grouped matmul per projection; `hooks` see (and may replace) h = act(gate) * up,
    and those with `on_output` the expert output o [S, H]. With `x_up`, the up rows read x_up and the gate rows x
    (the up projection runs twice: compressed experts scale the two inputs differently)."""
    name = up_name(module)
    if x.shape[0] == 0:  # no rows, yet trainable: every parameter still joins the backward (zero gradients)
        touched = sum(p.sum() for p in expert_parameters(module, slice(None)).values())
        return x.new_zeros(0, x.shape[1]) + 0 * touched
    real = partial(_real_rows_only, real=routing.real)  # rows past the last offset stay uninitialised in grouped_mm
    up_bias = getattr(module, f"{name}_bias")[routing.local] if module.has_bias else None
    up = partial(grouped_linear, weight=getattr(module, name), offsets=routing.offsets, bias=up_bias,
                 transposed=module.is_transposed)
    y = real(up(real(x if x_up is None or module.has_gate else x_up)))  # [S, 2I] or [S, I]
    if x_up is not None and module.has_gate:
        y = torch.where(gate_rows(y.shape[1] // 2, module).to(y.device), y, real(up(real(x_up))))
    h = module._apply_gate(y) if module.has_gate else module.act_fn(y)  # [S, I]
    for hook in hooks:
        h = hook(routing, h)
    down_bias = module.down_proj_bias[routing.local] if module.has_bias else None
    o = real(grouped_linear(real(h), module.down_proj, routing.offsets, down_bias, module.is_transposed))  # [S, H]
    if getattr(module, "has_post_expert_norm", False):
        o = module.post_expert_norm(o)
    for hook in hooks:
        if hasattr(hook, "on_output"):
            o = hook.on_output(routing, o)
    return real(o * routing.weights[:, None].to(o.dtype))


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,  # [T, H] (batch and sequence flattened, row-major)
    top_k_index: torch.Tensor,  # [T, K]
    top_k_weights: torch.Tensor,  # [T, K]
    hooks: list[IntermediateHook] = (),
    hidden_up: torch.Tensor | None = None,  # [T, H] input of the up rows, if not hidden_states (grouped_experts)
) -> torch.Tensor:
    """Routed experts output [T, H]: (token, slot) pairs sorted by expert once, then one grouped matmul per
    projection (per width bucket for ragged experts). Each of `hooks` in turn sees (and may replace) the
    intermediate h of every routed pair, the first hook the activation itself. Ids >= E (expert-parallel
    sentinels) compute nothing. Uniform modules run without a host sync; ragged ones read their bucket sizes once."""
    n_exp, k = num_experts(module), top_k_index.shape[1]
    ragged = isinstance(module, RaggedExperts)
    flat = top_k_index.reshape(-1)  # [T*K]
    ranks, bucket_ids = module.bucket_order(flat.device) if ragged else (None, None)
    key = ranks[flat.clamp(0, n_exp)] if ragged else flat  # bucket-major expert rank
    sorted_key, order = torch.sort(key, stable=True)  # [S], S = T*K (sentinels last)
    tokens, slots = order // k, order % k
    weights = top_k_weights.reshape(-1)[order]  # [S]
    ends = torch.searchsorted(sorted_key, torch.arange(1, n_exp + 1, device=flat.device))  # rows with rank < e+1
    x = hidden_states[tokens]  # [S, H]
    x_up = None if hidden_up is None else hidden_up[tokens]  # [S, H]
    out = torch.zeros_like(hidden_states)
    if not ragged:
        routing = Routing(torch.arange(n_exp, device=flat.device), sorted_key.clamp(max=n_exp - 1),
                          ends.to(torch.int32), tokens, slots, weights, sorted_key < n_exp)
        return out.index_add_(0, tokens, grouped_experts(module, x, routing, hooks, x_up).to(out.dtype))
    row_ends = ends.tolist()  # one host sync: where each expert's rows end, in bucket-major order
    start, rank0 = 0, 0
    for b, bucket in enumerate(module.buckets):
        size = len(module.bucket_ids[b])
        stop = row_ends[rank0 + size - 1]
        # a bucket with trainable parameters (LoRA) runs even without rows while autograd is on: DDP and FSDP2
        # need the same parameters in every rank's backward (they get zero gradients)
        if stop > start or (torch.is_grad_enabled() and any(p.requires_grad for p in bucket.parameters())):
            rows = slice(start, stop)
            offsets = (ends[rank0 : rank0 + size] - start).to(torch.int32)  # [G]
            routing = Routing(bucket_ids[b], sorted_key[rows] - rank0, offsets, tokens[rows], slots[rows],
                              weights[rows], None, b)  # no sentinel rows here: they rank after every bucket
            rows_up = None if x_up is None else x_up[rows]
            out.index_add_(0, tokens[rows], bucket(x[rows], routing, hooks, rows_up).to(out.dtype))
        start, rank0 = stop, rank0 + size
    return out


def adopt_stock(module: nn.Module, stock: nn.Module) -> None:
    """Give `module` what computes like the stock experts module `stock`: its layout flags, sizes and scalars
    (gpt-oss alpha/limit), config, activation, post-expert norm and gate function (`module._gate_fn(module, y)`
    is the stock `_apply_gate` run on `module`'s attributes)."""
    for key, value in vars(stock).items():  # flags, sizes, gpt-oss alpha/limit
        if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
            setattr(module, key, value)
    module.config = getattr(stock, "config", None)
    module.has_post_expert_norm = getattr(stock, "has_post_expert_norm", False)
    if hasattr(stock, "act_fn"):
        module.act_fn = stock.act_fn
    if module.has_post_expert_norm:
        module.post_expert_norm = stock.post_expert_norm
    module._gate_fn = type(stock)._apply_gate if module.has_gate else None
    module.stock_class = type(stock).__name__


class ExpertBucket(nn.Module):
    """Experts of one kept width, stored like the stock module they were cut from (fused `gate_up_proj`
    [G, 2I, H] or `up_proj`, `down_proj` [G, H, I], biases; same layout flags), so peft's `target_parameters`
    adapts them per expert and one grouped matmul runs them all."""

    def __init__(self, owner: RaggedExperts, params: dict[str, torch.Tensor], requires_grad: bool):
        super().__init__()
        for key in ("is_transposed", "is_concatenated", "has_bias", "has_gate"):
            setattr(self, key, getattr(owner, key))
        self.__dict__["owner"] = owner  # not a submodule: gate function and activation are the owner's
        for key, value in params.items():
            setattr(self, key, nn.Parameter(value, requires_grad=requires_grad))

    def _apply_gate(self, y: torch.Tensor) -> torch.Tensor:
        return self.owner._apply_gate(y)

    def act_fn(self, y: torch.Tensor) -> torch.Tensor:
        return self.owner.act_fn(y)

    @property
    def has_post_expert_norm(self) -> bool:
        return self.owner.has_post_expert_norm

    def post_expert_norm(self, o: torch.Tensor) -> torch.Tensor:
        return self.owner.post_expert_norm(o)

    def forward(self, x: torch.Tensor, routing: Routing, hooks=(), x_up: torch.Tensor | None = None) -> torch.Tensor:
        return grouped_experts(self, x, routing, hooks, x_up)


class RaggedExperts(nn.Module):
    """Routed experts with different intermediate widths; memory proportional to kept dims.

    Experts of equal width are stored together as one `ExpertBucket` (`buckets[b]`, the layout of
    `width_buckets`), so a forward runs one grouped matmul per distinct width; plans bound the number of widths
    per layer (`make_plan(max_widths=...)`). The stock class's gate function and scalars (gpt-oss alpha/limit)
    are reused, so every flag combination behaves exactly like the module it was cut from.
    """

    def __init__(self, stock: nn.Module, keep: list[torch.Tensor]):
        super().__init__()
        if not is_routed_experts(stock) or isinstance(stock, RaggedExperts):
            raise TypeError(f"RaggedExperts is cut from a fused transformers experts module, got {type(stock).__name__}")
        adopt_stock(self, stock)
        self.widths = [int(k.numel()) for k in keep]
        self.num_experts = len(keep)
        layout = width_buckets(self.widths)
        self.bucket_ids = [ids for _, ids in layout]
        self._order: dict[torch.device, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        requires_grad = stock.down_proj.requires_grad
        self.buckets = nn.ModuleList()
        for _, ids in layout:
            params = slice_experts(stock, ids, torch.stack([keep[e] for e in ids]))
            self.buckets.append(ExpertBucket(self, params, requires_grad))

    def bucket_order(self, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """([E + 1] rank of each expert in bucket-major order, a sentinel id E last; each bucket's expert ids),
        on `device` (made once per device)."""
        if device not in self._order or self._order[device][0].device != device:  # (a module loaded elsewhere)
            ranks = torch.empty(self.num_experts + 1, dtype=torch.long)
            ranks[torch.tensor([e for ids in self.bucket_ids for e in ids] + [self.num_experts])] = torch.arange(
                self.num_experts + 1)
            self._order[device] = ranks.to(device), [torch.tensor(ids, device=device) for ids in self.bucket_ids]
        return self._order[device]

    def _apply_gate(self, y: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, y)

    def expert_parameters(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's parameters (views into its bucket), in the stock per-expert layout of `slice_expert`."""
        for bucket, ids in zip(self.buckets, self.bucket_ids, strict=True):
            if e in ids:
                i = ids.index(e)
                return expert_parameters(bucket, i)
        raise IndexError(f"expert {e} out of range for {self.num_experts} experts")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return experts_forward(self, hidden_states, top_k_index, top_k_weights, attached_hooks(self))

    def extra_repr(self) -> str:
        return f"{self.stock_class}, widths={self.widths}"


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where model.get_submodule(name) is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def on_meta(model: nn.Module) -> bool:
    """Does any parameter or buffer of `model` still lack storage (built by `fmoe.model.checkpoint.empty_model`, not yet
    filled)?"""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


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
    experts module, in model order: shared by `fingerprint` and checkpoints read without a model (fmoe.methods.offline)."""
    import hashlib

    digest = hashlib.sha256(model_type.encode())
    for name, widths, heads in samples:
        digest.update(f"{name}:{widths}".encode())
        for w in heads:
            digest.update(w.reshape(-1)[:64].to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]
