"""Serve fmoe's exports in vLLM: ragged expert widths, per-layer expert counts and removed MoE sublayers.

A vLLM general plugin (entry point `vllm.general_plugins`). fmoe writes an export that stock vLLM cannot build
(fused layout, with `fmoe_expert_widths`, `fmoe_expert_counts` or `fmoe_dropped_moe` in its config) under the
architecture name "Fmoe" + the stock name, so stock vLLM refuses it by name instead of serving wrong weights; this
plugin registers those names as subclasses of vLLM's own model classes. Everything but the MoE layer and the
expert weight mapping is vLLM's: attention, KV cache, sampler, the router of the model's own family (softmax or
sigmoid, groups, correction bias, renormalisation), the fused-MoE kernels and weight loaders.

- Expert counts: each decoder layer is built with its own routed-expert count (the config field the family reads
  is set for the length of that layer's construction), so gate, correction bias and fused-MoE layer are sized to it.
- Widths: a layer whose experts share one width is vLLM's stock fused-MoE layer at that width. A layer with several
  widths is a `RaggedMoE`: the family's router over all experts, then one vLLM fused-MoE layer per width bucket (the
  experts of one width, exactly fmoe's `width_buckets`) run on the (token, expert) pairs routed to it.
- Removed MoE sublayers return zeros, as `fmoe`'s DroppedMoE does.

It imports only vLLM, torch and the standard library: it runs inside vLLM's environment, whose transformers and
torch pins are not fmoe's. Limits (each refused at load with the reason): compressed experts, ragged layers under
tensor/data/expert parallelism or EPLB, families outside FAMILIES, unknown `fmoe_*` config fields.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

FORMAT_FIELD = "fmoe_format"
WIDTHS_FIELD = "fmoe_expert_widths"
EXPERT_COUNTS_FIELD = "fmoe_expert_counts"
DROPPED_MOE_FIELD = "fmoe_dropped_moe"
SERVED_FIELDS = {FORMAT_FIELD, WIDTHS_FIELD, EXPERT_COUNTS_FIELD, DROPPED_MOE_FIELD}
ARCH_PREFIX = "Fmoe"

# stock architecture: (vLLM module, config field holding the routed-expert count, {checkpoint -> vLLM name part})
FAMILIES = {
    "OlmoeForCausalLM": ("vllm.model_executor.models.olmoe", "num_experts", {}),
    "Qwen2MoeForCausalLM": ("vllm.model_executor.models.qwen2_moe", "num_experts", {}),
    "Qwen3MoeForCausalLM": ("vllm.model_executor.models.qwen3_moe", "num_experts", {}),
    "MixtralForCausalLM": ("vllm.model_executor.models.mixtral", "num_local_experts",
                           {".mlp.gate.": ".block_sparse_moe.gate.", ".mlp.experts.": ".block_sparse_moe.experts."}),
    "DeepseekV2ForCausalLM": ("vllm.model_executor.models.deepseek_v2", "n_routed_experts", {}),
    "DeepseekV3ForCausalLM": ("vllm.model_executor.models.deepseek_v2", "n_routed_experts", {}),
}
LAYER_INDEX = re.compile(r"layers\.(\d+)\.")
# fused expert tensors of an fmoe export: uniform `experts.gate_up_proj`, ragged `experts.buckets.{b}.down_proj`
EXPERT_TENSOR = re.compile(
    r"^(?P<module>.*\.experts)(?:\.buckets\.(?P<bucket>\d+))?\.(?P<kind>gate_up_proj|down_proj)$")


def register() -> None:
    """vLLM plugin entry point: make the Fmoe* architectures known (lazily: nothing is imported until used)."""
    from vllm import ModelRegistry

    for arch in FAMILIES:
        ModelRegistry.register_model(ARCH_PREFIX + arch, f"fmoe_vllm:{ARCH_PREFIX}{arch}")


def width_buckets(widths: list[int]) -> list[tuple[int, list[int]]]:
    """Experts grouped by width, [(width, [expert ids ascending])] by ascending width: fmoe's bucket layout."""
    by_width: dict[int, list[int]] = {}
    for e, w in enumerate(widths):
        by_width.setdefault(int(w), []).append(e)
    return sorted(by_width.items())


def layer_index(name: str) -> int:
    found = LAYER_INDEX.search(name + ".")
    if found is None:
        raise ValueError(f"fmoe_vllm: cannot tell the decoder layer of {name!r}")
    return int(found.group(1))


class Structure:
    """What an fmoe export's config says about each decoder layer: widths, expert count, removed MoE sublayer."""

    def __init__(self, config):
        unknown = sorted(k for k in vars(config) if k.startswith("fmoe_") and k not in SERVED_FIELDS)
        if unknown:
            why = " (compressed experts are not served by vLLM yet)" if "fmoe_compressed" in unknown else ""
            raise NotImplementedError(f"fmoe_vllm cannot serve config fields {unknown}{why}; it serves "
                                      f"{sorted(SERVED_FIELDS)}")
        widths = getattr(config, WIDTHS_FIELD, None) or {}
        self.widths = {layer_index(k): [int(w) for w in v] for k, v in widths.items()}
        self.counts = {layer_index(k): int(v) for k, v in (getattr(config, EXPERT_COUNTS_FIELD, None) or {}).items()}
        self.dropped = sorted(int(i) for i in getattr(config, DROPPED_MOE_FIELD, None) or [])
        for i, widths in self.widths.items():
            if i in self.counts and self.counts[i] != len(widths):
                raise ValueError(f"fmoe_vllm: layer {i} lists {len(widths)} expert widths but "
                                 f"{EXPERT_COUNTS_FIELD} says {self.counts[i]} experts")


# ---- the MoE layer of several widths ----------------------------------------------------------------------------

_RAGGED: dict[str, "RaggedMoE"] = {}  # custom-op key -> layer (the op is opaque to torch.compile)


def _ragged_op(hidden_states: torch.Tensor, router_logits: torch.Tensor, key: str) -> torch.Tensor:
    return _RAGGED[key].compute(hidden_states, router_logits)


def _ragged_op_fake(hidden_states: torch.Tensor, router_logits: torch.Tensor, key: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def _register_op() -> None:
    if not hasattr(torch.ops.vllm, "fmoe_ragged_moe"):
        from vllm.utils.torch_utils import direct_register_custom_op

        direct_register_custom_op("fmoe_ragged_moe", _ragged_op, mutates_args=[], fake_impl=_ragged_op_fake)


# factory options a ragged layer cannot honour yet; each must be at its default (None/False/0/1.0)
_UNSUPPORTED = ("enable_eplb", "num_redundant_experts", "fuse_shared_experts", "zero_expert_type",
                "hash_indices_table", "routed_input_transform", "routed_output_transform",
                "apply_router_weight_on_input", "bias_vl", "runner_cls", "routed_experts_cls", "router")
# options that belong to routing or to the whole layer: the per-bucket fused-MoE layers get their defaults
_ROUTING = ("renormalize", "use_grouped_topk", "num_expert_group", "topk_group", "custom_routing_function",
            "scoring_func", "routed_scaling_factor", "e_score_correction_bias", "apply_routed_scale_to_output",
            "gate", "shared_experts", "shared_expert_gate", "n_shared_experts", "shared_expert_prefix",
            "router_logits_dtype")


class RaggedMoE(nn.Module):
    """vLLM's fused-MoE layer for experts of several widths: the family's router over all E experts, then one
    fused-MoE layer per width bucket on the (token, expert) pairs routed to that bucket, summed back per token."""

    def __init__(self, factory, options: dict, widths: list[int]):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.fused_moe.router.router_factory import create_fused_moe_router

        prefix = options["prefix"]
        bad = [k for k in _UNSUPPORTED if options.get(k) not in (None, False, 0)]
        tp = options.get("tp_size") or get_tensor_model_parallel_world_size()
        if bad or tp != 1 or (options.get("dp_size") or 1) != 1:
            raise NotImplementedError(f"fmoe_vllm: {prefix} has experts of several widths, which are served only "
                                      f"with tensor/data parallel size 1 and without {bad or _UNSUPPORTED[:3]}")
        self.num_experts = len(widths)
        scale = float(options.get("routed_scaling_factor") or 1.0)
        self.output_scale = scale if options.get("apply_routed_scale_to_output") else 1.0
        self.router = create_fused_moe_router(
            top_k=options["top_k"], global_num_experts=self.num_experts,
            renormalize=options.get("renormalize", True),
            use_grouped_topk=bool(options.get("use_grouped_topk")), num_expert_group=options.get("num_expert_group"),
            topk_group=options.get("topk_group"), scoring_func=options.get("scoring_func") or "softmax",
            routed_scaling_factor=1.0 if options.get("apply_routed_scale_to_output") else scale,
            e_score_correction_bias=options.get("e_score_correction_bias"),
            custom_routing_function=options.get("custom_routing_function"))
        self.gate = options.get("gate")  # families whose gate runs inside the fused-MoE layer (DeepSeek)
        self.shared_experts = options.get("shared_experts")
        bucket_of = torch.empty(self.num_experts, dtype=torch.long)
        local_of = torch.empty(self.num_experts, dtype=torch.long)
        self.buckets = nn.ModuleList()
        for b, (width, ids) in enumerate(width_buckets(widths)):
            bucket_of[ids] = b
            local_of[ids] = torch.arange(len(ids))
            rest = {k: v for k, v in options.items() if k not in _ROUTING}
            self.buckets.append(factory(**{**rest, "num_experts": len(ids), "intermediate_size": width,
                                           "renormalize": False, "prefix": f"{prefix}.buckets.{b}"}))
        self.register_buffer("bucket_of", bucket_of, persistent=False)  # [E] bucket of each expert
        self.register_buffer("local_of", local_of, persistent=False)  # [E] its index inside the bucket
        self.key = f"{prefix}@{id(self)}"  # unique while this layer lives, also with several engines in a process
        _RAGGED[self.key] = self
        _register_op()

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None, **_) -> torch.Tensor:
        logits = hidden_states if router_logits is None else router_logits
        return torch.ops.vllm.fmoe_ragged_moe(hidden_states, logits, self.key)

    def compute(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            router_logits, _ = self.gate(x)
        weights, ids = self.router.select_experts(hidden_states=x, router_logits=router_logits)  # [T, k] each
        flat = ids.reshape(-1).long()  # [T*k] expert of each (token, slot) pair
        order = torch.argsort(self.bucket_of[flat], stable=True)  # pairs grouped by bucket
        counts = torch.bincount(self.bucket_of[flat], minlength=len(self.buckets)).tolist()  # one host read
        rows = order // ids.shape[1]  # [T*k] the token of each pair, bucket by bucket
        xs, ws = x[rows], weights.reshape(-1, 1)[order]  # [T*k, H], [T*k, 1]
        local = self.local_of[flat[order]].unsqueeze(1).to(ids.dtype)  # [T*k, 1] expert inside its bucket
        ys, start = [], 0
        for layer, n in zip(self.buckets, counts):
            if n:
                experts = layer.routed_experts
                experts._ensure_moe_quant_config_init()
                ys.append(experts.forward_modular(x=xs[start:start + n], topk_weights=ws[start:start + n],
                                                  topk_ids=local[start:start + n]))
            start += n
        out = torch.zeros_like(x)  # [T, H]
        if ys:  # (no tokens: nothing routed)
            out.index_add_(0, rows, torch.cat(ys).to(x.dtype))
        if self.output_scale != 1.0:
            out = out * self.output_scale
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class ZeroMoE(nn.Module):
    """A removed MoE sublayer: zeros shaped like its input, so the decoder layer adds nothing to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


# ---- building the model -------------------------------------------------------------------------------------------

def _load_experts(module: nn.Module, tensor: torch.Tensor, kind: str, bucket: int | None) -> list[nn.Parameter]:
    """Fill a fused-MoE layer (or a RaggedMoE bucket) from an fmoe fused tensor ([G, 2I, H] gate then up, or
    [G, H, I]) expert by expert through vLLM's own weight loader (sharding, padding, quantised layouts)."""
    if isinstance(module, RaggedMoE):
        if bucket is None or bucket >= len(module.buckets):
            raise ValueError(f"fmoe_vllm: checkpoint bucket {bucket} does not match the widths in the config")
        module = module.buckets[bucket]
    elif bucket is not None:
        raise ValueError("fmoe_vllm: a bucketed expert tensor for a layer whose experts share one width")
    experts = module.routed_experts
    if tensor.shape[0] != experts.global_num_experts:
        raise ValueError(f"fmoe_vllm: {tensor.shape[0]} experts in the checkpoint, {experts.global_num_experts} "
                         "in the layer built from the config")
    if kind == "gate_up_proj":
        param, width = experts.w13_weight, tensor.shape[1] // 2
        for e in range(tensor.shape[0]):
            experts.weight_loader(param, tensor[e, :width], "w13_weight", shard_id="w1", expert_id=e)
            experts.weight_loader(param, tensor[e, width:], "w13_weight", shard_id="w3", expert_id=e)
    else:
        param = experts.w2_weight
        for e in range(tensor.shape[0]):
            experts.weight_loader(param, tensor[e], "w2_weight", shard_id="w2", expert_id=e)
    return [param]


def structure_of(model: nn.Module) -> Structure:
    return model.fmoe_structure


def served_class(arch: str) -> type:
    """The vLLM model class for "Fmoe" + `arch`: vLLM's own class, built layer by layer to the export's structure."""
    module_name, count_field, renames = FAMILIES[arch]
    module = importlib.import_module(module_name)
    stock = getattr(module, arch)

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        config = vllm_config.model_config.hf_config
        structure = Structure(config)
        real_factory, real_make_layers = module.FusedMoEFactory, module.make_layers

        def factory(*args, **options):
            if args:
                raise TypeError("fmoe_vllm expects FusedMoEFactory to be called with keywords")
            widths = structure.widths.get(layer_index(options["prefix"]))
            if widths is None:
                return real_factory(**options)
            if len(set(widths)) == 1:
                return real_factory(**{**options, "intermediate_size": widths[0]})
            return RaggedMoE(real_factory, options, widths)

        def make_layers(num_layers, layer_fn, prefix, *a, **kw):
            def build(prefix: str):
                i = layer_index(prefix + ".")
                count = structure.counts.get(i, len(structure.widths.get(i, [])) or None)
                saved = getattr(config, count_field)
                if count is not None:
                    setattr(config, count_field, count)
                try:
                    return layer_fn(prefix=prefix)
                finally:
                    setattr(config, count_field, saved)
            return real_make_layers(num_layers, build, prefix, *a, **kw)

        module.FusedMoEFactory, module.make_layers = factory, make_layers
        try:
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix, **kwargs)
        finally:
            module.FusedMoEFactory, module.make_layers = real_factory, real_make_layers
        for i in structure.dropped:
            layer = self.model.layers[i]
            names = [n for n, child in layer.named_children() if hasattr(child, "experts")]
            if len(names) != 1:
                raise ValueError(f"fmoe_vllm: cannot find the MoE sublayer of decoder layer {i} to remove")
            setattr(layer, names[0], ZeroMoE())
        self.fmoe_structure = structure

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
        loaded: set[str] = set()

        def rename(name: str) -> str:
            for old, new in renames.items():
                name = name.replace(old, new)
            return name

        def rest(items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                name = rename(name)
                found = EXPERT_TENSOR.match(name)
                if found is None:
                    yield name, tensor
                    continue
                bucket = found.group("bucket")
                target = self.get_submodule(found.group("module"))
                for p in _load_experts(target, tensor, found.group("kind"), None if bucket is None else int(bucket)):
                    loaded.add(names[id(p)])

        loaded |= set(stock.load_weights(self, rest(weights)))
        for i in structure_of(self).dropped:  # the norm before a removed MoE sublayer feeds nothing: any value
            name = f"model.layers.{i}.post_attention_layernorm.weight"
            if name not in loaded and name in names.values():
                self.get_parameter(name).data.fill_(1.0)
                loaded.add(name)
        return loaded

    return type(ARCH_PREFIX + arch, (stock,), {"__init__": __init__, "load_weights": load_weights,
                                               "__module__": __name__})


def __getattr__(name: str) -> type:
    arch = name[len(ARCH_PREFIX):] if name.startswith(ARCH_PREFIX) else None
    if arch not in FAMILIES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; it serves "
                             f"{', '.join(ARCH_PREFIX + a for a in FAMILIES)}")
    cls = served_class(arch)
    globals()[name] = cls
    return cls
