"""Everything that depends on transformers' internals lives here (one place to update per transformers release).

- experts implementations: fmoe registers its own ("fmoe") in `ALL_EXPERTS_FUNCTIONS` so that scoring and masking
  see the intermediate activation, which module hooks cannot reach;
- the family table: which config field holds the routed expert width, and which families size their shared
  experts from that same field (so a routed-only prune cannot be described by the stock config);
- grouped_mm's 16-byte stride requirement and its device support (`grouped_linear` falls back to transformers'
  per-group loop);
- devices without float64 (`accumulation_dtype`: the dtype every calibration sum accumulates in);
- the load-balancing loss of `output_router_logits=True`, which assumes one expert count in every layer
  (`support_uneven_expert_counts`).
"""

from __future__ import annotations

import copy
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

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


# MoE structure beyond the experts: every family's MoE block holds its router as `gate` or `router` (a module with
# `weight` [E, H], `top_k`, `num_experts`, optionally `bias` [E] and `e_score_correction_bias` [E] or, ERNIE,
# `moe_statics.e_score_correction_bias` [1, E]) and returns (logits [T, E], top-k weights, top-k ids); the decoder
# layer runs `residual + m * block(post_attention_layernorm(residual))`, m = `residual_scale(config)`.
ROUTER_NAMES = ("gate", "router")
MOE_BLOCK_NAMES = ("mlp", "block_sparse_moe")
POST_ATTENTION_NORM = "post_attention_layernorm"
SIGMOID_ROUTERS = ("deepseek_v3", "glm4_moe")  # score experts by sigmoid(logits); the others by softmax
TOP2_GROUP_ROUTERS = ("deepseek_v3", "glm4_moe")  # rank expert groups by the sum of their best two experts
TWO_PICK_ROUTERS = ("phimoe",)  # sparsemixer always picks two experts, whatever top_k says
TUPLE_BLOCKS = ("gpt_oss",)  # MoE blocks returning (hidden states, router scores); the others return a tensor
# families whose decoder layer scales a sublayer's output before the residual add: {model_type: config field}
RESIDUAL_SCALES = {"granitemoe": "residual_multiplier"}  # residual + m * block(norm(residual))
# config fields holding the routed expert count (aliases of each other where a family has several)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def router_groups(router: nn.Module) -> tuple[int, int] | None:
    """(n_group, topk_group) of a group-limited router (tokens first pick groups, then experts within them), else
    None: DeepSeek-V3/GLM-4-MoE with n_group > 1, DeepSeek-V2 with topk_method="group_limited_greedy"."""
    n_group = getattr(router, "num_group", None) or 1
    if n_group <= 1 or getattr(router, "topk_method", "group_limited_greedy") != "group_limited_greedy":
        return None
    return int(n_group), int(router.topk_group)


def residual_scale(config) -> float:
    """m of the decoder layer's `residual + m * block(norm(residual))`: 1 except where the family scales it."""
    key = RESIDUAL_SCALES.get(getattr(config, "model_type", None))
    return 1.0 if key is None else float(getattr(config, key))


def select_rows(module: nn.Module, key: str, index: torch.Tensor, dim: int = 0) -> None:
    """A parameter or buffer `key` of `module` (if it has one) cut to `index` along `dim`, in place."""
    for store in (module._parameters, module._buffers):
        t = store.get(key)
        if t is not None:
            cut = t.index_select(dim, index.to(t.device))
            store[key] = nn.Parameter(cut, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cut


def cut_router(router: nn.Module, index: torch.Tensor) -> None:
    """A router cut to experts `index`: its weight rows [E, H] and, where the family has them, bias [E] (gpt-oss),
    `e_score_correction_bias` [E] (DeepSeek-V3, GLM-4-MoE: a buffer) or `moe_statics.e_score_correction_bias`
    [1, E] (ERNIE), and the `out_features` of an nn.Linear router (Phi-MoE)."""
    for key in ("weight", "bias", "e_score_correction_bias"):
        select_rows(router, key, index)
    statics = getattr(router, "moe_statics", None)
    if statics is not None:
        select_rows(statics, "e_score_correction_bias", index, dim=1)
    if isinstance(router, nn.Linear):
        router.out_features = len(index)


def family_class(module: nn.Module, name: str) -> type:
    """Class `name` of the transformers modeling module `module` comes from (e.g. a family's stock experts class)."""
    import sys

    return getattr(sys.modules[type(module).__module__], name)


def router_probabilities(model_type: str, logits: torch.Tensor, top_weights: torch.Tensor,
                         top_ids: torch.Tensor) -> torch.Tensor:
    """[T, E] routing probabilities for Expert Drop's score: the router's own softmax over all experts; for sigmoid
    routers (DeepSeek-V3, GLM-4-MoE), whose scores are not a distribution, the top-k weights the model applies
    scattered into zeros (as the unified MoE compression code does for DeepSeek)."""
    if model_type in SIGMOID_ROUTERS:
        ids = top_ids.reshape(logits.shape[0], -1)
        real = ids < logits.shape[-1]  # expert-parallel sentinels route nowhere
        weights = top_weights.reshape(ids.shape).float().where(real, 0.0)
        return logits.new_zeros(logits.shape, dtype=torch.float32).scatter_add_(1, ids.clamp(max=logits.shape[-1] - 1),
                                                                               weights)
    return logits.float().softmax(-1)


# transformers' Switch-style load-balancing loss (each family's `load_balancing_loss_func`, which the causal LM
# calls with its router logits, `num_experts` and `num_experts_per_tok` when `output_router_logits` is on) pools all
# layers' selections and probabilities into one vector of num_experts: layers of different expert counts do not fit.
LOAD_BALANCING_LOSS = "load_balancing_loss_func"


def load_balancing_loss(gate_logits: tuple[torch.Tensor, ...], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' pooled load-balancing loss for layers of different expert counts: E x sum_e f_e P_e over
    E = the largest count, f_e and P_e the share of top-k selections and the mean routing probability of expert e
    over every layer's real tokens. A layer of E_l < E experts counts as E experts of which the last E - E_l have
    zero probability and are never selected (router logits [T, E_l] padded with -inf), and it selects
    min(top_k, E_l), as its router does; with equal counts this is the stock loss."""
    width, device = max(g.shape[-1] for g in gate_logits), gate_logits[0].device
    selected = torch.zeros(width, dtype=torch.float32, device=device)  # [E]: selections per expert
    probability = torch.zeros(width, dtype=torch.float32, device=device)  # [E]: summed routing probability
    rows = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)  # [T]
    for logits in gate_logits:
        probs = logits.to(device).softmax(-1)  # [T, E_l]
        k = min(top_k, probs.shape[-1])
        weight = torch.ones(probs.shape[0], device=device) if mask is None else mask  # [T]
        ids = probs.topk(k, dim=-1).indices.reshape(-1)  # [T * k]
        selected = selected.scatter_add(0, ids, weight.repeat_interleave(k))
        probability = probability + F.pad((probs.float() * weight[:, None]).sum(0), (0, width - probs.shape[-1]))
        rows = rows + weight.sum()
    return width * torch.sum((selected / rows) * (probability / rows))


def _pooled_loss(stock):
    """The family's stock loss where every layer has num_experts experts, `load_balancing_loss` elsewhere."""

    @functools.wraps(stock)  # inspect.unwrap gives the stock function back
    def pooled(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        if isinstance(gate_logits, tuple) and gate_logits and any(g.shape[-1] != num_experts for g in gate_logits):
            return load_balancing_loss(gate_logits, top_k, attention_mask)
        return stock(gate_logits, num_experts, top_k, attention_mask)

    pooled.fmoe_uneven = True
    return pooled


def support_uneven_expert_counts(model: nn.Module) -> None:
    """Let `output_router_logits=True` (aux_loss, and `.loss` + router_aux_loss_coef x aux_loss with labels) run on
    a model whose layers keep different expert counts: the transformers modules defining the model's classes get
    `load_balancing_loss`, which hands models of one count everywhere to their stock function unchanged."""
    for name in {type(m).__module__ for m in model.modules()}:
        module = sys.modules.get(name)
        stock = getattr(module, LOAD_BALANCING_LOSS, None)
        if callable(stock) and not getattr(stock, "fmoe_uneven", False):
            setattr(module, LOAD_BALANCING_LOSS, _pooled_loss(stock))


def register_experts_implementation(name: str, forward) -> None:
    """Make `forward(experts_module, hidden_states, top_k_index, top_k_weights)` selectable as
    `model.set_experts_implementation(name)` (transformers' registry of experts implementations)."""
    ALL_EXPERTS_FUNCTIONS.register(name, forward)


_GROUPED_MM = getattr(F, "grouped_mm", None) or torch._grouped_mm  # public from torch 2.10
NO_FLOAT64_DEVICES = ("mps",)  # Apple GPUs have no float64
# torch documents grouped_mm on CUDA for SM80+ and transformers (integrations/moe.py) refuses it below: T4, V100 loop
GROUPED_MM_CUDA_CAPABILITY = (8, 0)
_CUDA_CAPABILITY: dict[int, tuple[int, int]] = {}  # per CUDA device index, read once


def accumulation_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of sums over a calibration set on `device` (scores, statistics, Gram sums, counts): float64, or
    float32 on a device without float64 (MPS), which would fail at the first float64 tensor."""
    return torch.float32 if torch.device(device).type in NO_FLOAT64_DEVICES else torch.float64


@torch.compiler.assume_constant_result
def cuda_capability(index: int) -> tuple[int, int]:
    """Compute capability of CUDA device `index`, cached (a constant under torch.compile)."""
    if index not in _CUDA_CAPABILITY:
        _CUDA_CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CUDA_CAPABILITY[index]


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Can grouped_mm run on `device` in `dtype`? Not on CUDA below compute capability 8.0, and under torch.compile
    in bf16 only (its compiled form takes bf16 only); transformers decides the same for its own grouped_mm."""
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return cuda_capability(index) >= GROUPED_MM_CUDA_CAPABILITY
    return True


def _aligned(t: torch.Tensor, matrix_dims: int) -> bool:
    """grouped_mm's requirement: base pointer, strides and the last `matrix_dims` sizes 16-byte aligned (under
    torch.compile there is no pointer to read; inductor copies misaligned inputs itself)."""
    size = t.element_size()
    pointer = torch.compiler.is_compiling() or t.data_ptr() % 16 == 0
    return (pointer and all((n * size) % 16 == 0 for n in t.shape[-matrix_dims:])
            and all((stride * size) % 16 == 0 for stride, n in zip(t.stride(), t.shape) if stride != 1 and n > 1))


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None,
                   transposed: bool) -> torch.Tensor:
    """x [S, in] through per-group weights (stock layout: [G, in, out] if `transposed` else [G, out, in]); rows
    offsets[g-1]:offsets[g] use group g. One grouped_mm call; transformers' per-group mm loop where the device
    cannot run grouped_mm (`grouped_mm_supported`) or the strides do not fit it (widths that are not multiples of
    16 bytes)."""
    w = weight if transposed else weight.transpose(-2, -1)  # [G, in, out]
    x = x.to(w.dtype)
    if grouped_mm_supported(w.device, w.dtype) and _aligned(x, 1) and _aligned(w, 2):
        out = _GROUPED_MM(x, w, offs=offsets)
    else:
        out = torch.ops.transformers.grouped_mm_fallback(x, w, offs=offsets)  # per-group mm: any strides, no copy
    return out if bias is None else out + bias


def peft_adapts_experts(module: nn.Module) -> bool:
    """Can peft's `target_parameters` adapt this module's fused expert tensors? peft 0.21 treats a 3D parameter of
    one expert as a 2D Linear weight, which only fits the untransposed layout (a width bucket holding one expert)."""
    return not (module.is_transposed and module.down_proj.shape[0] == 1)


def width_field(model_type: str) -> str | None:
    """Config field that stock loaders read as the routed width, if a uniform prune may rewrite it."""
    field, shared_tied = FAMILIES.get(model_type, (None, True))
    return None if shared_tied else field


def own_config(model: nn.Module):
    """Give `model` a config object of its own before an edit rewrites it: transformers' `from_config` hands the
    caller's config to the model and every submodule that keeps one, so an edit in place would also change the
    caller's object (and every model built from it later). Returns the model's (now private) config."""
    shared = model.config
    if getattr(model, "_fmoe_own_config", None) is shared:  # copied by an earlier edit
        return shared
    config = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = config
    model._fmoe_own_config = config
    return config
