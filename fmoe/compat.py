"""Everything that depends on transformers' internals lives here (one place to update per transformers release).

- experts implementations: fmoe registers its own ("fmoe") in `ALL_EXPERTS_FUNCTIONS` so that scoring and masking
  see the intermediate activation, which module hooks cannot reach;
- the family table: which config field holds the routed expert width, and which families size their shared
  experts from that same field (so a routed-only prune cannot be described by the stock config);
- grouped_mm's 16-byte stride requirement.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .experts import IntermediateHook, RaggedExperts, expert_widths, experts_forward, find_experts

IMPLEMENTATION = "fmoe"

# model_type: (config field of the routed expert width, shared experts sized from that field)
FAMILIES: dict[str, tuple[str, bool]] = {
    "qwen2_moe": ("moe_intermediate_size", False),
    "qwen3_moe": ("moe_intermediate_size", False),
    "mixtral": ("intermediate_size", False),
    "olmoe": ("intermediate_size", False),
    "phimoe": ("intermediate_size", False),
    "gpt_oss": ("intermediate_size", False),
    "granitemoe": ("intermediate_size", False),
    "deepseek_v2": ("moe_intermediate_size", True),
    "deepseek_v3": ("moe_intermediate_size", True),
    "glm4_moe": ("moe_intermediate_size", True),
    "ernie4_5_moe": ("moe_intermediate_size", True),
}


def _fmoe_experts(self, hidden_states, top_k_index, top_k_weights):
    return experts_forward(self, hidden_states, top_k_index, top_k_weights, getattr(self, "_fmoe_hook", None))


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _fmoe_experts)


def width_field(model_type: str) -> str | None:
    """Config field that stock loaders read as the routed width, if a uniform prune may rewrite it."""
    field, shared_tied = FAMILIES.get(model_type, (None, True))
    return None if shared_tied else field


@contextmanager
def experts_hooks(model: nn.Module, hooks: dict[str, IntermediateHook]) -> Iterator[None]:
    """Run `model` with fmoe's experts forward, calling hooks[name] on each expert's intermediate activation."""
    modules = find_experts(model)
    unknown = set(hooks) - set(modules)
    if unknown:
        raise KeyError(f"no routed experts module named {sorted(unknown)}")
    previous = model.get_experts_implementation() if hasattr(model, "get_experts_implementation") else None
    if previous is not None:
        model.set_experts_implementation(IMPLEMENTATION)
    for name, hook in hooks.items():
        modules[name]._fmoe_hook = hook
    try:
        yield
    finally:
        for name in hooks:
            modules[name].__dict__.pop("_fmoe_hook", None)
        if previous is not None:
            model.set_experts_implementation(previous)


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


def is_stock_loadable(model: nn.Module) -> bool:
    """True when the stock config describes every experts module (uniform widths in a rewritable field)."""
    field = width_field(model.config.model_type)
    if field is None:
        return False
    for module in find_experts(model).values():
        if isinstance(module, RaggedExperts) or set(expert_widths(module)) != {getattr(model.config, field)}:
            return False
    return True

