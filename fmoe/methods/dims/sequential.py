"""Sequential dim pruning: plan the MoE layers one after another in model order, each from the activations that the
already-cut earlier layers give it (the layer order of GPTQ and SparseGPT).

One shot scores every layer on the dense model, then cuts all of them. Here layer l is planned from scores of the
model with layers 0..l-1 masked by their plans (`fmoe.masked`), with the same amount and scope as every layer;
with `reconstruct`, its kept down columns are then refit by least squares (as `fmoe.reconstruct`) on Gram sums
gathered with layers 0..l-1 already cut and refit, so each layer is planned and refit for the inputs it will see.
It is the sibling of `prune_iteratively`, which orders the cut over steps of the budget instead of over layers.

    plan = fmoe.prune_sequentially(model, batches, 0.75, "fisher")

Measured on the toy (docs/quality.md, "Sequential pruning"; benchmarks/sequential.py, 50% and 75%, with and
without least squares): it keeps more than one shot in one configuration, Fisher at 75% without least squares
(arithmetic / facts 0.01 / 0.08 one shot -> 0.38 / 0.60), where iterative Fisher keeps more still; elsewhere with
Fisher it moves both ways (75% with least squares 0.44 -> 0.11, 50% plain 0.95 -> 0.84). For router, compensated
and rank(compensated, router) it is within noise of one shot, or worse (compensated + least squares at 75%).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ...calibration.gram import gather
from ...calibration.scores import Scores
from ...model.experts import expert_widths, find_experts, fingerprint
from .iterative import scorer
from .plan import PruningPlan, check_options, check_plan, make_plan
from .prune import masked, prune
from .refit import LAM, recorded, solutions, write


def prune_sequentially(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | None,
    amount: float,
    criterion: str | Callable[[nn.Module], Scores] = "router",
    scope: str = "layer",
    reconstruct: bool = False,
    lam: float = LAM,
    progress: bool | None = None,
    **plan_options,
) -> PruningPlan:
    """Remove `amount` (a share) of the routed intermediate dims of every MoE layer of `model`, layer after layer:
    layer l's plan is make_plan (`scope` "layer" or "expert", `plan_options` as make_plan's) on its scores
    (`criterion`, as fmoe.score or a function model -> Scores, over `batches`: a list, iterated once per layer)
    measured with layers 0..l-1 masked by their plans. Then prune physically (in place) and return the plan, whose
    kept dims index the original widths.

    Without `reconstruct` the plan names the dense model: `fmoe.prune` or `fmoe.prune_checkpoint` applies it. With
    it, each layer's kept down columns (and down bias) are refit (ridge `lam`, as fmoe.reconstruct) on Gram sums
    gathered with the earlier layers cut and refit, before the next layer is scored; the plan then names the refit
    weights (plan.meta records "reconstruct") and is not a plan for the dense checkpoint.

    With one MoE layer this is one shot. Scores of a layer depend only on the layers before it for forward
    criteria (router, activation, compensated); Fisher's gradient also flows back through the later layers, which
    are still dense when layer l is scored. Scope "global" is refused: it ranks dims across layers, so it has no
    layer order. plan.meta records sequential=True and achieved (the share removed).

    On the toy it kept more than one shot only with Fisher at 75% without reconstruction (arithmetic 0.01 -> 0.38),
    and less than prune_iteratively there; for router, compensated and their rank mix it matched one shot or lost
    (see the module documentation and docs/quality.md).
    """
    check_options(amount, scope, **plan_options)
    if scope == "global":
        raise ValueError("scope 'global' ranks dims across layers, so it has no layer order to prune in: prune "
                         "sequentially with scope 'layer' or 'expert', or use scope 'global' one shot")
    if batches is not None and iter(batches) is batches:
        raise ValueError("batches are iterated once per MoE layer: pass a list (or another re-iterable), not an "
                         "iterator")
    rescore = scorer(model, batches, criterion, progress)
    keep, meta = {}, {}
    for name in find_experts(model):
        with masked(model, keep):  # the plans of the layers before this one
            scores = rescore()
            layer = make_plan(Scores({name: scores.tensors[name]}, scores.criterion, scores.fingerprint), amount,
                              scope, **plan_options)
            if reconstruct:
                write(model, solutions(gather(model, batches, [name]), layer, lam), keep=layer.keep)
        keep[name], meta = layer.keep[name], layer.meta
    widths = {name: expert_widths(module) for name, module in find_experts(model).items()}
    plan = PruningPlan(keep=keep, widths=widths, fingerprint=fingerprint(model), meta={**meta, "sequential": True})
    plan.meta["achieved"] = plan.removed_fraction()
    check_plan(model, plan)
    prune(model, plan)
    return recorded(plan, lam) if reconstruct else plan
