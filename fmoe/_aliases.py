"""Earlier names, kept working with a DeprecationWarning: the module paths of fmoe's earlier flat layout
(`fmoe.scoring`, `fmoe.plan`, ...), each resolving to the module that holds its code now; names that moved or were
renamed (`moved_name`); keyword arguments and attributes that were renamed (`renamed`, `renamed_attribute`: the
scoring criterion was `method`, the share removed `ratio`). `fmoe.prune` and `fmoe.reconstruct` are the functions
(importing a module under those names would replace them): their modules are fmoe.methods.dims.prune and
fmoe.methods.dims.refit."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old module -> new module
    "fmoe.checkpoint": "fmoe.model.checkpoint",
    "fmoe.compat": "fmoe.model.compat",
    "fmoe.experts": "fmoe.model.experts",
    "fmoe.loss": "fmoe.calibration.loss",
    "fmoe.scores": "fmoe.calibration.scores",
    "fmoe.scoring": "fmoe.calibration.scorer",
    "fmoe.statistics": "fmoe.calibration.statistics",
    "fmoe.plan": "fmoe.methods.dims.plan",
    "fmoe.iterative": "fmoe.methods.dims.iterative",
    "fmoe.expert_drop": "fmoe.methods.expert_drop",
    "fmoe.layer_drop": "fmoe.methods.layer_drop",
    "fmoe.compressed": "fmoe.methods.compressed",
    "fmoe.offline": "fmoe.methods.offline",
    "fmoe.distill": "fmoe.recovery.distill",
    "fmoe.tasks": "fmoe.evaluation.tasks",
    "fmoe.report": "fmoe.evaluation.report",
    "fmoe.critical": "fmoe.evaluation.critical",
    "fmoe.corpus": "fmoe.toy.corpus",
    "fmoe.tiny": "fmoe.toy.tiny",
    "fmoe.data": "fmoe.lightning.data",
}

NAMES_MOVED = {  # (module, old name) -> the name now, module included
    ("fmoe.evaluation", "toy_tasks_dir"): "fmoe.toy.toy_tasks_dir",
    ("fmoe.methods.dims.iterative", "step_ratios"): "fmoe.methods.dims.iterative.step_amounts",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module it moved to (the same module object: no second copy of its state)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; import it from there", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the module ran when it was imported under its own name


def install() -> None:
    """Make the old paths importable (idempotent)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())


def old_module(name: str):
    """`fmoe.<name>` of the old layout, for attribute access such as `fmoe.scores.rank_mean`."""
    if f"fmoe.{name}" not in MOVED:
        raise AttributeError(f"module 'fmoe' has no attribute {name!r}")
    return importlib.import_module(f"fmoe.{name}")


def moved_name(package: str, name: str):
    """`package.name`, an earlier name of what NAMES_MOVED says it is now, with a DeprecationWarning."""
    if (package, name) not in NAMES_MOVED:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    now = NAMES_MOVED[package, name]
    warnings.warn(f"{package}.{name} is now {now}", DeprecationWarning, stacklevel=3)
    module, _, new = now.rpartition(".")
    return getattr(importlib.import_module(module), new)


def renamed(**old_to_new: str):
    """Decorate a function (or a class: its __init__) whose keyword arguments were renamed, `old="new"`: the old
    keyword still works, with a DeprecationWarning."""

    def decorate(target):
        if isinstance(target, type):
            target.__init__ = decorate(target.__init__)
            return target
        name = target.__qualname__.removesuffix(".__init__")

        @functools.wraps(target)
        def accepting_old_names(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}() got {old}= and {new}=: {old} is the earlier name of {new}")
                    warnings.warn(f"{name}({old}=...) is deprecated: use {new}=", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return target(*args, **kwargs)

        return accepting_old_names

    return decorate


def renamed_attribute(old: str, new: str) -> property:
    """A read-only attribute `old`, the earlier name of attribute `new`, with a DeprecationWarning."""

    def read(self):
        warnings.warn(f"{type(self).__name__}.{old} is deprecated: use .{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(read, doc=f"Deprecated: `{new}`.")
