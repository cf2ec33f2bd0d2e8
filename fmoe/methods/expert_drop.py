"""Expert drop: remove whole routed experts (their weights, router rows and biases), planned from per-expert scores.

Scores come from any criterion as {experts module name: Tensor[E]} (higher = keep); `plan_experts` turns them into
an `ExpertPlan` (which experts each layer keeps), `drop_experts` edits the model in place so it computes exactly
what the original computes with the dropped experts' router logits at -inf. `select_scores` carries dim scores
over to the dropped model, so a dims plan (`fmoe.make_plan`) can follow without a second calibration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import _aliases
from ..calibration.scores import Scores, ranked
from ..io import read_json, write_json
from ..model.compat import EXPERT_COUNT_FIELDS, TOP2_GROUP_ROUTERS, TWO_PICK_ROUTERS, own_config, router_groups
from ..model.experts import RaggedExperts, expert_parameters, find_experts, fingerprint, num_experts, on_meta
from ..model.hooks import ensure_aligned_implementation, has_hooks
from ..model.layers import moe_layers
from ..model.structure import EXPERT_COUNTS_FIELD, WIDTHS_FIELD, record_widths, select_experts
from .registry import Method, check_choices, register

SCOPES = ("layer", "global")
NORMALIZATIONS = ("mean", "none")


@dataclass
class ExpertPlan:
    """keep[name] = ascending ids of the experts module `name` keeps (ids of the model planned for)."""

    keep: dict[str, list[int]]
    num_experts: dict[str, int]  # original expert counts, to check the plan against a model
    sizes: dict[str, list[int]]  # parameters of every original expert (the removed share without the model)
    fingerprint: str
    meta: dict = field(default_factory=dict)  # criterion, scope, normalize, ratio (the amount), count, achieved
    FORMAT: ClassVar[str] = "fmoe.ExpertPlan/1"

    def carry_scores(self, scores: Scores, model: nn.Module) -> Scores:
        """The dim scores of the experts this plan keeps, for `model` once the plan dropped the others."""
        return select_scores(scores, self, model)

    def kept_counts(self) -> dict[str, int]:
        return {name: len(ids) for name, ids in self.keep.items()}

    def removed_fraction(self) -> float:
        """Share of routed expert parameters the plan removes."""
        total = sum(sum(s) for s in self.sizes.values())
        kept = sum(self.sizes[name][e] for name, ids in self.keep.items() for e in ids)
        return 1 - kept / total

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "fingerprint": self.fingerprint, "meta": self.meta, "num_experts": self.num_experts,
                "sizes": self.sizes, "keep": self.keep}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ExpertPlan:
        return cls.from_dict(read_json(path, cls.FORMAT, "fmoe expert plan"))

    @classmethod
    def from_dict(cls, data: dict) -> ExpertPlan:
        return cls(keep={n: [int(e) for e in ids] for n, ids in data["keep"].items()},
                   num_experts={n: int(k) for n, k in data["num_experts"].items()},
                   sizes=data["sizes"], fingerprint=data["fingerprint"], meta=data["meta"])


def expert_sizes(module: nn.Module) -> list[int]:
    """Parameters of each expert of a (fused or ragged) experts module."""
    params = module.expert_parameters if isinstance(module, RaggedExperts) else (lambda e: expert_parameters(module, e))
    return [sum(t.numel() for t in params(e).values()) for e in range(num_experts(module))]


def keep_minimum(model_type: str, router: nn.Module) -> tuple[int, int, str]:
    """(groups, least, why): the router's expert groups (1 unless group-limited) and the fewest experts each group
    must keep for the layer to run, with the rule that sets it."""
    groups = router_groups(router)
    rules = [(1, "every MoE layer needs at least one expert")]
    if model_type in TWO_PICK_ROUTERS:
        rules.append((2, f"{model_type}'s router (sparsemixer) always picks two experts"))
    if model_type in TOP2_GROUP_ROUTERS:  # .topk(2) on the group scores, whatever n_group (GLM-4.5 ships 1)
        rules.append((2, f"{model_type}'s router ranks expert groups by their two best experts, also with one group"))
    if groups:
        rules.append((-(-router.top_k // groups[1]), f"top_k={router.top_k} experts must come from "
                                                     f"topk_group={groups[1]} groups"))
    least, why = max(rules, key=lambda rule: rule[0])
    return (groups[0] if groups else 1), least, why


def check_keep(model_type: str, name: str, router: nn.Module, total: int, ids: list[int]) -> None:
    """A clear ValueError when keeping experts `ids` of `total` breaks the layer's router."""
    if not ids:
        raise ValueError(f"{name}: the plan keeps no expert of {total}; every MoE layer needs at least one")
    n_group, least, why = keep_minimum(model_type, router)
    size = total // n_group
    per_group = [sum(g * size <= e < (g + 1) * size for e in ids) for g in range(n_group)]
    if len(set(per_group)) > 1:
        raise ValueError(f"{name}: the plan keeps {per_group} experts in the router's {n_group} groups; a "
                         "group-limited router reshapes its scores to [n_group, E / n_group], so every group must "
                         "keep the same number")
    if per_group[0] < least:
        where = f"each of its {n_group} groups" if n_group > 1 else "the layer"
        raise ValueError(f"{name}: {why}, so {where} must keep at least {least}; the plan keeps {per_group[0]}")


def _layer_keep(name: str, scores: torch.Tensor, drop: int, groups: tuple[int, int] | None) -> list[int]:
    """The experts a layer keeps when it drops its `drop` lowest-scored ones (the same number from every group of a
    group-limited router)."""
    total = scores.numel()
    if drop >= total:
        raise ValueError(f"{name}: dropping {drop} of {total} experts leaves the layer no expert")
    if groups is None:
        return sorted(ranked(scores)[: total - drop].tolist())
    n_group = groups[0]
    if drop % n_group:
        raise ValueError(f"{name}: its router is group-limited ({n_group} groups) and drops the same number of "
                         f"experts from every group, so the count per layer must divide by {n_group}, got {drop}")
    size, per = total // n_group, drop // n_group
    kept = [g * size + ranked(scores[g * size:(g + 1) * size])[: size - per] for g in range(n_group)]
    return sorted(torch.cat(kept).tolist())


@_aliases.renamed(ratio="amount")
def plan_experts(model: nn.Module, scores: dict[str, torch.Tensor], amount: float | None = None,
                 count: int | None = None, scope: str = "layer", normalize: str = "mean",
                 criterion: str = "", model_fingerprint: str | None = None) -> ExpertPlan:
    """Drop the lowest-scored experts: `amount` (share of routed parameters to remove) or `count` (experts per layer
    for scope "layer", in all for "global"). Scope "layer" drops the same number in every MoE layer (amount: round(
    amount x E)); "global" ranks experts across layers (each layer's scores divided by their mean first when
    normalize="mean"), dropping from every group of a group-limited router alike, and never takes a layer below
    what its router needs to run (`keep_minimum`); a layer-scope drop past that is refused."""
    if (amount is None) == (count is None):
        raise ValueError("give exactly one of amount (share of routed parameters to remove) or count (experts)")
    if amount is not None and not 0 <= amount <= 1:
        raise ValueError(f"amount must be in [0, 1], got {amount}")
    if count is not None and (not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    model_type = model.config.model_type
    modules, layers = find_experts(model), moe_layers(model)
    totals = {name: num_experts(m) for name, m in modules.items()}
    if set(scores) != set(modules):
        raise ValueError(f"scores name experts modules {sorted(set(scores) - set(modules))[:3]} the model does not "
                         f"have, or lack {sorted(set(modules) - set(scores))[:3]}")
    for name, s in scores.items():
        if tuple(s.shape) != (totals[name],) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"scores of {name} must be {totals[name]} finite values (one per expert), got "
                             f"shape {tuple(s.shape)}")
    values = {name: scores[name].detach().cpu().double() for name in modules}
    routers = {name: model.get_submodule(layers[name].router) for name in modules}
    sizes = {name: expert_sizes(m) for name, m in modules.items()}
    if scope == "layer":
        keep = {name: _layer_keep(name, values[name], round(amount * totals[name]) if count is None else count,
                                  router_groups(routers[name])) for name in modules}
    else:
        keep = _global_keep(values, sizes, amount, count, normalize,
                            {name: keep_minimum(model_type, routers[name])[:2] for name in modules})
    for name, ids in keep.items():
        check_keep(model_type, name, routers[name], totals[name], ids)
    meta = dict(criterion=criterion, scope=scope, normalize=normalize, ratio=amount, count=count)
    plan = ExpertPlan(keep=keep, num_experts=totals, sizes=sizes, meta=meta,
                      fingerprint=model_fingerprint or fingerprint(model))  # given: an empty model's checkpoint
    plan.meta["achieved"] = plan.removed_fraction()
    return plan


def _global_keep(values: dict[str, torch.Tensor], sizes: dict[str, list[int]], amount: float | None,
                 count: int | None, normalize: str, minimum: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Experts dropped lowest first across layers: `count` of them, or while the removed parameters come nearer to
    `amount` of the total. A layer of minimum[name] = (groups, least) loses experts one round at a time, a round being
    the lowest expert left in each group (scored by their mean; one expert where the router has no groups), and
    keeps at least `least` per group. Ties by layer, then round."""
    if normalize == "mean":
        for name, v in values.items():
            if not v.mean() > 0:
                raise ValueError(f"normalize='mean' divides each layer's scores by their mean, which is not positive "
                                 f"for {name}; use normalize='none'")
        values = {name: v / v.mean() for name, v in values.items()}
    rounds = []  # (score, layer, round, expert ids)
    for i, (name, v) in enumerate(values.items()):
        n_group, least = minimum[name]
        size = v.numel() // n_group
        lowest = [g * size + torch.sort(v[g * size:(g + 1) * size], stable=True).indices for g in range(n_group)]
        for r in range(size - least):  # [n_group] the r-th lowest of every group
            ids = [int(order[r]) for order in lowest]
            rounds.append((float(v[ids].mean()), i, r, ids))
    names = list(values)
    dropped: set[tuple[str, int]] = set()
    target = None if amount is None else amount * sum(sum(s) for s in sizes.values())
    removed = 0
    for _, i, _, ids in sorted(rounds, key=lambda unit: unit[:3]):
        name = names[i]
        if count is not None and len(dropped) + len(ids) > count:
            continue  # a round of a grouped layer can overshoot: a smaller one may still fit
        if target is not None:
            cost = sum(sizes[name][e] for e in ids)
            if abs(removed + cost - target) >= abs(removed - target):
                break
            removed += cost
        dropped.update((name, e) for e in ids)
    if count is not None and len(dropped) < count:
        most = sum(len(unit[3]) for unit in rounds)
        reach = f"at most {most}" if len(dropped) == most else (f"{len(dropped)} (a group-limited router loses one "
                                                                 f"expert from every group at a time)")
        raise ValueError(f"count={count} drops more experts than the layers can lose while each keeps what its "
                         f"router needs to run: the ranking reaches {reach}")
    return {name: [e for e in range(v.numel()) if (name, e) not in dropped] for name, v in values.items()}


def check_expert_plan(model: nn.Module, plan: ExpertPlan) -> dict[str, nn.Module]:
    """The model's experts modules, after checking the plan was made for exactly this model."""
    modules = find_experts(model)
    counts = {name: num_experts(m) for name, m in modules.items()}
    if plan.num_experts != counts or set(plan.keep) != set(counts):
        made, has = dict(list(plan.num_experts.items())[:2]), dict(list(counts.items())[:2])
        raise ValueError(f"expert plan does not fit this model: it was made for expert counts {made}..., the model "
                         f"has {has}... (a plan applies once, to the model it was made for)")
    if not on_meta(model) and plan.fingerprint != fingerprint(model):  # an empty model (FSDP2 rank > 0): shapes only
        raise ValueError(f"expert plan was made for another model (fingerprint {plan.fingerprint} != "
                         f"{fingerprint(model)})")
    for name, ids in plan.keep.items():
        if not ids or ids != sorted(set(ids)) or ids[0] < 0 or ids[-1] >= counts[name]:
            raise ValueError(f"expert plan keeps invalid experts for {name}: need ascending, unique, in range, "
                             "at least one")
    return modules


@torch.no_grad()
def drop_experts(model: nn.Module, plan: ExpertPlan) -> nn.Module:
    """Physically remove the experts `plan` drops (in place), with their router rows, and rewrite the config so
    checkpoints rebuild the result; returns the model."""
    if has_hooks(model):
        raise RuntimeError("cannot drop experts while fmoe hooks are attached (inside fmoe.masked or a scoring "
                           "pass); drop after the block ends")
    check_expert_plan(model, plan)
    layers = moe_layers(model)
    for name, ids in plan.keep.items():
        check_keep(model.config.model_type, name, model.get_submodule(layers[name].router), plan.num_experts[name], ids)
    select_experts(model, plan.keep)
    config, counts = own_config(model), plan.kept_counts()
    if getattr(config, WIDTHS_FIELD, None):  # dims were pruned before: the kept experts' widths
        record_widths(model)
    if len(set(counts.values())) == 1:  # a stock config describes it: rewrite the count fields
        kept = next(iter(counts.values()))
        for key in EXPERT_COUNT_FIELDS:
            if hasattr(config, key):
                setattr(config, key, kept)  # aliases (attribute_map) write the same field again
        if isinstance(getattr(config, "num_experts_per_tok", None), int):
            config.num_experts_per_tok = min(config.num_experts_per_tok, kept)
        config.__dict__.pop(EXPERT_COUNTS_FIELD, None)
        top_k = getattr(config, "num_experts_per_tok", None)
        for key, value in (("num_experts", kept), ("num_experts_per_tok", top_k)):
            if isinstance(getattr(model, key, None), int):  # the causal LM's copies (load-balancing loss)
                setattr(model, key, value)
    else:  # routers keep min(num_experts_per_tok, count) experts per token: the rebuild derives the same
        setattr(config, EXPERT_COUNTS_FIELD, counts)
    ensure_aligned_implementation(model)
    return model


def select_scores(scores: Scores, plan: ExpertPlan, model: nn.Module) -> Scores:
    """The dim scores ([E, I] per module) of the experts `plan` keeps, fingerprinted for `model` (dropped by that
    plan), so a dims plan can follow an expert drop without a second calibration."""
    if scores.fingerprint != plan.fingerprint:
        raise ValueError(f"scores come from another model than the expert plan (fingerprint {scores.fingerprint} "
                         f"!= {plan.fingerprint})")
    counts = {name: num_experts(m) for name, m in find_experts(model).items()}
    if counts != plan.kept_counts() or set(scores.tensors) != set(plan.keep):
        raise ValueError("the model is not the one this expert plan dropped (expert counts differ), or the scores "
                         "name other experts modules")
    tensors = {name: t[torch.tensor(plan.keep[name])].contiguous() for name, t in scores.tensors.items()}
    meta = {**scores.meta, "experts_kept": plan.keep}
    return Scores(tensors, scores.criterion, fingerprint(model), scores.samples, scores.tokens, meta)


def _experts(criterion: str) -> Callable:
    def plan(model, calibration, amount=None, scope="layer", count=None, normalize="mean"):
        statistics = calibration.need("statistics", criterion, model)
        if criterion not in statistics.experts:
            raise ValueError(f"expert criterion {criterion!r} was not measured (measured: "
                             f"{', '.join(statistics.experts)}; expert Fisher needs a pass with a backward)")
        return plan_experts(model, statistics.experts[criterion], None if count is not None else amount,
                            count=count, scope=scope, normalize=normalize, criterion=criterion,
                            model_fingerprint=statistics.fingerprint)

    return plan


def _check(name: str):
    return lambda amount, **options: check_choices(name, options, scope=SCOPES, normalize=NORMALIZATIONS)


for _name, _criterion, _about in [
    ("expert_drop", "router", "drop experts with the lowest mean routing probability"),
    ("expert_frequency", "frequency", "drop the experts routed the fewest tokens"),
    ("reap", "reap", "drop experts with the lowest mean routing weight x output norm (REAP)"),
    ("expert_fisher", "fisher", "drop experts with the lowest expert-level Fisher"),
]:
    register(_name, Method(_experts(_criterion), drop_experts, ExpertPlan, "statistics", _about, check=_check(_name)))
