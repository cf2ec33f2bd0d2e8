"""Scores: one importance value per intermediate dim of every routed expert, with where they came from."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import _aliases
from ..io import atomic_directory

_TENSORS, _META = "scores.safetensors", "scores.json"


@_aliases.renamed(method="criterion")
@dataclass
class Scores:
    """tensors[name] = Tensor[E, I] (float32), name as in model.named_modules(); higher = more important.
    `criterion`: the scoring criterion that gave them (its spec, e.g. "rank_mean(compensated,router)"), saved as
    "method"."""

    tensors: dict[str, torch.Tensor]
    criterion: str
    fingerprint: str
    samples: int = 0
    tokens: int = 0
    meta: dict = field(default_factory=dict)
    method = _aliases.renamed_attribute("method", "criterion")

    def save(self, directory: str | Path) -> None:
        with atomic_directory(directory) as tmp:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp / _TENSORS))
            info = dict(format="fmoe.Scores/1", method=self.criterion, fingerprint=self.fingerprint,
                        samples=self.samples, tokens=self.tokens, meta=self.meta)
            (tmp / _META).write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> Scores:
        directory = Path(directory)
        if not (directory / _META).is_file() or not (directory / _TENSORS).is_file():
            raise FileNotFoundError(f"{directory} holds no fmoe scores ({_META} + {_TENSORS})")
        info = json.loads((directory / _META).read_text())
        if info.get("format") != "fmoe.Scores/1":
            raise ValueError(f"{directory / _META} is not an fmoe scores file (format={info.get('format')!r})")
        return cls(tensors=load_file(str(directory / _TENSORS)), criterion=info["method"],
                   fingerprint=info["fingerprint"], samples=info["samples"], tokens=info["tokens"],
                   meta=info.get("meta", {}))


def rank_mean(*scores: Scores) -> Scores:
    """Criteria combined by rank: each score becomes its rank among its module's dims (0 lowest, 1 highest), and
    the ranks are averaged. Scale-free, so criteria in different units (Fisher, router weight x activation) mix."""
    if len(scores) < 2 or len({s.fingerprint for s in scores}) != 1:
        raise ValueError("rank_mean combines two or more Scores of the same model (same fingerprint)")
    names = scores[0].tensors.keys()
    if any(s.tensors.keys() != names for s in scores):
        raise ValueError("rank_mean needs scores of the same experts modules")

    def ranks(t: torch.Tensor) -> torch.Tensor:  # ties share their mean rank (dead or masked dims: all 0)
        flat = t.flatten().double()
        ordered = flat.sort().values
        below = torch.searchsorted(ordered, flat, right=False).double()
        upto = torch.searchsorted(ordered, flat, right=True).double()
        return ((below + upto - 1) / 2 / max(1, flat.numel() - 1)).view_as(t)

    tensors = {n: (sum(ranks(s.tensors[n]) for s in scores) / len(scores)).float() for n in names}
    criterion = "rank_mean(" + ",".join(s.criterion for s in scores) + ")"
    return Scores(tensors, criterion, scores[0].fingerprint, scores[0].samples, scores[0].tokens, dict(scores[0].meta))


COMBINERS = {"rank_mean": rank_mean}  # name -> function(*Scores) -> Scores
_SPEC = re.compile(r"\s*(\w+)\s*(?:\((.*)\))?\s*")


def parse_criterion(spec: str, names: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """A scoring criterion: one of `names` ("fisher") or a combiner of COMBINERS over two or more of them
    ("rank_mean(compensated, router)") -> (combiner or None, criteria). A bad spec raises, listing what is valid."""
    valid = f"valid: {', '.join(names)}, or {' | '.join(COMBINERS)}(name, name, ...) over them"
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"malformed scoring criterion {spec!r}; {valid}")
    head, inner = match.groups()
    if inner is None:
        if head not in names:
            raise ValueError(f"unknown scoring criterion {head!r}; {valid}")
        return None, (head,)
    if head not in COMBINERS:
        raise ValueError(f"unknown combiner {head!r} in {spec!r}; {valid}")
    parts = tuple(p.strip() for p in inner.split(","))
    malformed = [p for p in parts if not re.fullmatch(r"\w+", p)]
    if malformed:
        raise ValueError(f"malformed scoring criterion {spec!r} (at {malformed[0]!r}); {valid}")
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise ValueError(f"unknown scoring criterion {unknown[0]!r} in {spec!r}; {valid}")
    if len(parts) < 2 or len(set(parts)) != len(parts):
        raise ValueError(f"{head} combines two or more different criteria, got {spec!r}; {valid}")
    return head, parts


def criterion_name(combiner: str | None, criteria: Sequence[str]) -> str:
    """The canonical spelling of a parsed criterion, as the combined Scores' `criterion` records it."""
    return criteria[0] if combiner is None else f"{combiner}({','.join(criteria)})"


def combine(combiner: str | None, parts: Sequence[Scores]) -> Scores:
    """The Scores of each criterion (in spec order) combined as the spec says."""
    return parts[0] if combiner is None else COMBINERS[combiner](*parts)


def ranked(values: torch.Tensor) -> torch.Tensor:
    """Indices by descending score, ties broken by ascending index (deterministic)."""
    return torch.sort(values, descending=True, stable=True).indices
