"""Tiny random-weight configs of every supported transformers MoE family (tests, benchmarks, CPU demos)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

FAMILIES = (
    "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3",
    "phimoe", "gpt_oss", "granitemoe", "glm4_moe", "ernie4_5_moe",
)

# Applied only where the family's config has the field: one table instead of per-family code.
_TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
    max_position_embeddings=256, vocab_size=128,
    intermediate_size=32, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, moe_num_shared_experts=1, first_k_dense_replace=0, moe_layer_start_index=0,
    n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, qk_head_dim=32,
    layer_types=None, sliding_window=64, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def tiny_config(family: str, **overrides):
    """A 2-layer, 64-wide config of `family` with 4 routed experts of width 32 (top-2)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(FAMILIES)}")
    base = AutoConfig.for_model(family)
    alias = getattr(base, "attribute_map", {})  # e.g. num_local_experts -> num_experts: an override wins
    overridden = {alias.get(k, k) for k in overrides}
    tiny = {k: v for k, v in _TINY.items() if hasattr(base, k) and alias.get(k, k) not in overridden}
    fields = {**tiny, **overrides}
    if fields.get("layer_types", 0) is None:
        fields.pop("layer_types")
    return AutoConfig.for_model(family, **fields)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves some families' routers at zero (ties); spread them so routing is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and p.abs().sum() == 0 and "norm" not in name:
                p.normal_(0, 0.5 if p.dim() > 1 else 0.02)  # biases stay small: routing by tokens
    return model.eval()
