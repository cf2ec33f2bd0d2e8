"""Checkpoints of LightningModules whose model was compressed: they carry the plans, and loading applies them first.

A compression callback edits the model's shapes in place, so a checkpoint saved afterwards holds a state dict that
a freshly built (dense) module cannot load. The callbacks record each plan they apply on the model
(`record_plan`); a checkpoint then stores them, in order, as JSON under "fmoe_plans" (`save_plans`), and loading
re-applies those the module's models lack before the state dict loads (`restore_plans`). Lightning calls the
module's own hooks for that, in `load_from_checkpoint` and in `trainer.fit(..., ckpt_path=...)`, so a module mixes
in `RestorePlans` (CalibrationModule does it itself):

    class MyLM(RestorePlans, L.LightningModule): ...
    MyLM.load_from_checkpoint(path)        # the pruned shapes, then the pruned weights

Only shapes come from a plan: the weights (including a least-squares refit or training after the edit) are the
checkpoint's, so a plan applies to the freshly built model whatever weights it starts from.
"""

from __future__ import annotations

import json

from torch import nn

from ..methods.registry import apply_plan, plan_from_dict
from ..model.experts import fingerprint, on_meta
from .sharding import is_sharded

PLANS_KEY = "fmoe_plans"  # checkpoint entry: {submodule name: [plan JSON, in the order applied]}
_APPLIED = "_fmoe_plans"  # model attribute: the plans applied to it since it was built, as JSON


def record_plan(model: nn.Module, plan) -> None:
    """Note that `plan` was applied to `model` (in place), so checkpoints of a module holding it rebuild its shapes."""
    model.__dict__.setdefault(_APPLIED, []).append(json.dumps(plan.to_dict()))


def applied_plans(model: nn.Module) -> list[str]:
    """The plans applied to `model` since it was built (JSON, in order)."""
    return list(model.__dict__.get(_APPLIED, []))


def save_plans(module: nn.Module, checkpoint: dict) -> None:
    """Store in `checkpoint` the plans applied to every model inside `module` (nothing when none was edited)."""
    plans = {name: applied_plans(m) for name, m in module.named_modules() if applied_plans(m)}
    if plans:
        checkpoint[PLANS_KEY] = plans


def restore_plans(module: nn.Module, checkpoint: dict) -> None:
    """Apply to the models inside `module` the plans `checkpoint` records that they lack (before its state dict
    loads); a model already edited otherwise is an error."""
    for name, plans in checkpoint.get(PLANS_KEY, {}).items():
        try:
            model = module.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"the checkpoint holds plans for {name!r}, which {type(module).__name__} does not "
                             "have") from err
        done = applied_plans(model)
        if plans[:len(done)] != done:
            raise ValueError(f"{name!r} was edited by plans the checkpoint does not record: build it as the "
                             "checkpoint's module was built (before any compression)")
        if len(plans) > len(done) and is_sharded(model):
            raise ValueError(f"{name!r} is sharded already (ModelParallelStrategy restores a checkpoint after "
                             "sharding) and cannot be cut: build the module with `load_from_checkpoint` first, "
                             "which applies the checkpoint's plans, then fit it with ckpt_path")
        for text in plans[len(done):]:
            plan = plan_from_dict(json.loads(text))
            if hasattr(plan, "fingerprint") and not on_meta(model):
                plan.fingerprint = fingerprint(model)  # the checkpoint's weights replace these: only shapes must fit
            apply_plan(model, plan)
            model.__dict__.setdefault(_APPLIED, []).append(text)


class RestorePlans:
    """LightningModule mixin: its checkpoints carry the plans applied to its models, and loading one applies them
    before the state dict (`load_from_checkpoint`, `trainer.fit(..., ckpt_path=...)`). List it before
    L.LightningModule; a subclass overriding these hooks calls super()."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        save_plans(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        restore_plans(self, checkpoint)
