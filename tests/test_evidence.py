"""What the shipped toy MoE shows about criteria and scopes (docs/quality.md has the full benchmark).

Deterministic: the shipped weights, Fisher on the first 256 arithmetic training problems (as benchmarks/quality.py),
exact match on the first 100 arithmetic / all facts test records. Margins are well inside the measured effects.
"""

import pytest
import torch

import fmoe
from fmoe import toy
from fmoe.evaluation.critical import keep_except, random_dims, top_dims
from fmoe.evaluation.tasks import accuracy, load_tasks


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tokenizer, config = toy.load()
    files = toy.corpus_files(config)
    texts = [r["text"] for r in toy.read_jsonl(files["arithmetic"]["train"])[:256]]
    batches = toy.batches(tokenizer, texts, batch_size=16)
    tasks = {"arithmetic": load_tasks(files["arithmetic"]["test"], 100), "facts": load_tasks(files["facts"]["test"])}
    scores = {m: fmoe.score(model, batches, m, progress=False) for m in ("fisher", "magnitude", "random")}

    def acc(domain, keep=None):
        if keep is None:
            return accuracy(model, tokenizer, *tasks[domain])
        with fmoe.masked(model, keep):
            return accuracy(model, tokenizer, *tasks[domain])

    return model, scores, acc


def test_shipped_model_has_learned_arithmetic_and_facts(setup):
    _, _, acc = setup
    assert acc("arithmetic") >= 0.95 and acc("facts") >= 0.9


def test_a_few_top_fisher_dims_carry_arithmetic_but_not_facts(setup):
    _, scores, acc = setup
    fisher = scores["fisher"]
    dense = acc("arithmetic")
    assert acc("arithmetic", keep_except(fisher, top_dims(fisher, 32))) < dense - 0.3  # 32 of 4096 dims
    assert acc("arithmetic", keep_except(fisher, random_dims(fisher, 32, seed=0))) > dense - 0.1
    assert acc("facts", keep_except(fisher, top_dims(fisher, 128))) >= acc("facts") - 0.03  # knowledge survives


def test_at_half_the_dims_fisher_with_layer_scope_keeps_arithmetic(setup):
    model, scores, acc = setup

    def at_half(criterion, scope):
        return acc("arithmetic", fmoe.make_plan(scores[criterion], 0.5, scope, multiple_of=1, model=model))

    fisher_layer = at_half("fisher", "layer")
    assert fisher_layer >= acc("arithmetic") - 0.05
    assert fisher_layer > at_half("magnitude", "layer") + 0.15
    assert fisher_layer > at_half("random", "layer") + 0.5
    assert fisher_layer > at_half("fisher", "expert") + 0.4  # per-expert quotas destroy the skill
