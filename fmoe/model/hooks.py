"""fmoe's experts implementation: a transformers experts function that runs the fused experts with one grouped
matmul per projection and calls hooks on each expert's intermediate activation h = act(gate) * up, which module
hooks cannot reach. Calibration accumulators and the masks of `fmoe.masked` (DimMask) are such hooks."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .compat import register_experts_implementation
from .experts import (HOOKS_ATTR, IntermediateHook, RaggedExperts, attached_hooks, expert_widths, experts_forward,
                      find_experts)

IMPLEMENTATION = "fmoe"
_PREVIOUS = "_fmoe_previous_implementation"  # on the model: [implementation to restore, open experts_hooks blocks]


def _fmoe_experts(self, hidden_states, top_k_index, top_k_weights):
    return experts_forward(self, hidden_states, top_k_index, top_k_weights, attached_hooks(self))


register_experts_implementation(IMPLEMENTATION, _fmoe_experts)


@contextmanager
def experts_hooks(model: nn.Module, hooks: dict[str, IntermediateHook]) -> Iterator[None]:
    """Run `model` with fmoe's experts forward, calling hooks[name] on each expert's intermediate activation.

    Blocks nest and compose: each hook sees what the previous one returned. Hooks that edit the model (those with
    `edits_model = True`, e.g. the masks of `fmoe.masked`) run before those that measure it, whenever either was
    attached, so a scorer always sees the masked activation. Leaving a block removes its own hooks only, in any
    order; the model's previous experts implementation comes back when the last block closes.
    """
    modules = find_experts(model)
    unknown = set(hooks) - set(modules)
    if unknown:
        raise KeyError(f"no routed experts module named {sorted(unknown)}")
    switch = hasattr(model, "get_experts_implementation")
    if switch:
        previous = model.__dict__.get(_PREVIOUS) or [model.get_experts_implementation(), 0]
        model.set_experts_implementation(IMPLEMENTATION)  # may refuse (transformers): nothing changed yet
        previous[1] += 1
        model.__dict__[_PREVIOUS] = previous
    for name, hook in hooks.items():
        stack = modules[name].__dict__.setdefault(HOOKS_ATTR, [])
        edits = sum(getattr(h, "edits_model", False) for h in stack)  # edits stay ahead of measurements
        stack.insert(edits if getattr(hook, "edits_model", False) else len(stack), hook)
    try:
        yield
    finally:
        for name, hook in hooks.items():
            stack = attached_hooks(modules[name])
            for i in range(len(stack) - 1, -1, -1):
                if stack[i] is hook:
                    del stack[i]
                    break
            if not stack:
                modules[name].__dict__.pop(HOOKS_ATTR, None)
        if switch:
            previous = model.__dict__[_PREVIOUS]
            previous[1] -= 1
            if previous[1] == 0:
                model.__dict__.pop(_PREVIOUS)
                if model.get_experts_implementation().get("") == IMPLEMENTATION:  # unless another was chosen meanwhile
                    model.set_experts_implementation(previous[0])


def has_hooks(model: nn.Module) -> bool:
    """Are fmoe hooks attached to any routed experts module (inside `fmoe.masked` or a scoring pass)?"""
    return any(attached_hooks(m) for m in find_experts(model).values())


def ensure_aligned_implementation(model: nn.Module) -> None:
    """grouped_mm needs 16-byte-aligned strides; fall back to batched_mm when a pruned width breaks that."""
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return
    for module in find_experts(model).values():
        if isinstance(module, RaggedExperts):
            continue
        itemsize = module.down_proj.element_size()
        if (expert_widths(module)[0] * itemsize) % 16:
            warnings.warn(
                f"expert width {expert_widths(module)[0]} is not 16-byte aligned for grouped_mm; "
                "using experts_implementation='batched_mm' (round widths with multiple_of to keep grouped_mm)",
                stacklevel=3,
            )
            model.set_experts_implementation("batched_mm")
            return


class DimMask:
    """A hook that zeroes the dims outside a plan: h * mask[e], mask[e] a [I_e] 0/1 vector per expert."""

    edits_model = True  # runs before measuring hooks (see fmoe.model.hooks.experts_hooks)

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
