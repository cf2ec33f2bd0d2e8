"""Task accuracy: greedy generation from a prompt, exact match of the final answer.

A task record is {"prompt": ..., "answer": ...} (and usually "text" = prompt + worked completion, for training and
perplexity). The final answer of a completion is what follows its last "####" (GSM8K's convention), else the whole
completion up to EOS; answers are compared with all whitespace removed, so "3 0" (digit-split tokens) equals "30".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ANSWER_MARK = "####"


def normalize(answer: str) -> str:
    return "".join(str(answer).split())


def extract_answer(completion: str) -> str:
    """The final answer of a generated completion, whitespace-free."""
    return normalize(completion.rsplit(ANSWER_MARK, 1)[-1])


def load_tasks(path: str | Path, limit: int | None = None) -> tuple[list[str], list[str]]:
    """(prompts, answers) of a jsonl file of task records; a clear error if a record lacks either field."""
    prompts, answers = [], []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row or "answer" not in row:
            raise KeyError(f"{path} line {i + 1} is not a task record: needs 'prompt' and 'answer', has {sorted(row)}")
        prompts.append(row["prompt"])
        answers.append(str(row["answer"]))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"{path} holds no task records")
    return prompts, answers


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 48,
             batch_size: int = 64, synced: bool = False) -> list[str]:
    """Greedy completions (text after the prompt, up to EOS) of a batch of prompts, left-padded. `synced`: keep
    stepping until every rank is done (a sharded model's forward is a collective; needs equal prompt counts)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 synced_gpus=synced)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def exact_match(model: nn.Module, tokenizer, prompts: list[str], answers: list[str], **generate_kwargs) -> list[bool]:
    """Per record: does the greedy completion's final answer equal the reference answer?"""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    completions = generate(model, tokenizer, prompts, **generate_kwargs)
    return [extract_answer(c) == normalize(a) for c, a in zip(completions, answers)]


def accuracy(model: nn.Module, tokenizer, prompts: list[str], answers: list[str], **generate_kwargs) -> float:
    """Share of records answered exactly."""
    hits = exact_match(model, tokenizer, prompts, answers, **generate_kwargs)
    return sum(hits) / len(hits)
