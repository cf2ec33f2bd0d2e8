"""Pruning plans: which intermediate dims each routed expert keeps, decided from Scores (no model needed)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import atomic_write_text
from .scores import Scores

SCOPES = ("expert", "layer", "global")
NORMALIZATIONS = ("mean", "none")


@dataclass
class PruningPlan:
    """keep[name][e] = ascending LongTensor of the intermediate dims expert e of module `name` keeps."""

    keep: dict[str, list[torch.Tensor]]
    widths: dict[str, list[int]]  # original widths, to check the plan against a model
    fingerprint: str
    meta: dict = field(default_factory=dict)  # ratio, scope, method, multiple_of, min_width, normalize

    def kept_widths(self) -> dict[str, list[int]]:
        return {name: [int(k.numel()) for k in ks] for name, ks in self.keep.items()}

    def is_uniform(self) -> bool:
        return len({w for ws in self.kept_widths().values() for w in ws}) == 1

    def removed_fraction(self) -> float:
        total = sum(sum(ws) for ws in self.widths.values())
        return 1 - sum(sum(ws) for ws in self.kept_widths().values()) / total

    def to_dict(self) -> dict:
        return {
            "format": "fmoe.PruningPlan/1",
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "widths": self.widths,
            "keep": {name: [k.tolist() for k in ks] for name, ks in self.keep.items()},
        }

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        data = json.loads(Path(path).read_text())
        if data.get("format") != "fmoe.PruningPlan/1":
            raise ValueError(f"{path} is not an fmoe pruning plan (format={data.get('format')!r})")
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


def _ranked(values: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties broken by ascending index (deterministic)."""
    return torch.sort(values, descending=True, stable=True).indices


def make_plan(
    scores: Scores,
    ratio: float,
    scope: str = "layer",
    multiple_of: int = 16,
    min_width: int | None = None,
    normalize: str = "mean",
    model=None,
) -> PruningPlan:
    """Remove the lowest-scored `ratio` of routed intermediate dims.

    scope "expert": every expert drops the same share (uniform widths, loadable by stock transformers);
    "layer": dims compete across the experts of a layer; "global": across all layers, after dividing each layer's
    scores by their mean when normalize="mean" (normalize="none" compares raw scores, meaningful for Fisher,
    which is in loss units). Widths are then rounded to a multiple of `multiple_of` (grouped_mm needs aligned
    strides), never below `min_width` (default: multiple_of, and a multiple of it). The budget is kept: expert
    scope rounds each expert to the nearest unit; layer and global scope hand out units by largest remainder, so
    each layer (or the whole model) keeps round(dims x (1 - ratio)) within one unit. With `model`, the plan is
    checked against it (scores of another model are refused); non-finite scores are refused.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid: {', '.join(SCOPES)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    min_width = multiple_of if min_width is None else min_width
    if min_width < 1 or min_width % multiple_of:
        raise ValueError(f"min_width must be a positive multiple of multiple_of={multiple_of}, got {min_width}")
    for name, t in scores.tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"scores of {name} hold {int((~torch.isfinite(t)).sum())} non-finite values "
                             f"({scores.method}): rescore rather than plan from them")

    tensors = {name: t.double() for name, t in scores.tensors.items()}
    if scope == "global" and normalize == "mean":
        tensors = {name: t / t.mean().clamp_min(1e-300) for name, t in tensors.items()}

    # Kept width of every expert: its target count, rounded to units of multiple_of within the group's budget.
    widths: dict[str, list[int]] = {}
    if scope == "expert":
        for name, t in tensors.items():
            full = t.shape[1]
            width = full if ratio == 0 else round_width(full * (1 - ratio), full, multiple_of, min(min_width, full))
            widths[name] = [width] * t.shape[0]
    else:
        groups = [list(tensors)] if scope == "global" else [[name] for name in tensors]
        for names in groups:
            flat = torch.cat([tensors[n].reshape(-1) for n in names])
            n_keep = round(flat.numel() * (1 - ratio))
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[_ranked(flat)[:n_keep]] = True
            targets, fulls, offset = [], [], 0
            for n in names:
                size = tensors[n].numel()
                targets += chosen[offset : offset + size].view_as(tensors[n]).sum(1).tolist()
                fulls += [tensors[n].shape[1]] * tensors[n].shape[0]
                offset += size
            allocated = allocate(targets, fulls, n_keep, multiple_of, min_width)  # ratio 0: every full width
            for n in names:
                widths[n], allocated = allocated[: tensors[n].shape[0]], allocated[tensors[n].shape[0]:]

    keep = {name: [torch.sort(_ranked(t[e])[:w]).values for e, w in enumerate(widths[name])]
            for name, t in tensors.items()}
    meta = dict(ratio=ratio, scope=scope, method=scores.method, multiple_of=multiple_of, min_width=min_width,
                normalize=normalize)
    full_widths = {name: [t.shape[1]] * t.shape[0] for name, t in tensors.items()}
    plan = PruningPlan(keep=keep, widths=full_widths, fingerprint=scores.fingerprint, meta=meta)
    if model is not None:
        from .prune import check_plan

        check_plan(model, plan)
    return plan
