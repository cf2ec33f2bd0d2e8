"""Iterative dim pruning: remove the budget in N steps, scoring the partly pruned model again before each step.

One shot ranks every dim by its importance in the dense model; once many dims are gone the survivors carry work
the removed ones did, and their importance changes. Here step s = 1..N removes a cumulative share r_s of the
routed intermediate dims, planned from scores of the model with the dims of steps 1..s-1 masked
(`fmoe.masked`: masked dims score 0), so each step sees the model it is cutting. At the end the last plan is
applied physically, and pruned == masked holds as for one shot (steps=1 *is* one shot).

    plan = fmoe.prune_iteratively(model, batches, 0.75, steps=5)      # Fisher, layer scope, linear schedule

Schedules: "linear" removes the same number of dims each step (r_s = amount * s / N); "geometric" the same share
of what remains (r_s = 1 - (1 - amount)^(s/N)), so later steps, which cut into more important dims, cut fewer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import torch
from torch import nn

from ... import _aliases
from ...calibration.scorer import score
from ...calibration.scores import Scores
from ...model.experts import fingerprint
from .plan import PruningPlan, make_plan
from .prune import masked, prune
from .refit import LAM, reconstruct as least_squares, recorded

SCHEDULES = ("linear", "geometric")


@_aliases.renamed(ratio="amount")
def step_amounts(amount: float, steps: int, schedule: str = "linear") -> list[float]:
    """The cumulative share of dims removed after each of `steps` steps; the last is `amount` exactly."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if not 0 <= amount < 1:
        raise ValueError(f"amount must be in [0, 1), got {amount}")
    if schedule == "linear":
        amounts = [amount * s / steps for s in range(1, steps)]
    else:
        amounts = [1 - (1 - amount) ** (s / steps) for s in range(1, steps)]
    return amounts + [amount]


def nest(plan: PruningPlan, scores: Scores, previous: PruningPlan | None) -> int:
    """Keep `plan` inside `previous` (in place): a dim a previous step removed stays removed. Masked dims score 0,
    so a plan only brings one back when an expert's width grew past its previous width (rounding to multiple_of,
    min_width, or the levels of max_widths) or an unmasked dim tied a masked one at 0; such an expert keeps its
    highest-scored previously kept dims instead (ties by index, as make_plan), at most as many as before.
    Returns how many dims the plan's widths asked for beyond the previous ones (0 in the usual case)."""
    if previous is None:
        return 0
    clipped = 0
    for name, keeps in plan.keep.items():
        for e, keep in enumerate(keeps):
            before = previous.keep[name][e]  # ascending
            if bool(torch.isin(keep, before).all()):
                continue
            width = min(keep.numel(), before.numel())
            clipped += keep.numel() - width
            order = torch.sort(scores.tensors[name][e][before].double(), descending=True, stable=True).indices
            keeps[e] = torch.sort(before[order[:width]]).values
    return clipped


def is_nested(plan: PruningPlan, previous: PruningPlan) -> bool:
    """Every dim `plan` keeps was kept by `previous`."""
    return all(bool(torch.isin(k, previous.keep[n][e]).all()) for n, ks in plan.keep.items() for e, k in enumerate(ks))


def plan_step(scores: Scores, amount: float, scope: str, previous: PruningPlan | None,
              model: nn.Module | None = None, **plan_options) -> PruningPlan:
    """One step's plan: make_plan at the step's cumulative `amount`, kept inside the previous step's (see `nest`)."""
    plan = make_plan(scores, amount, scope, model=model, **plan_options)
    plan.meta["clipped"] = nest(plan, scores, previous)
    if previous is not None and not is_nested(plan, previous):
        raise RuntimeError("an iterative step's plan keeps a dim a previous step removed")
    return plan


def iterate(model: nn.Module, amount: float, steps: int, scope: str, rescore: Callable[[int], Scores],
            schedule: str = "linear", after_step: Callable | None = None,
            decide: Callable[[Callable[[], PruningPlan]], PruningPlan] | None = None,
            **plan_options) -> tuple[PruningPlan, Scores]:
    """The steps of iterative pruning, without the physical edit: (final plan, last step's scores).

    `rescore(step)` scores `model` as it stands; it runs with the previous step's mask open. `decide(make)` runs
    the planning (default: here; Lightning: on rank 0, broadcast). `after_step(model, plan, step)` runs with the
    step's mask open and may change the weights; the final plan then names the model as it left the last step.
    Intermediate steps plan with max_widths=None (any widths), the last with the caller's options. On return no
    mask is open.
    """
    amounts = step_amounts(amount, steps, schedule)
    decide = decide or (lambda make: make())
    plan, scores, clipped = None, None, 0
    for step, r in enumerate(amounts, 1):
        options = plan_options if step == steps else {**plan_options, "max_widths": None}
        with masked(model, plan.keep) if plan is not None else nullcontext():
            scores = rescore(step)
            previous = plan
            plan = decide(lambda: plan_step(scores, r, scope, previous, model, **options))
        clipped += plan.meta.pop("clipped", 0)
        if after_step is not None:
            with masked(model, plan.keep):
                after_step(model, plan, step)
    plan.meta.update(steps=steps, schedule=schedule, step_ratios=amounts, clipped=clipped,
                     achieved=plan.removed_fraction())
    bound = plan_options.get("max_widths", 4)
    widest = max(len(set(ws)) for ws in plan.kept_widths().values())
    if clipped and bound is not None and widest > bound:
        warnings.warn(f"iterative pruning kept {clipped} dims removed that the last step's width levels asked back, "
                      f"which leaves up to {widest} distinct widths in a layer (max_widths={bound}); use "
                      "max_widths=None, multiple_of=1 or fewer steps to stay within the bound", stacklevel=2)
    if after_step is not None:
        plan.fingerprint = fingerprint(model)  # the weights after_step left are the ones the plan prunes
    return plan, scores


def scorer(model: nn.Module, batches, criterion: str | Callable[[nn.Module], Scores],
           progress: bool | None = None) -> Callable[[], Scores]:
    """() -> Scores of `model` as it stands (masks open included): `criterion` over `batches` (fmoe.score), or
    `criterion(model)` when it is a function."""
    return lambda: criterion(model) if callable(criterion) else score(model, batches, criterion, progress=progress)


@_aliases.renamed(ratio="amount", method="criterion")
def prune_iteratively(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | None,
    amount: float,
    steps: int = 5,
    criterion: str | Callable[[nn.Module], Scores] = "fisher",
    scope: str = "layer",
    schedule: str = "linear",
    after_step: Callable[[nn.Module, PruningPlan, int], None] | None = None,
    progress: bool | None = None,
    reconstruct: bool = False,
    lam: float = LAM,
    **plan_options,
) -> PruningPlan:
    """Remove `amount` (a share) of the routed intermediate dims of `model` in `steps` steps, scoring (`criterion`,
    over `batches`, which are iterated once per step: a list, not a generator) the partly pruned model before each,
    then prune physically (in place) with the final plan and return it.

    `criterion` is one of fmoe.score (a criterion, or a combination such as "rank_mean(compensated, router)"), or a
    function model -> Scores.
    `plan_options` are make_plan's (multiple_of, min_width, normalize, max_widths); `after_step(model, plan, step)`
    runs after each step's mask is in place (e.g. to reconstruct the layer outputs). Each step's kept dims are a
    subset of the previous step's. plan.meta records steps, schedule, step_ratios (the step_amounts), achieved (the
    share removed) and clipped (dims a step's rounding asked back and nesting kept removed, usually 0). steps=1 is the one-shot
    path: fmoe.make_plan on fmoe.score, then fmoe.methods.dims.prune. With `reconstruct`, the final cut is fmoe.reconstruct
    (the kept down columns refit by least squares, ridge `lam` towards the pruned weights, on the unpruned model's
    activations over `batches`), and plan.meta records it ("reconstruct": {"lam": lam}).
    """
    step_amounts(amount, steps, schedule)  # bad arguments fail before any scoring
    if (steps > 1 or reconstruct) and batches is not None and iter(batches) is batches:
        raise ValueError("batches are iterated once per step (and again to reconstruct): pass a list (or another "
                         "re-iterable), not an iterator")

    rescore = scorer(model, batches, criterion, progress)
    plan, _ = iterate(model, amount, steps, scope, lambda step: rescore(), schedule, after_step, **plan_options)
    if reconstruct:
        least_squares(model, plan, batches, lam=lam)
        plan = recorded(plan, lam)
    else:
        prune(model, plan)
    return plan


def __getattr__(name: str):
    return _aliases.moved_name(__name__, name)  # step_ratios, now step_amounts
