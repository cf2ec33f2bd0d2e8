"""What recovery trains: peft LoRA adapters on a pruned MoE (attention, shared experts, dense MLPs, and per expert
on the fused tensors of routed experts, width buckets included), the trained vectors of compressed experts, or the
routed experts' own weights. fmoe.lightning.recovery.LoRARecovery trains the result."""

from __future__ import annotations

import warnings

from torch import nn

from ..model.compat import peft_adapts_experts
from ..model.experts import find_experts, fused_parts, up_name
from ..model.structure import VECTORS

_NOT_ADAPTED = ("lm_head", "gate", "router", "shared_expert_gate")  # output head and routers keep their weights


def lora_config(model: nn.Module, r: int = 16, alpha: int = 32, experts: bool = True):
    """LoRA on every Linear except the head and routers (attention, shared experts, dense MLPs), plus per-expert
    adapters on the fused tensors of routed experts via `target_parameters` (peft needs lora_dropout=0 there)."""
    from peft import LoraConfig

    routed = find_experts(model)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
               and name.rsplit(".", 1)[-1] not in _NOT_ADAPTED
               and (experts or not any(name.startswith(f"{r}.") for r in routed))]
    holders = {".".join(filter(None, (name, part))): holder for name, m in routed.items() if experts
               for part, holder in fused_parts(m).items()}
    skipped = [name for name, holder in holders.items() if not peft_adapts_experts(holder)]
    if skipped:
        warnings.warn(f"LoRA leaves {len(skipped)} single-expert width buckets of transposed experts as they are "
                      f"(e.g. {skipped[0]}): peft adapts a 3D parameter holding one expert as a 2D one", stacklevel=2)
    params = [f"{name}.{p}" for name, holder in holders.items() if name not in skipped
              for p in (up_name(holder), "down_proj")]
    # exact module names: peft matches list entries as name suffixes
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=linears,
                      target_parameters=params or None)


def trainable(model: nn.Module, r: int = 16, alpha: int = 32, experts: bool = True, compressed: bool = True,
              tune_experts: bool = False) -> nn.Module:
    """`model` wrapped with LoRA adapters of rank `r` (none for r=0) and only what recovery trains left trainable:
    the adapters, the vectors of compressed experts (unless `compressed` is False) and, with `tune_experts`, the
    routed experts' weights themselves (no adapters on them then). Routers stay frozen."""
    from peft import get_peft_model

    vectors = [p for n, p in model.named_parameters() if compressed and n.rpartition(".")[2] in VECTORS]
    routed = [p for m in find_experts(model).values() for p in m.parameters()] if tune_experts else []
    if tune_experts and not routed:
        raise ValueError("tune_experts trains routed experts, and the model has none")
    if r == 0 and not vectors and not routed:
        raise ValueError("r=0 trains no adapters: it needs tune_experts=True or the vectors of compressed "
                         "experts (fmoe.methods.compressed.compress_experts makes them)")
    experts = experts and not tune_experts  # no adapters on weights that train themselves
    model = get_peft_model(model, lora_config(model, r, alpha, experts)) if r else model.requires_grad_(False)
    for p in (*vectors, *routed):  # peft froze every base parameter
        p.requires_grad_(True)
    return model
