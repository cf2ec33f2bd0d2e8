import importlib.util
import sys

import pytest
import torch

import fmoe
from fmoe import toy
from fmoe.model.checkpoint import FORMAT_FIELD, _config_json
from fmoe.evaluation.harness import flat_metrics, lm_eval
from fmoe.toy import toy_tasks_dir
from fmoe.evaluation.tasks import accuracy, load_tasks

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
LIMIT = 20
DOMAINS = ("arithmetic", "general")  # general: the toy answers about half, so agreement is not trivially 1 == 1
TASKS = [f"fmoe_{d}" for d in DOMAINS]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Greedy decoding of the toy is per-op overhead: one thread is fastest and immune to oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return toy_tasks_dir(tmp_path_factory.mktemp("tasks"))


def reference(model, tokenizer) -> dict[str, float]:
    """fmoe.evaluation.tasks accuracy on the records lm-eval evaluates with limit=LIMIT (the first ones of the test split)."""
    files = toy.corpus_files()
    return {f"fmoe_{d}": accuracy(model, tokenizer, *load_tasks(files[d]["test"], LIMIT)) for d in DOMAINS}


def exact_match(results) -> dict[str, float]:
    return {task: metrics["exact_match,none"] for task, metrics in results.items()}


def pruned_toy(scope: str):
    model, tokenizer, _ = toy.load()
    texts = [r["text"] for r in toy.read_jsonl(toy.corpus_files()["arithmetic"]["train"])[:32]]
    scores = fmoe.score(model, toy.batches(tokenizer, texts, 16), "fisher", progress=False)
    return fmoe.prune(model, fmoe.make_plan(scores, 0.5, scope, multiple_of=1)).eval(), tokenizer


@needs_lm_eval
def test_toy_task_exact_match_is_fmoe_accuracy(tasks_dir):
    model, tokenizer, _ = toy.load()
    results = lm_eval(model, tokenizer, TASKS, limit=LIMIT, include_path=tasks_dir)
    assert exact_match(results) == reference(model, tokenizer)
    assert 0 < results["fmoe_general"]["exact_match,none"] < 1
    assert all(isinstance(v, float) and "stderr" not in k for m in results.values() for k, v in m.items())
    assert not model.training


@needs_lm_eval
def test_an_evaluation_leaves_the_global_generators_as_they_were(tasks_dir):
    import random

    import numpy as np

    model, tokenizer, _ = toy.load()
    draws = []
    for evaluate in (False, True):
        torch.manual_seed(7), random.seed(7), np.random.seed(7)
        if evaluate:  # lm-eval seeds every global generator for its run
            lm_eval(model, tokenizer, ["fmoe_arithmetic"], limit=2, include_path=tasks_dir)
        draws.append((torch.rand(3), random.random(), np.random.rand()))
    assert torch.equal(draws[0][0], draws[1][0]) and draws[0][1:] == draws[1][1:]


@needs_lm_eval
def test_ragged_pruned_model_runs_in_memory(tasks_dir):
    model, tokenizer = pruned_toy("layer")
    assert any(isinstance(m, fmoe.RaggedExperts) for m in fmoe.find_experts(model).values())
    results = lm_eval(model, tokenizer, TASKS, limit=LIMIT, include_path=tasks_dir, batch_size=4)
    assert exact_match(results) == reference(model, tokenizer)


@needs_lm_eval
def test_uniform_export_loads_through_lm_eval_hf_model(tasks_dir, tmp_path):
    import lm_eval as harness
    from lm_eval.tasks import TaskManager

    model, tokenizer = pruned_toy("expert")
    fmoe.save_pretrained(model, tmp_path / "export", tokenizer=tokenizer)
    assert _config_json(tmp_path / "export")[FORMAT_FIELD] == "stock"
    in_memory = lm_eval(model, tokenizer, TASKS, limit=LIMIT, include_path=tasks_dir)
    # what `lm_eval --model hf --model_args pretrained=DIR --include_path TASKS` runs
    out = harness.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "export"), "device": "cpu"},
                                  tasks=TASKS, limit=LIMIT, batch_size=8, log_samples=False, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks_dir)))
    assert flat_metrics(out["results"]) == in_memory


@needs_lm_eval
def test_unknown_task_names_the_task(tasks_dir):
    model, tokenizer, _ = toy.load()
    with pytest.raises(ValueError, match="fmoe_nope"):
        lm_eval(model, tokenizer, ["fmoe_arithmetic", "fmoe_nope"], limit=2, include_path=tasks_dir)


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install fmoe\[eval\]"):
        lm_eval(None, None, "gsm8k")


def test_task_yaml_refuses_missing_splits(tmp_path):
    with pytest.raises(ValueError, match="val"):
        toy_tasks_dir(tmp_path, files={"arithmetic": {"train": tmp_path / "a.jsonl", "test": tmp_path / "b.jsonl"}})
