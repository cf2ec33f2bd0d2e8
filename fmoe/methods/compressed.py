"""Compressed Experts (He et al. 2025): each token computes only its `main` highest-weight experts; the others
(auxiliary) are replaced by trained vectors that rescale the main experts' inputs and activation.

Every expert e owns c1_e, c3_e in R^H and c2_e in R^I (`compress_gate`, `compress_up`, `compress_act`; ones at
init). For a token whose top-k experts, sorted by routing weight, split into main experts M and auxiliary ones A,

    c̄ = Σ_{a∈A} (w_a / Σ_A w) c_a                     (each of c1, c3, c2)
    y = Σ_{i∈M} α_i · down_i(act(gate_i(x ⊙ c̄1)) ⊙ up_i(x ⊙ c̄3) ⊙ c̄2)   (+ the family's biases)
    α_i = w_i · Σ_{M∪A} w / Σ_M w

α keeps the token's top-k weight sum (so `norm_topk_prob`, DeepSeek's routed_scaling_factor and unnormalised
routers keep their output scale); with main == k it is the routing weight itself. The module holds the stock
module's expert Parameters under their stock names, so `find_experts`, fmoe's hooks and peft's
`target_parameters` treat it as the routed experts; active parameters fall by (k - main) experts per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import nn

from ..io import read_json, write_json
from ..model.compat import own_config
from ..model.experts import RaggedExperts
from ..model.hooks import has_hooks
from ..model.layers import moe_layers
from ..model.structure import COMPRESSED_FIELD, CompressedExperts, compress_layers
from .registry import Method, register


def compress_experts(model: nn.Module, main: int | None = None) -> nn.Module:
    """Make every MoE layer of `model` compute `main` experts per token (default max(1, top_k // 2)), the others
    replaced by trainable vectors (ones: train them, with or without LoRA, see fmoe.lightning.recovery). In place;
    returns the model. Records COMPRESSED_FIELD in the config, so fmoe.save_pretrained / from_pretrained keep it."""
    if has_hooks(model):
        raise RuntimeError("cannot compress a model while fmoe hooks are attached (inside fmoe.masked or a scoring "
                           "pass); compress after the block ends")
    modules = {name: model.get_submodule(name) for name in moe_layers(model)}
    if getattr(model.config, COMPRESSED_FIELD, None) or any(isinstance(m, CompressedExperts) for m in modules.values()):
        raise ValueError("the model's experts are compressed already")
    ragged = [name for name, m in modules.items() if isinstance(m, RaggedExperts)]
    if ragged:
        raise ValueError(f"cannot compress experts of different widths ({ragged[0]} is RaggedExperts): prune "
                         "dims uniformly (expert scope), then compress")
    main = compress_layers(model, main)
    setattr(own_config(model), COMPRESSED_FIELD, {"main": main})
    return model


@dataclass
class CompressionPlan:
    """Compressed experts: each token computes its `main` highest-weight experts; the others act through trained
    vectors (fmoe.methods.compressed)."""
    main: int
    meta: dict = field(default_factory=dict)
    FORMAT: ClassVar[str] = "fmoe.CompressionPlan/1"

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "main": self.main, "meta": self.meta}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        return cls.from_dict(read_json(path, cls.FORMAT, "fmoe compression plan"))

    @classmethod
    def from_dict(cls, data: dict) -> CompressionPlan:
        return cls(main=data["main"], meta=data["meta"])


def _compressed(model, calibration, amount=0.5, main=None):

    top_k = max(model.get_submodule(layer.router).top_k for layer in moe_layers(model).values())
    main = main if main is not None else max(1, top_k - math.ceil(top_k * amount - 1e-9))  # at least `amount` off
    if not 1 <= main <= top_k:
        raise ValueError(f"compressed experts compute 1 to top_k={top_k} main experts per token, got main={main}")
    return CompressionPlan(main, {"top_k": top_k, "achieved": 1 - main / top_k})


register("compressed_experts", Method(_compressed, lambda model, plan: compress_experts(model, plan.main), CompressionPlan,
                                      "", "compute the top experts per token; the others act through trained vectors"))
