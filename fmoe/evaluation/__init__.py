"""Evaluation: the toy's tasks and exact-match accuracy (tasks.py), lm-evaluation-harness on any model
(harness.py), critical dims (critical.py) and the recipe's report (report.py)."""

from .. import _aliases
from .harness import EVAL_EXTRA, check_tasks, lm_eval

__all__ = ["EVAL_EXTRA", "check_tasks", "lm_eval"]


def __getattr__(name: str):
    return _aliases.moved_name(__name__, name)  # names that moved elsewhere, deprecated
