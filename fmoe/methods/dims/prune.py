"""Physical removal of intermediate dims (and its reference: the same dims masked to zero)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ...model.experts import expert_widths, find_experts, num_experts
from ...model.hooks import DimMask, experts_hooks, has_hooks
from ...model.layers import moe_layers
from ...model.structure import apply_widths
from .plan import PruningPlan, check_plan


@torch.no_grad()
def prune(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically remove the dims `plan` drops (in place); returns the model."""
    if has_hooks(model):
        raise RuntimeError("cannot prune a model while fmoe hooks are attached (inside fmoe.masked or a scoring "
                           "pass): their masks and sums have the old widths; prune after the block ends")
    check_plan(model, plan)
    return apply_widths(model, plan.keep)


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
