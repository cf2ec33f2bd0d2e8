"""What a recipe's console shows: per stage a header line, a progress bar where it takes time, and its result.

The libraries a run drives also speak: each Trainer announces the devices, lm-eval notes that it was handed a model
object, deprecation warnings name calls inside other libraries. `quiet()` drops the messages fmoe understands, where
they arise and narrowly: a logger and a message pattern (`LOGS`), or a warning category and a message regex
(`WARNINGS`); errors and fmoe's own warnings always show. A recipe installs it for its run (`--verbose` leaves
everything on); importing fmoe changes no logging or warnings settings.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from functools import partial
from unittest import mock

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities import rank_zero_only

# logger: the messages (regexes matched at the start) that a run explains itself
LOGS = {
    "lightning.pytorch.utilities.rank_zero": (
        r"(GPU|TPU) available: ",  # every stage's Trainer lists the accelerators
        r"`Trainer\.fit` stopped: `max_(epochs|steps)=\d+` reached",  # how calibration and recovery are meant to end
        r"\W*Tip: .*litlogger",  # an advertisement for Lightning's cloud logger
    ),
    "lightning.pytorch.accelerators.cuda": (r"LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES: ",),  # per stage and rank
    "lm_eval.models.huggingface": (  # fmoe hands lm-eval the model object, on one process, on purpose
        r"`pretrained` model kwarg is not of type `str`",
        r"Passed an already-initialized model through `pretrained`",
    ),
    # bitsandbytes (imported by peft) looks for an optional CPU kernel on the Hub; fmoe runs no 4-bit layers
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward from kernels-community",),
    "kernels._internals.hf_hub": (  # the same lookup, offline
        r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",),
}

# (category, message regex matched at the start) of the warnings that a run explains itself
WARNINGS = (
    (UserWarning, r"No seed found, seed set to 0"),  # the CLI's default seed; "Seed set to 0" still says it
    (PossibleUserWarning, r"Found \d+ module\(s\) in eval mode"),  # calibration scores in eval mode on purpose
    (UserWarning, r"You passed in a `val_dataloader` but have no `validation_step`"),  # calibration validates nothing
    # per epoch: the recovery's steps span epochs, and its logger still records every log_every_n_steps of them
    (PossibleUserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch, on Lightning's own call
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),  # transformers, on peft's own call
)

_QUIET = ContextVar("fmoe_console_quiet", default=False)
_STARTED: dict[str, float] = {}  # stage: when its header was printed


@contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Drop the messages of LOGS and WARNINGS (and quiet lm-eval, see `quiet_lm_eval`) until the block ends;
    `verbose`: drop nothing."""
    if verbose:
        yield
        return
    filters = [(logging.getLogger(name), _dropping(patterns)) for name, patterns in LOGS.items()]
    with warnings.catch_warnings():
        for category, message in WARNINGS:
            warnings.filterwarnings("ignore", message, category)
        for logger, drop in filters:
            logger.addFilter(drop)
        token = _QUIET.set(True)
        try:
            yield
        finally:
            _QUIET.reset(token)
            for logger, drop in filters:
                logger.removeFilter(drop)


@contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Inside `quiet()`, an lm-eval run without git's complaint outside a repository and without the bar over
    building each task's requests (the bar over running them stays); outside it, lm-eval as it is."""
    if not _QUIET.get():
        yield
        return
    import lm_eval.api.task
    import lm_eval.evaluator

    with ExitStack() as patches:
        patches.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", _git_commit_hash))
        patches.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", partial(lm_eval.api.task.tqdm,
                                                                                   disable=True)))
        yield


@rank_zero_only
def header(stage: str, text: str) -> None:
    """The line a stage starts with (rank 0 only): `[stage] what it does`."""
    _STARTED[stage] = time.perf_counter()
    print(f"[{stage}] {text}", flush=True)


@rank_zero_only
def result(stage: str, text: str) -> None:
    """The line a stage ends with (rank 0 only): `[stage] done in <seconds since its header> s: result`."""
    seconds = time.perf_counter() - _STARTED.pop(stage, time.perf_counter())
    print(f"[{stage}] done in {seconds:.1f} s: {text}", flush=True)


def metrics(row: dict) -> str:
    """`name value, ...` of a row of numbers (floats to 3 decimals)."""
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())


def _dropping(patterns: tuple[str, ...]):
    """A logging filter that drops the records below ERROR whose message matches one of `patterns` at its start."""
    compiled = [re.compile(p) for p in patterns]

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(p.match(record.getMessage()) for p in compiled)

    return keep


def _git_commit_hash() -> str | None:
    """lm-eval's get_git_commit_hash (the working directory's commit, for its results) without git's
    `fatal: not a git repository` on stderr when there is none."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())
