"""fmoe: calibrate -> prune -> recover Mixture-of-Experts LMs: intermediate dims of routed experts (its own method),
and the other MoE compression methods (expert, layer and block drops, REAP, compressed experts) beside it.

The package follows the pipeline: `model` (the MoE inside a model, and its files) -> `calibration` (one pass over
calibration batches) -> `methods` (plan and edit; one module per method) -> `recovery` and `lightning` (LoRA,
distillation, distributed runs) -> `evaluation`; `toy` is the shipped toy MoE, `recipes` the commands.
"""

from . import _aliases, methods
from .calibration.streamed import score
from .calibration.criteria import CRITERIA, METHODS
from .calibration.scores import Scores
from .calibration.statistics import Statistics
from .methods.compressed import compress_experts
from .methods.dims.iterative import prune_iteratively
from .methods.dims.plan import PruningPlan, make_plan
from .methods.dims.prune import active_parameters, masked, prune, weight_bytes
from .methods.dims.refit import reconstruct
from .methods.expert_drop import ExpertPlan, drop_experts, plan_experts
from .methods.layer_drop import DropPlan, plan_block_drop, plan_layer_drop
from .methods.offline import edit_checkpoint, prune_checkpoint, score_checkpoint
from .methods.registry import Calibration, apply_plan, calibrate, compress, load_plan, measure
from .model.checkpoint import from_pretrained, save_pretrained
from .model.experts import RaggedExperts, find_experts, fingerprint

__all__ = [
    "CRITERIA", "METHODS", "Calibration", "DropPlan", "ExpertPlan", "PruningPlan", "RaggedExperts", "Scores",
    "Statistics", "active_parameters", "apply_plan", "calibrate", "compress", "compress_experts", "drop_experts",
    "edit_checkpoint", "find_experts", "fingerprint", "from_pretrained", "load_plan", "make_plan", "masked", "measure",
    "methods", "plan_block_drop", "plan_experts", "plan_layer_drop", "prune", "prune_checkpoint", "prune_iteratively",
    "reconstruct", "save_pretrained", "score", "score_checkpoint", "weight_bytes",
]
__version__ = "0.1.0"
_aliases.install()


def __getattr__(name: str):
    return _aliases.old_module(name)  # the earlier flat layout's module paths, deprecated
