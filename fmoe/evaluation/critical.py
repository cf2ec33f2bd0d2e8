"""Critical dimensions: the few routed-expert dims a criterion ranks highest, and what removing them costs.

"Less is MoE" reports that a dozen top-Fisher dims can carry a whole skill. To test that on a model:

    removed = top_dims(scores, k=12)                     # or random_dims(scores, 12, seed) as the control
    with fmoe.masked(model, keep_except(scores, removed)):
        ...evaluate...                                   # the model without those 12 dims (weights untouched)

Dims are ranked over all experts of all layers by raw score (Fisher is in loss units, so raw scores compare across
layers); normalize="mean" divides each layer's scores by their mean first.
"""

from __future__ import annotations

import torch

from ..calibration.scores import Scores

Dims = dict[str, list[torch.Tensor]]  # {experts module name: [dims of expert e (ascending)]}


def _split(scores: Scores, chosen: torch.Tensor) -> Dims:
    """Flat indices over all modules' [E, I] tensors -> per-module, per-expert sorted dims."""
    dims, offset = {}, 0
    for name, t in scores.tensors.items():
        n_experts, width = t.shape
        local = chosen[(chosen >= offset) & (chosen < offset + t.numel())] - offset
        dims[name] = [torch.sort(local[local // width == e] % width).values for e in range(n_experts)]
        offset += t.numel()
    return dims


def _flat(scores: Scores, normalize: str) -> torch.Tensor:
    if normalize not in ("none", "mean"):
        raise ValueError(f"unknown normalize {normalize!r}; valid: none, mean")
    tensors = [t.double() for t in scores.tensors.values()]
    if normalize == "mean":
        tensors = [t / t.mean().clamp_min(1e-300) for t in tensors]
    return torch.cat([t.reshape(-1) for t in tensors])


def _check_k(scores: Scores, k: int) -> int:
    total = sum(t.numel() for t in scores.tensors.values())
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the model's routed dims), got {k}")
    return total


def top_dims(scores: Scores, k: int, normalize: str = "none") -> Dims:
    """The `k` highest-scored dims over every routed expert of every layer (ties: lowest index first)."""
    _check_k(scores, k)
    order = torch.sort(_flat(scores, normalize), descending=True, stable=True).indices
    return _split(scores, order[:k])


def random_dims(scores: Scores, k: int, seed: int = 0) -> Dims:
    """`k` dims drawn uniformly without replacement over every routed expert (the control for `top_dims`)."""
    total = _check_k(scores, k)
    return _split(scores, torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:k])


def keep_except(scores: Scores, removed: Dims) -> Dims:
    """Every dim except `removed`: a keep set for `fmoe.masked`."""
    keep = {}
    for name, t in scores.tensors.items():
        keep[name] = []
        for e in range(t.shape[0]):
            mask = torch.ones(t.shape[1], dtype=torch.bool)
            if name in removed:
                mask[removed[name][e]] = False
            keep[name].append(mask.nonzero().squeeze(1))
    return keep


def count(dims: Dims) -> int:
    return sum(int(d.numel()) for per_expert in dims.values() for d in per_expert)
