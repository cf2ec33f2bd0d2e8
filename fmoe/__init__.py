"""fmoe: calibrate -> prune -> recover Mixture-of-Experts LMs: intermediate dims of routed experts (its own method),
and the other MoE compression methods (expert, layer and block drops, REAP, compressed experts) beside it."""

from . import methods
from .checkpoint import from_pretrained, save_pretrained
from .compressed import compress_experts
from .expert_drop import ExpertPlan, drop_experts, plan_experts
from .experts import RaggedExperts, find_experts, fingerprint
from .iterative import prune_iteratively
from .layer_drop import DropPlan, plan_block_drop, plan_layer_drop
from .methods import Calibration, apply_plan, calibrate, compress, load_plan
from .offline import prune_checkpoint, score_checkpoint
from .plan import PruningPlan, make_plan
from .prune import active_parameters, masked, prune, weight_bytes
from .reconstruct import reconstruct
from .scores import Scores
from .scoring import METHODS, score
from .statistics import Statistics, measure

__all__ = [
    "METHODS", "Calibration", "DropPlan", "ExpertPlan", "PruningPlan", "RaggedExperts", "Scores", "Statistics",
    "active_parameters", "apply_plan", "calibrate", "compress", "compress_experts", "drop_experts", "find_experts",
    "fingerprint", "from_pretrained", "load_plan", "make_plan", "masked", "measure", "methods", "plan_block_drop",
    "plan_experts", "plan_layer_drop", "prune", "prune_checkpoint", "prune_iteratively", "reconstruct",
    "save_pretrained", "score", "score_checkpoint", "weight_bytes",
]
__version__ = "0.1.0"
