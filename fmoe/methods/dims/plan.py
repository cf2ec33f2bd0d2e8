"""Pruning plans: which intermediate dims each routed expert keeps, decided from Scores (no model needed)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ... import _aliases
from ...calibration.scores import Scores, ranked
from ...io import read_json, write_json
from ...model.experts import expert_widths, find_experts, fingerprint, on_meta
from ...model.structure import CompressedExperts

SCOPES = ("expert", "layer", "global")
ROUNDING_WARNING = 0.05  # a plan further than this from its amount (rounding to multiple_of) says so
NORMALIZATIONS = ("mean", "none")


@dataclass
class PruningPlan:
    """keep[name][e] = ascending LongTensor of the intermediate dims expert e of module `name` keeps."""

    keep: dict[str, list[torch.Tensor]]
    widths: dict[str, list[int]]  # original widths, to check the plan against a model
    fingerprint: str
    meta: dict = field(default_factory=dict)  # ratio (the amount), scope, method (the criterion), multiple_of, ...
    FORMAT: ClassVar[str] = "fmoe.PruningPlan/1"

    def kept_widths(self) -> dict[str, list[int]]:
        return {name: [int(k.numel()) for k in ks] for name, ks in self.keep.items()}

    def is_uniform(self) -> bool:
        return len({w for ws in self.kept_widths().values() for w in ws}) == 1

    def removed_fraction(self) -> float:
        total = sum(sum(ws) for ws in self.widths.values())
        return 1 - sum(sum(ws) for ws in self.kept_widths().values()) / total

    def to_dict(self) -> dict:
        return {
            "format": self.FORMAT,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "widths": self.widths,
            "keep": {name: [k.tolist() for k in ks] for name, ks in self.keep.items()},
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_dict(read_json(path, cls.FORMAT, "fmoe pruning plan"))

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        keep = {name: [torch.tensor(k, dtype=torch.long) for k in ks] for name, ks in data["keep"].items()}
        return cls(keep=keep, widths=data["widths"], fingerprint=data["fingerprint"], meta=data["meta"])


def round_width(width: float, full: int, multiple_of: int, min_width: int) -> int:
    """Nearest multiple of `multiple_of` (halves up), at least `min_width`, at most the full width."""
    rounded = multiple_of * math.floor(width / multiple_of + 0.5)
    return int(min(full, max(rounded, min_width)))


def allocate(targets: list[float], fulls: list[int], budget: int, multiple_of: int, min_width: int) -> list[int]:
    """Widths (multiples of `multiple_of`, or the full width) for experts that want `targets` dims, summing to
    `budget` within half a unit where the bounds allow: each starts at its target rounded down, then units go to
    the largest remainders (or, when `min_width` pushed the total over budget, come off the smallest), ties by
    expert order."""
    m = multiple_of
    lowest = [min(min_width, f) for f in fulls]
    widths = [min(f, max(lo, m * math.floor(t / m))) for t, f, lo in zip(targets, fulls, lowest)]
    remainders = [t / m - math.floor(t / m) for t in targets]
    largest_first = sorted(range(len(targets)), key=lambda i: -remainders[i])  # stable: ties by expert order
    smallest_first = sorted(range(len(targets)), key=lambda i: remainders[i])
    while True:  # every move brings the total strictly closer to the budget, so this ends
        gap = budget - sum(widths)
        grow, moved = gap > 0, False
        for i in largest_first if grow else smallest_first:
            new = min(fulls[i], widths[i] + m) if grow else m * (math.ceil(widths[i] / m) - 1)  # one unit
            if (new <= widths[i]) if grow else (new < lowest[i]):
                continue  # at its full width, or at min_width
            if abs(gap - (new - widths[i])) >= abs(gap):
                continue
            gap -= new - widths[i]
            widths[i], moved = new, True
            if gap == 0 or (gap > 0) != grow:
                break
        if not moved:  # within half a unit, or every expert at a bound: the closest the bounds allow
            return widths


HILL_CLIMB_ROUNDS = 6  # level moves tried after the search (each round: 4 x max_widths knapsacks)
PRICE_STEPS = 12  # bisection steps of the price per dim
_MAX_LEVEL_CANDIDATES = 192  # finer width grids are searched on a coarser grid of levels


def limit_widths(scores: torch.Tensor, widths: list[int], max_widths: int, multiple_of: int,
                 min_width: int) -> list[int]:
    """At most `max_widths` distinct widths for the experts of one layer (scores [E, I]) with the same total as
    `widths` (the nearest total the levels reach otherwise), keeping as much score mass (the sum of each expert's
    top-w scores) as it can. Levels: for a price per dim, the best level set is found exactly (each expert keeps
    mass - price x width, concave in its width, so a dynamic program over sorted levels solves it); the price is
    bisected towards the budget. Each expert then takes the level that maximises the layer's mass under the exact
    budget (a knapsack over the levels, solved exactly), and levels move along the width grid while that mass grows.
    Ragged experts run one grouped matmul per distinct width."""
    n_exp, full = scores.shape
    if len(set(widths)) <= max_widths:
        return widths
    unit = math.gcd(multiple_of, full)  # every level is a multiple of it (multiples of multiple_of, or full)
    lowest = min(min_width, full)
    mass = torch.cat([torch.zeros(n_exp, 1, dtype=torch.float64),
                      torch.sort(scores.double(), dim=1, descending=True).values.cumsum(1)], dim=1)  # [E, I+1]
    budget = sum(widths) // unit
    grid = sorted({w for w in range(multiple_of, full + 1, multiple_of) if w >= lowest} | {full})  # level widths
    stride = max(1, math.ceil(len(grid) / _MAX_LEVEL_CANDIDATES))
    candidates = torch.tensor(sorted(set(grid[::stride]) | {grid[-1]}))  # [C] levels the price search considers

    tried: dict[tuple[int, ...], tuple[int, float, list[int]]] = {}

    def assign(levels: list[int]) -> tuple[int, float, list[int]]:
        key = tuple(levels)
        if key not in tried:
            tried[key] = _assign(mass, levels, unit, budget)
        return tried[key]

    # starts that reach the budget whatever the prices give: levels at quantiles of `widths`, and the best pair
    ordered = sorted(widths)
    assign(sorted({min(grid, key=lambda w: abs(w - ordered[int((i + 0.5) * n_exp / max_widths)]))
                   for i in range(max_widths)}))
    if max_widths >= 2:  # the best pair of levels that meets the budget exactly, found by enumeration
        pair = _best_pair(mass, grid, sum(widths))
        if pair:
            assign(pair)
    top = float(scores.double().max())
    if top > 0:  # scores span many decades: bisect the price per dim geometrically, from top * 1e-12 to top
        low, high = math.log(top) - 12 * math.log(10), math.log(top)
        for _ in range(PRICE_STEPS):
            price = math.exp((low + high) / 2)
            levels = _best_levels(mass, candidates, price, max_widths)
            assign(levels)
            widths_at = torch.tensor(levels, dtype=torch.float64)  # [L]
            chosen = int(widths_at[(mass[:, levels] - price * widths_at).argmax(1)].sum())  # each expert's best level
            if chosen // unit > budget:
                low = (low + high) / 2
            else:
                high = (low + high) / 2
    # from the best level set found and from the one keeping the most mass (if it misses the budget), move one level
    # by one or two grid steps at a time while the result improves (budget first, then kept mass)
    starts = {min(tried, key=lambda k: (tried[k][0], -tried[k][1])), max(tried, key=lambda k: tried[k][1])}
    results = [_climb(list(start), assign, grid) for start in sorted(starts)]
    return min(results, key=lambda r: (r[0], -r[1]))[2]


def _climb(levels: list[int], assign, grid: list[int]) -> tuple[int, float, list[int]]:
    gap, kept, assigned = assign(levels)
    for _ in range(HILL_CLIMB_ROUNDS):
        trials = []
        for i, w in enumerate(levels):
            for step in (-2, -1, 1, 2):
                j = grid.index(w) + step
                if 0 <= j < len(grid) and grid[j] not in levels:
                    trials.append(sorted(levels[:i] + [grid[j]] + levels[i + 1:]))
        if not trials:
            break
        trial = max(trials, key=lambda t: (-assign(t)[0], assign(t)[1]))  # nearest the budget, then most mass
        t_gap, t_kept, t_assigned = assign(trial)  # (cached)
        if (t_gap, -t_kept) >= (gap, -kept - 1e-12 * abs(kept)):
            break
        levels, gap, kept, assigned = trial, t_gap, t_kept, t_assigned
    return gap, kept, assigned


def _best_pair(mass: torch.Tensor, grid: list[int], total: int) -> list[int] | None:
    """The two widths of `grid` that keep the most mass (mass [E, I+1]) with experts' widths summing exactly to
    `total`: for levels a < b, n = (total - E a) / (b - a) experts take b, those that gain most from it."""
    n_exp = mass.shape[0]
    at = mass[:, grid].numpy()  # [E, C]
    best, best_value = None, -math.inf
    for i, a in enumerate(grid):
        for j in range(i + 1, len(grid)):
            n, rest = divmod(total - n_exp * a, grid[j] - a)
            if rest or not 0 < n < n_exp:
                continue
            gain = at[:, j] - at[:, i]  # [E]
            value = at[:, i].sum() + np.partition(gain, n_exp - n)[n_exp - n:].sum()
            if value > best_value:
                best, best_value = [a, grid[j]], value
    return best


def _best_levels(mass: torch.Tensor, candidates: torch.Tensor, price: float, max_levels: int) -> list[int]:
    """The set of at most `max_levels` widths (from candidates [C]) maximising sum over experts of the best
    mass[e, w] - price * w among the set. Each expert's value is concave in w, so between two consecutive levels
    it takes the better of the two around its peak: a dynamic program over (levels used, last level) is exact."""
    value = (mass[:, candidates] - price * candidates.double()).numpy()  # [E, C]
    peak = value.argmax(1)  # [E] candidate index of each expert's best width
    c = np.arange(len(candidates))
    head = np.where(peak[:, None] < c[None, :], value, 0.0).sum(0)  # [C] experts below a first level at c
    tail = np.where(peak[:, None] >= c[None, :], value, 0.0).sum(0)  # [C] experts from a last level at c up
    pair = np.zeros((len(c), len(c)))  # [a, b] experts with peak in [a, b) take the better of a and b
    for p in np.unique(peak):  # experts grouped by peak: [a <= p, b > p] pairs only
        v = value[peak == p]  # [n, C]
        pair[: p + 1, p + 1 :] += np.maximum(v[:, : p + 1, None], v[:, None, p + 1 :]).sum(0)
    pair[~(c[:, None] < c[None, :])] = -np.inf  # levels ascend
    best, back = [head], []  # best[j][b]: j+1 levels, the last at b, experts with peak < b counted
    for _ in range(1, max_levels):
        step = best[-1][:, None] + pair  # [a, b]
        back.append(step.argmax(0))
        best.append(step.max(0))
    totals = np.stack(best) + tail  # [J, C]
    j, b = divmod(int(totals.argmax()), len(candidates))
    picked = [b]
    for level in range(j, 0, -1):
        b = int(back[level - 1][b])
        picked.append(b)
    return sorted(int(candidates[i]) for i in picked)


def _assign(mass: torch.Tensor, levels: list[int], unit: int, budget: int) -> tuple[int, float, list[int]]:
    """(|total - budget| in units, kept mass, width per expert): each expert of mass [E, I+1] takes one of
    `levels`, maximising the kept mass at the reachable total nearest `budget` (a knapsack, solved exactly)."""
    n_exp = mass.shape[0]
    units = np.array([w // unit for w in levels])  # [L]
    lowest, highest = n_exp * int(units.min()), n_exp * int(units.max())
    if not lowest <= budget <= highest:  # out of these levels' reach: every expert at the nearest extreme
        level = levels[0] if lowest > budget else levels[-1]
        return abs(n_exp * level // unit - budget), float(mass[:, level].sum()), [level] * n_exp
    source = np.arange(budget + 1)[None, :] - units[:, None]  # [L, B+1] budget used before this expert
    unreachable = source < 0
    source = source.clip(min=0)
    gains = mass[:, levels].numpy()  # [E, L]
    total = np.full(budget + 1, -np.inf)  # best kept mass per budget used  [B+1]
    total[0] = 0.0
    choice = np.zeros((n_exp, budget + 1), dtype=np.int64)
    for e in range(n_exp):
        options = total[source] + gains[e][:, None]  # [L, B+1]
        options[unreachable] = -np.inf
        choice[e] = options.argmax(0)
        total = np.take_along_axis(options, choice[e][None], 0)[0]
    reachable = np.flatnonzero(np.isfinite(total))
    b = int(reachable[np.abs(reachable - budget).argmin()])
    gap, kept = abs(b - budget), float(total[b])
    assigned = [0] * n_exp
    for e in range(n_exp - 1, -1, -1):
        assigned[e] = levels[int(choice[e, b])]
        b -= int(units[choice[e, b]])
    return gap, kept, assigned


def check_options(amount: float, scope: str = "layer", multiple_of: int = 16, min_width: int | None = None,
                  normalize: str = "mean", max_widths: int | None = 4) -> int:
    """Refuse options make_plan would refuse (no scores needed, so a run can check them first); the min_width used."""
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    if max_widths is not None and max_widths < 1:
        raise ValueError(f"max_widths must be >= 1 or None, got {max_widths}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    min_width = multiple_of if min_width is None else min_width
    if min_width < 1 or min_width % multiple_of:
        raise ValueError(f"min_width must be a positive multiple of multiple_of={multiple_of}, got {min_width}")
    return min_width


@_aliases.renamed(ratio="amount")
def make_plan(
    scores: Scores,
    amount: float,
    scope: str = "layer",
    multiple_of: int = 16,
    min_width: int | None = None,
    normalize: str = "mean",
    model=None,
    max_widths: int | None = 4,
) -> PruningPlan:
    """Remove the lowest-scored `amount` (a share) of routed intermediate dims.

    scope "expert": every expert drops the same share (uniform widths, loadable by stock transformers);
    "layer": dims compete across the experts of a layer; "global": across all layers, after dividing each layer's
    scores by their mean when normalize="mean" (normalize="none" compares raw scores, meaningful for Fisher,
    which is in loss units). Widths are then rounded to a multiple of `multiple_of` (grouped_mm needs aligned
    strides), never below `min_width` (default: multiple_of, and a multiple of it). The budget is kept: expert
    scope rounds each expert to the nearest unit; layer and global scope hand out units by largest remainder, so
    each layer (or the whole model) keeps round(dims x (1 - amount)) within one unit. With `model`, the plan is
    checked against it (scores of another model are refused); non-finite scores are refused. `max_widths` bounds
    the distinct widths per layer (ragged experts run one grouped matmul per width; None = unbounded) without
    changing any layer's total (see `limit_widths`). `meta["achieved"]` is the share of routed dims removed; a
    warning says when rounding leaves it more than 5 points from `amount`. `meta` records `amount` as "ratio" and
    the scores' criterion as "method" (the plan file's keys).
    """
    min_width = check_options(amount, scope, multiple_of, min_width, normalize, max_widths)
    for name, t in scores.tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"scores of {name} hold {int((~torch.isfinite(t)).sum())} non-finite values "
                             f"({scores.criterion}): rescore rather than plan from them")

    tensors = {name: t.double() for name, t in scores.tensors.items()}
    if scope == "global" and normalize == "mean":
        tensors = {name: t / t.mean().clamp_min(1e-300) for name, t in tensors.items()}

    # Kept width of every expert: its target count, rounded to units of multiple_of within the group's budget.
    widths: dict[str, list[int]] = {}
    if scope == "expert":
        for name, t in tensors.items():
            full = t.shape[1]
            width = full if amount == 0 else round_width(full * (1 - amount), full, multiple_of, min(min_width, full))
            widths[name] = [width] * t.shape[0]
    else:
        groups = [list(tensors)] if scope == "global" else [[name] for name in tensors]
        for names in groups:
            flat = torch.cat([tensors[n].reshape(-1) for n in names])
            n_keep = round(flat.numel() * (1 - amount))
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[ranked(flat)[:n_keep]] = True
            targets, fulls, offset = [], [], 0
            for n in names:
                size = tensors[n].numel()
                targets += chosen[offset : offset + size].view_as(tensors[n]).sum(1).tolist()
                fulls += [tensors[n].shape[1]] * tensors[n].shape[0]
                offset += size
            allocated = allocate(targets, fulls, n_keep, multiple_of, min_width)  # amount 0: every full width
            for n in names:
                widths[n], allocated = allocated[: tensors[n].shape[0]], allocated[tensors[n].shape[0]:]
        if max_widths is not None:
            widths = {n: limit_widths(tensors[n], ws, max_widths, multiple_of, min_width) for n, ws in widths.items()}

    keep = {name: [torch.sort(ranked(t[e])[:w]).values for e, w in enumerate(widths[name])]
            for name, t in tensors.items()}
    meta = dict(ratio=amount, scope=scope, method=scores.criterion, multiple_of=multiple_of, min_width=min_width,
                normalize=normalize, max_widths=max_widths)
    full_widths = {name: [t.shape[1]] * t.shape[0] for name, t in tensors.items()}
    plan = PruningPlan(keep=keep, widths=full_widths, fingerprint=scores.fingerprint, meta=meta)
    plan.meta["achieved"] = achieved = plan.removed_fraction()
    if abs(achieved - amount) > ROUNDING_WARNING:
        warnings.warn(f"the plan removes {achieved:.1%} of routed dims, not the {amount:.1%} asked: widths are rounded "
                      f"to multiples of {multiple_of} (at least {min_width}) and the experts are "
                      f"{sorted({t.shape[1] for t in tensors.values()})} wide; lower multiple_of/min_width to get "
                      "closer", stacklevel=3)  # 2 is _aliases.renamed's wrapper
    if model is not None:
        check_plan(model, plan)
    return plan


def check_plan(model: nn.Module, plan: PruningPlan) -> dict[str, nn.Module]:
    """The model's experts modules, after checking the plan was made for exactly this model. An empty (meta)
    model has no weights to fingerprint (a non-zero rank's under FSDP2, whose plan rank 0 checked): widths only."""
    modules = find_experts(model)
    compressed = [name for name, m in modules.items() if isinstance(m, CompressedExperts)]
    if compressed:
        raise ValueError(f"cannot prune the dims of compressed experts ({compressed[0]}): their trained vectors have "
                         "the experts' width; prune dims first, then compress")
    fp = plan.fingerprint if on_meta(model) else fingerprint(model)
    check_plan_fits(plan, {name: expert_widths(m) for name, m in modules.items()}, fp)
    return modules


def check_plan_fits(plan: PruningPlan, widths: dict[str, list[int]], fp: str) -> None:
    """The plan was made for experts of these widths and this fingerprint, and keeps valid dims (no model needed)."""
    if plan.widths != widths:
        raise ValueError(
            "plan does not fit this model: it was made for experts "
            f"{_summary(plan.widths)}, the model has {_summary(widths)}"
        )
    if plan.fingerprint != fp:
        raise ValueError(f"plan was made from scores of another model (fingerprint {plan.fingerprint} != {fp})")
    missing, unknown = sorted(set(widths) - set(plan.keep)), sorted(set(plan.keep) - set(widths))
    if missing or unknown:
        raise ValueError(f"plan keeps no dims for experts modules {missing[:3]} (a plan lists the kept dims of every "
                         "experts module; list all of a module's dims to leave it whole)" if missing else
                         f"plan names experts modules the model does not have: {unknown[:3]}")
    for name, keeps in plan.keep.items():
        if len(keeps) != len(widths[name]):
            raise ValueError(f"plan keeps dims for {len(keeps)} experts of {name}, which has {len(widths[name])}")
        for e, keep in enumerate(keeps):
            if keep.numel() == 0 or keep.min() < 0 or keep.max() >= widths[name][e] or not bool((keep.diff() > 0).all()):
                raise ValueError(f"plan keeps invalid dims for {name} expert {e}: need ascending, unique, in range")


def _summary(widths: dict[str, list[int]]) -> str:
    return f"{len(widths)} modules, e.g. {next(iter(widths.items()), None)}"
