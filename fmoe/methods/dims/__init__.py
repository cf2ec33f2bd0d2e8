"""Dims (Less is MoE): remove the lowest-scored intermediate dims of every routed expert.

plan.py ranks dims and sets each expert's width (scope expert / layer / global); prune.py slices them out (or masks
them, for what-if evaluation); iterative.py prunes in steps, rescoring in between; sequential.py layer after
layer, each layer planned on the activations of the layers already cut; refit.py refits the kept down projections
by least squares.
"""

from __future__ import annotations

from ..registry import Method, register
from .plan import PruningPlan, check_options, make_plan
from .prune import prune


def _dims(model, calibration, amount, scope="layer", multiple_of=16, min_width=None, normalize="mean",
          max_widths=4):
    scores = calibration.need("scores", "dims", model)
    return make_plan(scores, amount, scope, multiple_of=multiple_of, min_width=min_width, normalize=normalize,
                     max_widths=max_widths, model=model)  # achieved: of routed dims, of routed parameters up to biases


register("dims", Method(_dims, prune, PruningPlan, "scores", "remove intermediate dims of routed experts",
                        check=check_options))
