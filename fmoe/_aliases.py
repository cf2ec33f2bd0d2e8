"""The module paths of fmoe's earlier flat layout (`fmoe.scoring`, `fmoe.plan`, ...), kept importable with a
DeprecationWarning: each resolves to the module that holds its code now. `fmoe.prune` and `fmoe.reconstruct` are
the functions (importing a module under those names would replace them): their modules are fmoe.methods.dims.prune
and fmoe.methods.dims.refit."""

from __future__ import annotations

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

NAMES_MOVED = {("fmoe.evaluation", "toy_tasks_dir"): "fmoe.toy"}  # (package, name) -> where the name is now


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
    """`package.name` of the old layout that lives elsewhere now, with a DeprecationWarning."""
    if (package, name) not in NAMES_MOVED:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    warnings.warn(f"{package}.{name} moved to {NAMES_MOVED[package, name]}.{name}", DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(NAMES_MOVED[package, name]), name)
