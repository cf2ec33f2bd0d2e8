"""Pruning plans: which intermediate dims each routed expert keeps, decided from Scores (no model needed)."""

from __future__ import annotations

import json
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
    """Nearest multiple of `multiple_of`, at least `min_width`, at most the full width."""
    rounded = multiple_of * round(width / multiple_of)
    return int(min(full, max(rounded, min_width)))


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
    strides), never below `min_width` (default: multiple_of). With `model`, the plan is checked against it
    (scores of another model are refused).
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
    if min_width < 1:
        raise ValueError(f"min_width must be >= 1, got {min_width}")

    tensors = {name: t.double() for name, t in scores.tensors.items()}
    if scope == "global" and normalize == "mean":
        tensors = {name: t / t.mean().clamp_min(1e-300) for name, t in tensors.items()}

    # Target kept count per expert, before rounding.
    targets: dict[str, list[float]] = {}
    if scope == "expert":
        targets = {name: [t.shape[1] * (1 - ratio)] * t.shape[0] for name, t in tensors.items()}
    else:
        groups = [list(tensors)] if scope == "global" else [[name] for name in tensors]
        for names in groups:
            flat = torch.cat([tensors[n].reshape(-1) for n in names])
            n_keep = round(flat.numel() * (1 - ratio))
            chosen = torch.zeros(flat.numel(), dtype=torch.bool)
            chosen[_ranked(flat)[:n_keep]] = True
            offset = 0
            for n in names:
                size = tensors[n].numel()
                targets[n] = chosen[offset : offset + size].view_as(tensors[n]).sum(1).tolist()
                offset += size

    keep = {}
    for name, t in tensors.items():
        full = t.shape[1]
        keep[name] = []
        for e, target in enumerate(targets[name]):
            width = full if ratio == 0 else round_width(target, full, multiple_of, min(min_width, full))
            keep[name].append(torch.sort(_ranked(t[e])[:width]).values)
    meta = dict(ratio=ratio, scope=scope, method=scores.method, multiple_of=multiple_of, min_width=min_width,
                normalize=normalize)
    widths = {name: [t.shape[1]] * t.shape[0] for name, t in tensors.items()}
    plan = PruningPlan(keep=keep, widths=widths, fingerprint=scores.fingerprint, meta=meta)
    if model is not None:
        from .prune import check_plan

        check_plan(model, plan)
    return plan
