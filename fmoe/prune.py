"""Physical removal of intermediate dims (and its reference: the same dims masked to zero)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .compat import ensure_aligned_implementation, experts_hooks, has_hooks, moe_layers, own_config, width_field
from .compressed import CompressedExperts
from .experts import (RaggedExperts, attached_hooks, expert_widths, find_experts, fingerprint, num_experts, on_meta,
                      replace_module, slice_experts)
from .plan import PruningPlan

WIDTHS_FIELD = "fmoe_expert_widths"  # config field: {module name: [width per expert]} of a pruned model


def check_plan(model: nn.Module, plan: PruningPlan) -> dict[str, nn.Module]:
    """The model's experts modules, after checking the plan was made for exactly this model. An empty (meta)
    model has no weights to fingerprint (a non-zero rank's under FSDP2, whose plan rank 0 checked): widths only."""
    modules = find_experts(model)
    compressed = [name for name, m in modules.items() if isinstance(m, CompressedExperts)]
    if compressed:
        raise ValueError(f"cannot prune the dims of compressed experts ({compressed[0]}): their trained vectors have "
                         "the experts' width; prune dims first, then compress")
    fp = plan.fingerprint if on_meta(model) else fingerprint(model)
    check_plan_fits(plan, {name: expert_widths(m) for name, m in modules.items()}, fp)
    return modules


def check_plan_fits(plan: PruningPlan, widths: dict[str, list[int]], fp: str) -> None:
    """The plan was made for experts of these widths and this fingerprint, and keeps valid dims (no model needed)."""
    if plan.widths != widths:
        raise ValueError(
            "plan does not fit this model: it was made for experts "
            f"{_summary(plan.widths)}, the model has {_summary(widths)}"
        )
    if plan.fingerprint != fp:
        raise ValueError(f"plan was made from scores of another model (fingerprint {plan.fingerprint} != {fp})")
    missing, unknown = sorted(set(widths) - set(plan.keep)), sorted(set(plan.keep) - set(widths))
    if missing or unknown:
        raise ValueError(f"plan keeps no dims for experts modules {missing[:3]} (a plan lists the kept dims of every "
                         "experts module; list all of a module's dims to leave it whole)" if missing else
                         f"plan names experts modules the model does not have: {unknown[:3]}")
    for name, keeps in plan.keep.items():
        if len(keeps) != len(widths[name]):
            raise ValueError(f"plan keeps dims for {len(keeps)} experts of {name}, which has {len(widths[name])}")
        for e, keep in enumerate(keeps):
            if keep.numel() == 0 or keep.min() < 0 or keep.max() >= widths[name][e] or not bool((keep.diff() > 0).all()):
                raise ValueError(f"plan keeps invalid dims for {name} expert {e}: need ascending, unique, in range")


def _summary(widths: dict[str, list[int]]) -> str:
    return f"{len(widths)} modules, e.g. {next(iter(widths.items()), None)}"


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


@torch.no_grad()
def prune(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically remove the dims `plan` drops (in place); returns the model."""
    if has_hooks(model):
        raise RuntimeError("cannot prune a model while fmoe hooks are attached (inside fmoe.masked or a scoring "
                           "pass): their masks and sums have the old widths; prune after the block ends")
    check_plan(model, plan)
    return apply_widths(model, plan.keep)


class DimMask:
    """A hook that zeroes the dims outside a plan: h * mask[e], mask[e] a [I_e] 0/1 vector per expert."""

    edits_model = True  # runs before measuring hooks (see fmoe.compat.experts_hooks)

    def __init__(self, module: nn.Module, masks: list[torch.Tensor]):
        self.masks = masks
        groups = module.bucket_ids if isinstance(module, RaggedExperts) else [range(len(masks))]
        self.tables = [torch.stack([masks[e] for e in ids]) for ids in groups]  # [G, I] per grouped call

    def __call__(self, routing, h):
        return h * self.tables[routing.group][routing.local].to(h.dtype)  # [S, I]


def active_mask(module: nn.Module) -> torch.Tensor | None:
    """[E, I] product of the `fmoe.masked` blocks open on a (uniform) experts module, or None if there are none."""
    masks = [torch.stack(hook.masks) for hook in attached_hooks(module) if isinstance(hook, DimMask)]
    return torch.stack(masks).prod(0) if masks else None


@contextmanager
def masked(model: nn.Module, keep: PruningPlan | dict[str, list[torch.Tensor]]) -> Iterator[nn.Module]:
    """Run `model` with every dim outside `keep` zeroed in the intermediate activation (no weight changes).

    Blocks nest (the masks multiply), and scoring inside a block scores the masked model: masked dims score 0.
    """
    if isinstance(keep, PruningPlan):
        check_plan(model, keep)
        keep = keep.keep
    modules = find_experts(model)
    hooks = {}
    for name, keeps in keep.items():
        device = next(modules[name].parameters()).device
        hooks[name] = DimMask(modules[name], [torch.zeros(w, device=device).index_fill_(0, k.to(device), 1.0)
                               for w, k in zip(expert_widths(modules[name]), keeps, strict=True)])  # [I_e] each
    with experts_hooks(model, hooks):
        yield model


def active_parameters(model: nn.Module) -> float:
    """Parameters a token runs through: every non-routed parameter, plus per MoE layer the experts it computes
    (the router's `top_k`, or a module's own `active_experts`: compressed experts compute fewer) times the mean
    parameter count of that layer's experts (expected under uniform routing when widths differ)."""
    total = float(sum(p.numel() for p in model.parameters()))
    for name, layer in moe_layers(model).items():
        experts = model.get_submodule(name)
        routed = sum(p.numel() for p in experts.parameters())
        computed = getattr(experts, "active_experts", None) or model.get_submodule(layer.router).top_k
        total += routed * (computed / num_experts(experts) - 1)
    return total


def weight_bytes(model: nn.Module, routed_only: bool = False) -> int:
    """Bytes of parameters (all, or routed experts only)."""
    params = (p for m in find_experts(model).values() for p in m.parameters()) if routed_only else model.parameters()
    return sum(p.numel() * p.element_size() for p in params)
