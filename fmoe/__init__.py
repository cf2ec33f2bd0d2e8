"""fmoe: calibrate -> prune -> recover Mixture-of-Experts LMs by the intermediate dims of their routed experts."""

from .checkpoint import from_pretrained, save_pretrained
from .experts import RaggedExperts, find_experts, fingerprint
from .offline import prune_checkpoint, score_checkpoint
from .plan import PruningPlan, make_plan
from .prune import masked, prune, weight_bytes
from .scores import Scores
from .scoring import METHODS, score
from .statistics import Statistics, measure

__all__ = [
    "METHODS", "PruningPlan", "RaggedExperts", "Scores", "Statistics", "find_experts", "fingerprint",
    "from_pretrained", "make_plan", "masked", "measure", "prune", "prune_checkpoint", "save_pretrained", "score",
    "score_checkpoint", "weight_bytes",
]
__version__ = "0.1.0"
