"""The compression methods. Each module registers its methods in `METHODS` (registry.py) on import: the planner
(`plan(model, calibration, amount, **options)` -> a plan that saves as JSON), the physical edit, and what it reads
from a calibration. A new method is one module here that calls `register`, plus its import below.

    calibration = fmoe.calibrate(model, batches)                # dim scores + expert/layer statistics, one pass
    plan = fmoe.compress(model, "reap", 0.25, calibration)      # plan from the calibration, then the physical edit
"""

# each registers its methods; this order is METHODS' order
from . import dims, expert_drop, layer_drop, compressed  # noqa: F401  isort: skip
from .registry import (METHODS, Calibration, Method, apply_plan, calibrate, check, compress, load_plan, make, measure,
                       method, options_of, plan_from_dict, register)

__all__ = ["METHODS", "Calibration", "Method", "apply_plan", "calibrate", "check", "compress", "load_plan", "make",
           "measure", "method", "options_of", "plan_from_dict", "register"]
