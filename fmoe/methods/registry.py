"""Every compression method in one registry: what it reads from a calibration, how it plans, how it edits.

    calibration = fmoe.calibrate(model, batches)                # dim scores + expert/layer statistics, one pass
    plan = fmoe.compress(model, "reap", 0.25, calibration)      # plan from the calibration, then the physical edit
    plan.save("plan.json")

Methods combine: `calibration.after(plan, model)` carries the dim scores over an expert drop, so the survivors'
dims can be slimmed next. A method is a `Method` in `METHODS` (a plain dict, as peft registers its tuners): `plan(model, calibration, amount,
**options)` returns plain data that saves as JSON, `edit(model, plan)` applies it in place. `amount` is the share of
routed expert parameters removed (of routed experts computed per token, for compressed experts); plans report
what they reached in `plan.meta["achieved"]`. The Lightning callbacks and the recipe look methods up here, so a
new method needs one entry and no other code.

| method | reads | removes |
|---|---|---|
| dims | dim scores (fisher, ...) | intermediate dims of routed experts (Less is MoE) |
| expert_drop | mean router probability | whole experts per layer (unified MoE compression) |
| expert_frequency | share of tokens routed | whole experts |
| reap | routing weight x expert output norm | whole experts (REAP) |
| expert_fisher | expert-level Fisher | whole experts |
| layer_drop | cos(x', x' + MoE(norm(x'))) | MoE sublayers (norm, router, routed and shared experts) |
| block_drop | cos(h_l, h_l+n) | whole decoder blocks |
| compressed_experts | (nothing: trained) | auxiliary experts' compute, replaced by trained vectors |
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _aliases
from ..calibration.scorer import Scorer
from ..calibration.scores import Scores
from ..calibration.statistics import Statistics
from ..model.experts import fingerprint, on_meta


@dataclass
class Calibration:
    """What one calibration pass measured: dim scores and/or expert and layer statistics."""

    scores: Scores | None = None
    statistics: Statistics | None = None

    def need(self, what: str, method: str, model: nn.Module | None):
        """The scores or statistics `method` plans from, measured on this very model (an empty model, planned out
        of core, is checked when the plan is applied to its checkpoint)."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"method {method!r} plans from {what}, which this calibration did not measure "
                             f"(fmoe.calibrate, or CalibrationModule(structure=True) for statistics)")
        if model is not None and not on_meta(model) and value.fingerprint != fingerprint(model):
            raise ValueError(f"method {method!r}: the {what} were measured on another model (fingerprint "
                             f"{value.fingerprint} != {fingerprint(model)}); calibrate the model being compressed")
        return value

    def after(self, plan, model: nn.Module) -> Calibration:
        """What this calibration still tells about `model` once an expert drop `plan` was applied to it: the dim
        scores of the kept experts, so their dims can be slimmed next with no second pass (statistics describe
        the experts and layers before the drop and are not carried)."""
        carry = getattr(plan, "carry_scores", None)  # plans whose edit keeps the scored dims (an expert drop)
        if carry is None:
            raise ValueError(f"only an expert drop carries a calibration over to the edited model, not a "
                             f"{type(plan).__name__}: calibrate the edited model again")
        return Calibration(carry(self.need("scores", "dims", None), model))


@_aliases.renamed(method="criterion")
def calibrate(model: nn.Module | str | Path, batches: Iterable[Mapping[str, torch.Tensor]], criterion: str = "fisher",
              progress: bool | None = None, *, streamed: bool = False, **stream_options) -> Calibration:
    """Dim scores (`criterion`: one a fmoe.calibration.scorer.Scorer runs, combinations included) and expert and
    layer statistics of `model`, from one pass over calibration `batches` (dicts with input_ids and optionally
    attention_mask, labels).

    `model` may be a checkpoint directory: the calibration is then streamed, one decoder layer resident at a time
    (fmoe.calibration.streamed; `stream_options`: chunk, offload_dir, device, dtype), with the same results.
    `streamed=True` runs an in-memory model the same way."""
    if streamed or not isinstance(model, nn.Module):
        from ..calibration.streamed import streamed_scorer

        scorer = streamed_scorer(model, batches, criterion, structure=True, progress=progress, **stream_options)
        return Calibration(scorer.result(), scorer.statistics())
    if stream_options:
        raise TypeError(f"{sorted(stream_options)} apply to a streamed calibration (streamed=True or a checkpoint "
                        "directory)")
    progress = sys.stderr.isatty() if progress is None else progress
    scorer = Scorer(model, criterion, structure=True)
    with scorer.attached():
        for batch in tqdm(batches, disable=not progress, desc=f"calibrating ({criterion})"):
            scorer.step(batch)
    return Calibration(scorer.result(), scorer.statistics())


@dataclass(frozen=True)
class Method:
    plan: Callable[..., Any]  # (model, calibration, amount, **options) -> plan
    edit: Callable[[nn.Module, Any], nn.Module]  # (model, plan) -> model, physical and in place
    plan_type: type  # what `plan` returns (its `load` reads a saved plan)
    reads: str  # "scores", "statistics" or "" (nothing from calibration)
    about: str
    check: Callable[..., None] | None = None  # (amount, **options): refuses values the planner would refuse


METHODS: dict[str, Method] = {}  # name -> Method; each method's module registers its entries (fmoe.methods)


def register(name: str, entry: Method) -> Method:
    """Add compression method `name` to METHODS (what the API, the callbacks and the recipe look up)."""
    if name in METHODS:
        raise ValueError(f"compression method {name!r} is registered already")
    METHODS[name] = entry
    return entry


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown compression method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


def _options(name: str) -> set[str]:
    """The options method `name`'s planner takes (its keyword parameters besides model, calibration, amount)."""
    import inspect

    return set(inspect.signature(method(name).plan).parameters) - {"model", "calibration", "amount"}


def options_of(name: str, options: dict) -> dict:
    """The entries of `options` that method `name`'s planner takes (a recipe passes one flat set of options)."""
    accepted = _options(name)
    return {k: v for k, v in options.items() if k in accepted}


def check(name: str, amount: float | None, **options) -> None:
    """Refuse what method `name`'s planner would refuse that needs no model or calibration (the name, the amount,
    unknown options, values outside their choices), so a run fails before its calibration is spent."""
    accepted = _options(name)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"method {name!r} takes no option {unknown}; its options: {', '.join(sorted(accepted))}")
    count = options.get("count")
    if amount is None and count is None and options.get("main") is None:
        raise ValueError(f"method {name!r} needs an amount (the share removed) or a count")
    if amount is not None and not (isinstance(amount, (int, float)) and 0 <= amount < 1):
        raise ValueError(f"amount is the share removed, in [0, 1); got {amount!r}")
    if count is not None and (not isinstance(count, int) or count < 0):
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if method(name).check is not None:
        method(name).check(amount, **options)


def check_choices(name: str, options: dict, **choices: tuple[str, ...]) -> None:
    """Refuse an option of method `name` outside its choices (choices: option -> valid values)."""
    for key, valid in choices.items():
        if key in options and options[key] not in valid:
            raise ValueError(f"unknown {key} {options[key]!r} for method {name!r}; valid: {', '.join(valid)}")


def make(model: nn.Module, name: str, amount: float | None, calibration: Calibration | None = None, **options):
    """The plan of method `name` for `model` at `amount` (options: the method's own, e.g. scope, mode, count)."""
    return method(name).plan(model, calibration or Calibration(), amount, **options)


def compress(model: nn.Module, name: str, amount: float | None, calibration: Calibration | None = None, **options):
    """Plan with method `name` and apply the plan physically (in place); returns the plan."""
    plan = make(model, name, amount, calibration, **options)
    method(name).edit(model, plan)
    return plan


def plan_formats() -> dict[str, type]:
    """{format string: plan class} of every registered method."""
    return {entry.plan_type.FORMAT: entry.plan_type for entry in METHODS.values()}


def load_plan(path: str | Path):
    """Any saved fmoe plan, by its format."""
    found = json.loads(Path(path).read_text()).get("format")
    formats = plan_formats()
    if found not in formats:
        raise ValueError(f"{path} is not an fmoe plan (format={found!r}; valid: {', '.join(formats)})")
    return formats[found].load(path)


def plan_from_dict(data: dict):
    """Any fmoe plan from its `to_dict()`, by its format (e.g. a plan a Lightning checkpoint carries)."""
    found = data.get("format") if isinstance(data, dict) else None
    formats = plan_formats()
    if found not in formats:
        raise ValueError(f"not an fmoe plan (format={found!r}; valid: {', '.join(formats)})")
    return formats[found].from_dict(data)


def apply_plan(model: nn.Module, plan) -> nn.Module:
    """Apply any fmoe plan with the edit registered for its type."""
    for entry in METHODS.values():
        if isinstance(plan, entry.plan_type):
            return entry.edit(model, plan)
    raise TypeError(f"not an fmoe plan: {type(plan).__name__}")


def measure(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], fisher: bool = True,
            progress: bool | None = None) -> Statistics:
    """Expert- and layer-level statistics of `model` over calibration `batches` (dicts with input_ids and optionally
    attention_mask, labels), from one pass with the dim scorer (criterion "fisher", or "activation" without `fisher`:
    forward only, no expert Fisher). Weights are left untouched."""
    return calibrate(model, batches, "fisher" if fisher else "activation", progress).statistics
