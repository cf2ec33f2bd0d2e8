"""Benchmarks through EleutherAI's lm-evaluation-harness, on any fmoe model in memory.

`lm_eval` wraps the model object itself (stock, ragged `RaggedExperts` after dim pruning, LoRA merged) in lm-eval's
`HFLM`, so a compressed model is judged without exporting it; a stock-loadable export can equally be run with
`lm_eval --model hf --model_args pretrained=DIR`. lm-eval is optional (`pip install fmoe[eval]`).

`toy_tasks_dir` writes one lm-eval task per toy domain (`fmoe_arithmetic`, `fmoe_facts`, `fmoe_general`), set up like
GSM8K: greedy generation, the final answer is what follows the last "####" (else the whole completion), compared
with all whitespace removed: the same extraction as fmoe.evaluation.tasks, so `exact_match` equals `fmoe.evaluation.tasks.accuracy`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

EVAL_EXTRA = "pip install fmoe[eval]"
TASK_PREFIX = "fmoe_"
MAX_GEN_TOKS = 48  # fmoe.evaluation.tasks.generate's default max_new_tokens

# One toy task: the prompt as context; the reference is the record's own worked completion (GSM8K style), and the
# metric strips everything up to the last "####" and all whitespace from prediction and reference alike, which is
# fmoe.evaluation.tasks.extract_answer / normalize. Only EOS stops generation, as in fmoe.evaluation.tasks.generate.
_TASK_TEMPLATE = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {data_files}
output_type: generate_until
training_split: train
validation_split: validation
test_split: test
fewshot_split: train
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{text[prompt|length:] if text is defined else ' #### ' ~ answer}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore:
      - "(?s).*####"
      - "\\\\s+"
generation_kwargs:
  until: {until}
  do_sample: false
  max_gen_toks: {max_gen_toks}
metadata:
  version: 1.0
"""


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(f"fmoe.evaluation needs lm-evaluation-harness: {EVAL_EXTRA}") from e
    return lm_eval, HFLM


def task_yaml(task: str, files: dict[str, str | Path], eos: str = "<|endoftext|>",
              max_gen_toks: int = MAX_GEN_TOKS) -> str:
    """The lm-eval task YAML of a jsonl task set ({split: path}, splits train/val/test as fmoe.toy.corpus writes them)."""
    missing = {"train", "val", "test"} - set(files)
    if missing:
        raise ValueError(f"task {task!r} lacks the splits {sorted(missing)}; has {sorted(files)}")
    data_files = {"train": str(files["train"]), "validation": str(files["val"]), "test": str(files["test"])}
    return _TASK_TEMPLATE.format(task=task, data_files=json.dumps(data_files), until=json.dumps([eos]),
                                 max_gen_toks=max_gen_toks)


def hflm(model: nn.Module, tokenizer, batch_size: int = 8):
    """lm-eval's HFLM around a model object already in memory (its device and dtype kept)."""
    _, HFLM = _require_lm_eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def flat_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of an lm-eval results dict: float metrics only (stderr entries, aliases and sample
    counts dropped), named as lm-eval names them, "<metric>,<filter>" (e.g. "exact_match,strict-match" for gsm8k)."""
    out = {}
    for task, metrics in results.items():
        out[task] = {k: float(v) for k, v in metrics.items()
                     if "_stderr" not in k and isinstance(v, float) and math.isfinite(v)}
    return out


def check_tasks(tasks: list[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager, after checking it knows every task (an error names the unknown ones)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" (task YAMLs read from {include_path})" if include_path is not None else ""
        raise ValueError(f"unknown lm-eval task(s) {unknown}{where}; `lm_eval ls tasks` lists the valid ones")
    return manager


def lm_eval(model: nn.Module | object, tokenizer, tasks: list[str] | str, limit: int | float | None = None,
            include_path: str | Path | None = None, batch_size: int = 8,
            num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval tasks on `model` in memory (any fmoe model: stock, ragged, LoRA merged; or an lm-eval LM such as
    an HFLM) -> {task: {metric: value}}. `limit`: records per task (a float < 1: a share); `include_path`: a
    directory of extra task YAMLs (e.g. `toy_tasks_dir()`); `num_fewshot`: None keeps each task's own setting.
    lm-eval seeds python's, numpy's and torch's global generators (its default seeds) for the run; their states are
    put back afterwards, so an evaluation does not change what a later training step draws."""
    lm_eval_pkg, _ = _require_lm_eval()
    from lm_eval.api.model import LM

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if isinstance(model, LM):
        lm = model
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to evaluate a model object")
        lm = hflm(model, tokenizer, batch_size)
    manager = check_tasks(tasks, include_path)
    was_training = getattr(model, "training", False)
    try:
        with _global_generators_kept():
            out = lm_eval_pkg.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                              batch_size=batch_size, task_manager=manager, log_samples=False,
                                              bootstrap_iters=0)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    return flat_metrics(out["results"])


@contextmanager
def _global_generators_kept() -> Iterator[None]:
    """Put python's, numpy's and torch's global generators (CPU and the current CUDA device) back as they were on
    exit: lm-eval seeds them, and an evaluation must not change what a later training step draws."""
    import random

    import numpy as np
    import torch

    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    python, numpy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
