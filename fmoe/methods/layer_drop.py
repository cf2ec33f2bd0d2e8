"""Layer Drop (remove whole MoE sublayers) and Block Drop (remove whole decoder layers): plans and physical edits.

Similarities come in as tensors, measured elsewhere on calibration data:
- `moe_similarity` [L]: per decoder layer cos(x', x' + m MoE(Norm(x'))), x' the residual entering the post-attention
  norm, m the layer's residual scale (GraniteMoE's residual_multiplier, else 1); NaN where the layer has no MoE;
  the most similar MoE sublayers change the residual least and go first.
- `block_similarity` [L+1, L+1]: S[i, j] = token-mean cos(h_i, h_j), h_i the input of decoder layer i (h_L the
  last layer's output); "discrete" drops the blocks with the highest S[l, l+1], "consecutive" the window l..l+n-1
  with the highest S[l, l+n].

A dropped MoE sublayer keeps its decoder layer: the norm in front becomes nn.Identity and the block (router, routed
and shared experts) a `DroppedMoE` adding zeros to the residual; `config.fmoe_dropped_moe` lists those layers so
`fmoe.from_pretrained` rebuilds them (`rebuild_dropped_moe`). A dropped block leaves the layer list; every
`layer_idx` (the KV cache's slot) is renumbered, and so are the config fields describing layers: the count,
`layer_types`, the family's dense/sparse layout, and fmoe's fields naming layers (`LAYER_FIELDS`). The new config is
computed and checked before the model changes, so a refused drop leaves model and config as they were.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import _aliases
from ..calibration.scores import ranked
from ..io import read_json, write_json
from ..model.compat import own_config
from ..model.experts import find_experts, fingerprint, on_meta, replace_module
from ..model.hooks import has_hooks
from ..model.layers import decoder_layers, moe_layers
from ..model.structure import DROPPED_MOE_FIELD, LAYER_FIELDS, remove_sublayers
from .registry import Method, check_choices, register

BLOCK_MODES = ("discrete", "consecutive")
LAYER_INDEX_ATTRS = ("layer_idx",)  # attributes holding a module's decoder layer index (the KV cache's slot)
MAX_BLOCK_CHOICES = 10_000  # discrete block sets tried, best ranked first, before a plan gives up


@dataclass
class DropPlan:
    """Decoder layers whose MoE sublayer goes (`moe_layers`) and decoder layers removed whole (`blocks`), both
    numbered as in the model planned for (`num_layers` decoder layers, experts `fingerprint`)."""

    moe_layers: list[int]
    blocks: list[int]
    num_layers: int
    fingerprint: str
    meta: dict = field(default_factory=dict)  # criterion, mode, count, ratio (the amount), achieved, params_removed
    FORMAT: ClassVar[str] = "fmoe.DropPlan/1"

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "fingerprint": self.fingerprint, "num_layers": self.num_layers,
                "meta": self.meta, "moe_layers": self.moe_layers, "blocks": self.blocks}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DropPlan:
        return cls.from_dict(read_json(path, cls.FORMAT, "fmoe drop plan"))

    @classmethod
    def from_dict(cls, data: dict) -> DropPlan:
        return cls(moe_layers=list(data["moe_layers"]), blocks=list(data["blocks"]), num_layers=data["num_layers"],
                   fingerprint=data["fingerprint"], meta=data["meta"])


# --- plans -------------------------------------------------------------------------------------------------------

def _params(modules: list[nn.Module]) -> int:
    """Parameters of these modules, each tensor once."""
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


def _shares(model: nn.Module, moe: list[int], blocks: list[int]) -> tuple[float, float]:
    """(share of routed expert parameters, share of all parameters) that dropping these MoE sublayers and blocks
    removes."""
    _, layers = decoder_layers(model)
    by_index = {m.index: m for m in moe_layers(model).values()}
    routed_total = _params(list(find_experts(model).values()))
    removed = [layers[i] for i in blocks]
    removed += [model.get_submodule(n) for i in moe if i not in blocks for n in (by_index[i].block, by_index[i].norm)]
    routed = [model.get_submodule(m.experts) for m in by_index.values() if m.index in set(moe) | set(blocks)]
    return _params(routed) / routed_total, _params(removed) / _params([model])


def _count_or_amount(count: int | None, amount: float | None, limit: int, what: str) -> None:
    if (count is None) == (amount is None):
        raise ValueError(f"give exactly one of count and amount (got count={count}, amount={amount})")
    if count is not None and not 0 <= count < limit:
        raise ValueError(f"count must be in [0, {limit}) (dropping all {limit} {what} leaves none), got {count}")
    if amount is not None and not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")


def _nearest(options: list[tuple[float, list[int]]], amount: float) -> list[int]:
    """The option whose achieved routed share is nearest `amount` (ties: the fewer layers dropped)."""
    return min(options, key=lambda o: (abs(o[0] - amount), len(o[1])))[1]


def _check_vector(similarity: torch.Tensor, n: int, name: str) -> torch.Tensor:
    similarity = torch.as_tensor(similarity).detach().cpu().double()
    if similarity.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one value per decoder layer), got {list(similarity.shape)}")
    return similarity


@_aliases.renamed(ratio="amount")
def plan_layer_drop(model: nn.Module, moe_similarity: torch.Tensor, count: int | None = None,
                    amount: float | None = None, model_fingerprint: str | None = None) -> DropPlan:
    """Drop the `count` MoE sublayers of highest `moe_similarity` [L] in one shot; with `amount` (share of routed
    expert parameters to remove) instead, the count whose achieved share is nearest it (meta says what was
    achieved)."""
    _, layers = decoder_layers(model)
    similarity = _check_vector(moe_similarity, len(layers), "moe_similarity")
    candidates = sorted(m.index for m in moe_layers(model).values())
    missing = [i for i in candidates if math.isnan(similarity[i])]
    if missing:
        raise ValueError(f"moe_similarity is NaN at MoE layers {missing}: every MoE layer needs a value to rank")
    _count_or_amount(count, amount, len(candidates), "MoE layers")
    order = [candidates[i] for i in ranked(similarity[candidates]).tolist()]
    if count is None:
        count = len(_nearest([(_shares(model, order[:n], [])[0], order[:n]) for n in range(len(order))], amount))
    chosen = sorted(order[:count])
    routed, params = _shares(model, chosen, [])
    meta = dict(criterion="moe_similarity", mode="layer", count=count if amount is None else None, ratio=amount,
                dropped=len(chosen), achieved=routed, params_removed=params)
    return DropPlan(chosen, [], len(layers), model_fingerprint or fingerprint(model), meta)


@_aliases.renamed(ratio="amount")
def plan_block_drop(model: nn.Module, block_similarity: torch.Tensor, count: int | None = None,
                    amount: float | None = None, mode: str = "discrete", model_fingerprint: str | None = None
                    ) -> DropPlan:
    """Drop `count` decoder layers: "discrete" the ones of highest S[l, l+1], "consecutive" the window l..l+n-1 of
    highest S[l, l+n] (block_similarity S [L+1, L+1]). With `amount` (share of routed expert parameters to
    remove) instead, the count whose achieved share is nearest it. A choice that removes every MoE layer, or whose
    MoE layout the family's config fields cannot express (`drop_blocks` would refuse it), gives way to the next
    best one."""
    if mode not in BLOCK_MODES:
        raise ValueError(f"unknown block drop mode {mode!r}; valid: {', '.join(BLOCK_MODES)}")
    prefix, layers = decoder_layers(model)
    n = len(layers)
    s = torch.as_tensor(block_similarity).detach().cpu().double()
    if s.shape != (n + 1, n + 1):
        raise ValueError(f"block_similarity must have shape [{n + 1}, {n + 1}] (inputs of {n} decoder layers and "
                         f"the last one's output), got {list(s.shape)}")
    _count_or_amount(count, amount, n, "decoder layers")
    moe = {m.index for m in moe_layers(model).values()}

    def acceptable(blocks: list[int]) -> bool:
        if not moe - set(blocks):
            return False
        try:
            _rewritten_config(model.config, prefix, n, [i for i in range(n) if i not in set(blocks)])
        except ValueError:
            return False
        return True

    def best(k: int) -> list[int] | None:
        """The best ranked acceptable choice of k blocks (None: there is none)."""
        if k == 0:
            return []
        if mode == "discrete":
            values = torch.stack([s[l, l + 1] for l in range(n)])
        else:
            values = torch.stack([s[l, l + k] for l in range(n - k + 1)])
        if values.isnan().any():
            starts = values.isnan().nonzero().flatten().tolist()
            raise ValueError(f"block_similarity is NaN for the {mode} candidates starting at layers {starts}: every "
                             "candidate needs a value to rank")
        order = ranked(values).tolist()
        if mode == "discrete":  # sets of k in rank order: the top k, then the last one swapped for the next, ...
            choices = (sorted(c) for c in itertools.islice(itertools.combinations(order, k), MAX_BLOCK_CHOICES))
        else:
            choices = (list(range(l, l + k)) for l in order)
        return next((c for c in choices if acceptable(c)), None)

    if count is None:
        options = [o for o in (best(k) for k in range(n)) if o is not None]
        count = len(_nearest([(_shares(model, [], o)[0], o) for o in options], amount))
    chosen = best(count)
    if chosen is None:
        raise ValueError(f"no {mode} choice of {count} blocks (at most {MAX_BLOCK_CHOICES} tried, best ranked first) "
                         f"keeps an MoE layer (MoE layers: {sorted(moe)}) with a layout the config fields can express: "
                         "drop fewer blocks")
    routed, params = _shares(model, [], chosen)
    meta = dict(criterion="block_similarity", mode=mode, count=count if amount is None else None, ratio=amount,
                dropped=len(chosen), achieved=routed, params_removed=params)
    return DropPlan([], chosen, n, model_fingerprint or fingerprint(model), meta)


# --- MoE sublayers ---------------------------------------------------------------------------------------------


def drop_moe_sublayers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Remove the MoE sublayer (post-attention norm, router, routed and shared experts) of each listed decoder
    layer, in place; attention stays. Config fields naming the removed modules lose those entries."""
    layers = sorted(set(int(i) for i in layers))
    if has_hooks(model):
        raise RuntimeError("cannot drop layers while fmoe hooks are attached (inside fmoe.masked or a scoring pass)")
    remaining = {m.index for m in moe_layers(model).values()} - set(layers)
    if not remaining:
        raise ValueError(f"dropping MoE layers {layers} leaves none: fmoe models keep at least one MoE layer")
    blocks = remove_sublayers(model, layers)
    config = own_config(model)
    for name in LAYER_FIELDS:  # entries of the removed experts modules go
        value = getattr(config, name, None)
        if isinstance(value, dict):
            setattr(config, name, {k: v for k, v in value.items()
                                   if not any(k == b or str(k).startswith(b + ".") for b in blocks)})
    setattr(config, DROPPED_MOE_FIELD, sorted(set(getattr(config, DROPPED_MOE_FIELD, None) or []) | set(layers)))
    return model


# --- blocks ----------------------------------------------------------------------------------------------------

def _qwen_sparse(config, n: int) -> set[int]:
    if getattr(config, "num_experts", 1) <= 0:
        return set()
    return {i for i in range(n) if i not in config.mlp_only_layers and (i + 1) % config.decoder_sparse_step == 0}


def _qwen_write(config, sparse: set[int], n: int, kept: list[int]) -> None:
    mapped = [j for j, i in enumerate(kept) if i in config.mlp_only_layers]
    config.mlp_only_layers = mapped
    if _qwen_sparse(config, n) != sparse:  # the step no longer fits the kept layers: list them explicitly
        config.decoder_sparse_step, config.mlp_only_layers = 1, [j for j in range(n) if j not in sparse]


def _ernie_sparse(config, n: int) -> set[int]:
    end = n - 1 if config.moe_layer_end_index == -1 else config.moe_layer_end_index
    return {i for i in range(n) if (i + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= i <= end}


def _ernie_write(config, sparse: set[int], n: int, kept: list[int]) -> None:
    for interval in [config.moe_layer_interval, *range(1, n + 1)]:
        config.moe_layer_interval, config.moe_layer_start_index, config.moe_layer_end_index = (
            interval, min(sparse), max(sparse))
        if _ernie_sparse(config, n) == sparse:
            return


def _dense_prefix_sparse(config, n: int) -> set[int]:
    return set(range(config.first_k_dense_replace, n))


def _dense_prefix_write(config, sparse: set[int], n: int, kept: list[int]) -> None:
    config.first_k_dense_replace = sum(i < config.first_k_dense_replace for i in kept)


# (config fields, which layers are MoE for n layers, rewrite the fields for the kept layers): the family's layout
SPARSE_LAYOUTS = [
    (("first_k_dense_replace",), _dense_prefix_sparse, _dense_prefix_write),
    (("mlp_only_layers", "decoder_sparse_step"), _qwen_sparse, _qwen_write),
    (("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"), _ernie_sparse, _ernie_write),
]


def _layer_key(prefix: str, key: str, mapping: dict[int, int | None]):
    """A config key renamed for the kept layers (None: its layer is gone; unchanged: it names no layer)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return mapping.get(key)
    if isinstance(key, str) and key.isdigit():
        new = mapping.get(int(key))
        return None if new is None else str(new)
    match = re.match(rf"{re.escape(prefix)}\.(\d+)(?=\.|$)", key) if isinstance(key, str) else None
    if match is None:
        return key
    new = mapping.get(int(match.group(1)))
    return None if new is None else f"{prefix}.{new}{key[match.end():]}"


def rename_layer_fields(config, prefix: str, kept: list[int]) -> None:
    """Renumber the config fields `LAYER_FIELDS` names for the kept decoder layers (kept[j] = old index of new
    layer j): a dict keyed by module name (`<prefix>.<i>.…`, e.g. fmoe_expert_widths) or by layer index, or a list
    of layer indices (fmoe_dropped_moe). Entries of removed layers go; other keys, values and fields stay."""
    mapping = {old: new for new, old in enumerate(kept)}
    for name in LAYER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, dict):
            renamed = {}
            for k, v in value.items():
                if (new := _layer_key(prefix, k, mapping)) is not None:
                    renamed[new] = v
            setattr(config, name, renamed)
        elif isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            setattr(config, name, [mapping[i] for i in value if i in mapping])


def _rewritten_config(config, prefix: str, n: int, kept: list[int]):
    """A copy of `config` (n decoder layers) describing the kept ones: num_hidden_layers, layer_types, the family's
    dense/sparse layout, `LAYER_FIELDS`. ValueError if the layout fields cannot express which kept layers are MoE."""
    new = copy.deepcopy(config)
    new.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == n:
        new.layer_types = [config.layer_types[i] for i in kept]
    for fields, read, write in SPARSE_LAYOUTS:
        if not all(hasattr(config, f) for f in fields):
            continue
        target = {j for j, i in enumerate(kept) if i in read(config, n)}
        write(new, target, len(kept), kept)
        if read(new, len(kept)) != target:
            raise ValueError(f"the kept layers' MoE layout {sorted(target)} cannot be written in the config fields "
                             f"{', '.join(fields)}: drop other blocks")
    rename_layer_fields(new, prefix, kept)
    return new


def drop_blocks(model: nn.Module, blocks: list[int]) -> nn.Module:
    """Remove the listed decoder layers in place, renumber `layer_idx` of every module that has one, and rewrite
    the config (num_hidden_layers, layer_types, the family's dense/sparse layout, `LAYER_FIELDS`). All checks,
    the config's included, come first: a refused drop changes nothing."""
    blocks = sorted(set(int(i) for i in blocks))
    if has_hooks(model):
        raise RuntimeError("cannot drop blocks while fmoe hooks are attached (inside fmoe.masked or a scoring pass)")
    prefix, layers = decoder_layers(model)
    n = len(layers)
    if any(not 0 <= i < n for i in blocks):
        raise ValueError(f"blocks {blocks} out of range for {n} decoder layers")
    kept = [i for i in range(n) if i not in set(blocks)]
    if not kept:
        raise ValueError(f"dropping blocks {blocks} removes all {n} decoder layers")
    if not {m.index for m in moe_layers(model).values()} - set(blocks):
        raise ValueError(f"dropping blocks {blocks} removes every MoE layer: fmoe models keep at least one")
    new = _rewritten_config(model.config, prefix, n, kept)  # checked before the model is touched
    config = own_config(model)

    replace_module(model, prefix, nn.ModuleList([layers[i] for i in kept]))
    for j, layer in enumerate(model.get_submodule(prefix)):
        for module in layer.modules():
            for attr in LAYER_INDEX_ATTRS:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, j)
    fields = ["num_hidden_layers", "layer_types", *(f for layout in SPARSE_LAYOUTS for f in layout[0]), *LAYER_FIELDS]
    for name in fields:  # onto the config the modules share, in place
        if hasattr(new, name) and getattr(new, name) != getattr(config, name, None):
            setattr(config, name, getattr(new, name))
    return model


def drop(model: nn.Module, plan: DropPlan) -> nn.Module:
    """Apply a DropPlan in place: MoE sublayers first, then blocks (both numbered as planned)."""
    _, layers = decoder_layers(model)
    if plan.num_layers != len(layers):
        raise ValueError(f"plan was made for {plan.num_layers} decoder layers, the model has {len(layers)}")
    fp = plan.fingerprint if on_meta(model) else fingerprint(model)  # an empty model (FSDP2 rank > 0): shapes only
    if plan.fingerprint != fp:
        raise ValueError(f"plan was made for another model (fingerprint {plan.fingerprint} != {fp})")
    moe = {m.index for m in moe_layers(model).values()}
    if not moe - set(plan.moe_layers) - set(plan.blocks):
        raise ValueError("the plan removes every MoE layer: fmoe models keep at least one")
    if plan.moe_layers:
        drop_moe_sublayers(model, plan.moe_layers)
    if plan.blocks:
        drop_blocks(model, plan.blocks)
    return model


def _layers(model, calibration, amount=None, count=None):
    statistics = calibration.need("statistics", "layer_drop", model)
    return plan_layer_drop(model, statistics.moe_similarity, count=count,
                           amount=None if count is not None else amount, model_fingerprint=statistics.fingerprint)


def _blocks(model, calibration, amount=None, count=None, mode="discrete"):
    statistics = calibration.need("statistics", "block_drop", model)
    return plan_block_drop(model, statistics.block_similarity, count=count,
                           amount=None if count is not None else amount, mode=mode,
                           model_fingerprint=statistics.fingerprint)


register("layer_drop", Method(_layers, drop, DropPlan, "statistics", "drop the MoE sublayers that change the residual least"))
register("block_drop", Method(_blocks, drop, DropPlan, "statistics", "drop the decoder blocks that change the residual least",
                              check=lambda amount, **options: check_choices("block_drop", options, mode=BLOCK_MODES)))
