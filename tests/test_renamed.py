"""One vocabulary: the scoring criterion is `criterion` and the share removed `amount` everywhere; their earlier
names (`method=`, `ratio=`, `Scores.method`, `step_ratios`) still work, with a DeprecationWarning."""

import pytest
import torch

import fmoe
from fmoe.calibration.scorer import Scorer
from fmoe.lightning.calibration import CalibrationModule
from fmoe.methods.dims.iterative import step_amounts
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches


def scores_of(model):
    return fmoe.score(model, criterion="magnitude")


def expert_scores(model):
    return {n: torch.arange(4.0) for n in fmoe.find_experts(model)}


def block_similarity():
    return torch.rand(3, 3, generator=torch.Generator().manual_seed(0))


def same(a, b):
    """The same plans (fingerprint, meta, kept parts) or scores (criterion, tensors)."""
    if isinstance(a, fmoe.Scores):
        return a.criterion == b.criterion and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)
    return a.to_dict() == b.to_dict()


# name: (a call with the new keywords, the same call with the earlier ones); each gets a fresh tiny model
CALLS = {
    "score": (lambda m: fmoe.score(m, criterion="magnitude"), lambda m: fmoe.score(m, method="magnitude")),
    "calibrate": (lambda m: fmoe.calibrate(m, make_batches(n_batches=1), criterion="activation").scores,
                  lambda m: fmoe.calibrate(m, make_batches(n_batches=1), method="activation").scores),
    "make_plan": (lambda m: fmoe.make_plan(scores_of(m), amount=0.5),
                  lambda m: fmoe.make_plan(scores_of(m), ratio=0.5)),
    "prune_iteratively": (
        lambda m: fmoe.prune_iteratively(m, None, amount=0.5, steps=2, criterion="magnitude", multiple_of=8),
        lambda m: fmoe.prune_iteratively(m, None, ratio=0.5, steps=2, method="magnitude", multiple_of=8)),
    "plan_experts": (lambda m: fmoe.plan_experts(m, expert_scores(m), amount=0.25),
                     lambda m: fmoe.plan_experts(m, expert_scores(m), ratio=0.25)),
    "plan_layer_drop": (lambda m: fmoe.plan_layer_drop(m, torch.tensor([0.1, 0.9]), amount=0.4),
                        lambda m: fmoe.plan_layer_drop(m, torch.tensor([0.1, 0.9]), ratio=0.4)),
    "plan_block_drop": (lambda m: fmoe.plan_block_drop(m, block_similarity(), amount=0.4),
                        lambda m: fmoe.plan_block_drop(m, block_similarity(), ratio=0.4)),
    "Scorer": (lambda m: Scorer(m, criterion="activation").criterion,
               lambda m: Scorer(m, method="activation").criterion),
    "CalibrationModule": (lambda m: CalibrationModule(m, criterion="router").criterion,
                          lambda m: CalibrationModule(m, method="router").criterion),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_the_new_keywords_work_and_the_earlier_ones_warn(name):
    new, old = CALLS[name]
    expected = new(tiny_model("qwen2_moe", num_hidden_layers=2))
    with pytest.warns(DeprecationWarning, match=r"\((method|ratio)=\.\.\.\) is deprecated: use (criterion|amount)="):
        got = old(tiny_model("qwen2_moe", num_hidden_layers=2))
    assert got == expected if isinstance(expected, str) else same(got, expected)


def test_score_checkpoint_takes_the_criterion(tmp_path):
    fmoe.save_pretrained(tiny_model("qwen2_moe", num_hidden_layers=2), tmp_path)
    expected = fmoe.score_checkpoint(tmp_path, criterion="random", seed=1)
    with pytest.warns(DeprecationWarning, match="use criterion="):
        assert same(fmoe.score_checkpoint(tmp_path, method="random", seed=1), expected)


def test_earlier_attribute_and_function_names_warn():
    model = tiny_model("qwen2_moe", num_hidden_layers=2)
    scores = scores_of(model)
    for holder in (scores, Scorer(model, "router"), CalibrationModule(model, "router")):
        with pytest.warns(DeprecationWarning, match=r"\.method is deprecated: use \.criterion"):
            assert holder.method == holder.criterion
    with pytest.warns(DeprecationWarning, match="use criterion="):
        assert same(fmoe.Scores(scores.tensors, method="magnitude", fingerprint=scores.fingerprint), scores)
    with pytest.warns(DeprecationWarning, match="step_ratios is now fmoe.methods.dims.iterative.step_amounts"):
        from fmoe.methods.dims.iterative import step_ratios
    assert step_ratios is step_amounts and fmoe.CRITERIA is fmoe.METHODS


def test_a_keyword_given_under_both_names_is_refused():
    with pytest.raises(TypeError, match="got ratio= and amount=: ratio is the earlier name of amount"):
        step_amounts(ratio=0.5, amount=0.5, steps=2)


def test_formats_keep_their_keys(tmp_path):
    """Saved files keep the keys they had: the criterion is "method" in scores and plans, the amount "ratio"."""
    model = tiny_model("qwen2_moe", num_hidden_layers=2)
    scores = scores_of(model)
    scores.save(tmp_path / "scores")
    plan = fmoe.make_plan(scores, 0.5)
    assert (plan.meta["ratio"], plan.meta["method"]) == (0.5, "magnitude")
    assert '"method": "magnitude"' in (tmp_path / "scores" / "scores.json").read_text()
    assert fmoe.Scores.load(tmp_path / "scores").criterion == "magnitude"
