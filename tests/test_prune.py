import pytest
import torch

import fmoe
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches


def logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scope,multiple_of", [("expert", 16), ("layer", 4)])
def test_pruned_equals_masked(family, scope, multiple_of):
    model = tiny_model(family)
    batches = make_batches(n_batches=1, batch_size=2, pad="right")
    plan = fmoe.make_plan(fmoe.score(model, batches), 0.5, scope, multiple_of=multiple_of)
    probe = make_batches(n_batches=1, batch_size=2, seed=1, pad="right")[0]
    dense = logits(model, probe)
    with fmoe.masked(model, plan):
        expected = logits(model, probe)
    before = fmoe.weight_bytes(model, routed_only=True)
    fmoe.prune(model, plan)
    got = logits(model, probe)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dense, expected)  # the plan really removed something that matters
    after = fmoe.weight_bytes(model, routed_only=True)
    kept = sum(sum(ws) for ws in plan.kept_widths().values()) / sum(sum(ws) for ws in plan.widths.values())
    assert after <= before * kept + 4 * 64 * 4 * 2 * 2  # proportional to kept dims (+ per-expert biases)
    modules = fmoe.find_experts(model)
    widths = plan.kept_widths()
    assert all(isinstance(m, fmoe.RaggedExperts) == (len(set(widths[n])) > 1) for n, m in modules.items())


def test_ragged_experts_train():
    model = tiny_model("qwen3_moe")
    batches = make_batches(n_batches=1)
    fmoe.prune(model, fmoe.make_plan(fmoe.score(model, batches), 0.5, "layer", multiple_of=4))
    assert any(isinstance(m, fmoe.RaggedExperts) for m in fmoe.find_experts(model).values())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = {"input_ids": batches[0]["input_ids"], "labels": batches[0]["input_ids"].masked_fill(
        batches[0]["attention_mask"] == 0, -100), "attention_mask": batches[0]["attention_mask"]}
    first = model(**batch).loss
    first.backward()
    ragged = next(m for m in fmoe.find_experts(model).values() if isinstance(m, fmoe.RaggedExperts))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ragged.parameters())
    for _ in range(5):
        opt.step(); opt.zero_grad()
        model(**batch).loss.backward()
    assert model(**batch).loss < first


def test_plan_from_another_model_is_refused():
    a, b = tiny_model("mixtral", seed=0), tiny_model("mixtral", seed=1)
    plan = fmoe.make_plan(fmoe.score(a, criterion="magnitude"), 0.5, "expert")
    with pytest.raises(ValueError, match="another model"):
        fmoe.prune(b, plan)
    other = tiny_model("olmoe")
    with pytest.raises(ValueError, match="does not fit"):
        fmoe.prune(other, fmoe.make_plan(fmoe.score(tiny_model("mixtral", num_hidden_layers=3), criterion="random"), 0.5))
    fmoe.prune(a, plan)
    with pytest.raises(ValueError, match="does not fit"):  # pruning twice with the same plan
        fmoe.prune(a, plan)


def test_unaligned_uniform_width_falls_back_from_grouped_mm():
    model = tiny_model("qwen2_moe")
    probe = make_batches(n_batches=1, pad="right")[0]
    plan = fmoe.make_plan(fmoe.score(model, criterion="magnitude"), 0.6, "expert", multiple_of=1)
    with fmoe.masked(model, plan):
        expected = logits(model, probe)
    with pytest.warns(UserWarning, match="batched_mm"):
        fmoe.prune(model, plan)
    assert plan.kept_widths()["model.layers.0.mlp.experts"][0] == 13
    torch.testing.assert_close(logits(model, probe), expected, rtol=1e-4, atol=1e-5)


def test_scores_of_another_model_are_refused_when_planning():
    a, b = tiny_model("qwen2_moe", seed=0), tiny_model("qwen2_moe", seed=1)
    scores = fmoe.score(a, criterion="magnitude")
    fmoe.make_plan(scores, 0.5, model=a)
    with pytest.raises(ValueError, match="another model"):
        fmoe.make_plan(scores, 0.5, model=b)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "glm4_moe"])
def test_only_routed_experts_change(family):
    """Attention, routers, shared experts and dense MLP layers are left alone."""
    model = tiny_model(family, num_hidden_layers=3, first_k_dense_replace=1, mlp_only_layers=[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fmoe.prune(model, fmoe.make_plan(fmoe.score(model, make_batches(n_batches=1)), 0.5, "layer", multiple_of=1))
    after = model.state_dict()
    routed = tuple(fmoe.find_experts(model))
    assert len(routed) == 2  # layer 0 is dense
    untouched = [k for k in before if not k.startswith(routed)]
    assert any("shared" in k for k in untouched) and any("layers.0.mlp" in k for k in untouched)
    assert all(torch.equal(before[k], after[k]) for k in untouched)


def test_scoring_is_deterministic():
    model = tiny_model("phimoe")
    batches = make_batches(n_batches=2)
    a, b = fmoe.score(model, batches), fmoe.score(model, batches)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_masked_works_on_ragged_models():
    model = tiny_model("granitemoe")
    fmoe.prune(model, fmoe.make_plan(fmoe.score(model, make_batches(n_batches=1)), 0.5, "layer", multiple_of=1))
    modules = fmoe.find_experts(model)
    assert any(isinstance(m, fmoe.RaggedExperts) for m in modules.values())
    probe = make_batches(n_batches=1, seed=2, pad="right")[0]
    plain = logits(model, probe)
    everything = {n: [torch.arange(w) for w in fmoe.model.experts.expert_widths(m)] for n, m in modules.items()}
    with fmoe.masked(model, everything):
        torch.testing.assert_close(logits(model, probe), plain)
    first_only = {n: [torch.arange(1) for _ in ws] for n, ws in everything.items()}
    with fmoe.masked(model, first_only):
        assert not torch.allclose(logits(model, probe), plain, atol=1e-4)


def test_masks_nest_and_restore_the_outer_mask_and_implementation():
    model = tiny_model("olmoe")
    probe = make_batches(n_batches=1, batch_size=2, seed=1, pad="right")[0]
    outer = fmoe.make_plan(fmoe.score(model, criterion="random", seed=1), 0.25, "expert", multiple_of=8, model=model)
    inner = fmoe.make_plan(fmoe.score(model, criterion="random", seed=2), 0.5, "layer", multiple_of=1, model=model)
    both = {n: [k[torch.isin(k, j)] for k, j in zip(outer.keep[n], inner.keep[n])] for n in outer.keep}
    implementation = model.get_experts_implementation()
    dense = logits(model, probe)
    with fmoe.masked(model, both):
        expected_both = logits(model, probe)
    with fmoe.masked(model, outer):
        expected_outer = logits(model, probe)
        with fmoe.masked(model, inner):
            torch.testing.assert_close(logits(model, probe), expected_both)  # the masks multiply
        torch.testing.assert_close(logits(model, probe), expected_outer)  # the outer mask is back
        with pytest.raises(RuntimeError, match="cannot prune .*fmoe.masked"):
            fmoe.prune(model, inner)
    assert not torch.allclose(expected_outer, dense)
    torch.testing.assert_close(logits(model, probe), dense)
    assert model.get_experts_implementation() == implementation


def test_hook_blocks_may_close_out_of_order():
    from fmoe.calibration.scorer import Scorer

    model = tiny_model("qwen3_moe")
    batches = make_batches(n_batches=1)
    plan = fmoe.make_plan(fmoe.score(model, criterion="random"), 0.5, "expert", multiple_of=8, model=model)
    with fmoe.masked(model, plan):
        expected = fmoe.score(model, batches, "activation")
    scorer = Scorer(model, "activation")
    mask = fmoe.masked(model, plan)
    mask.__enter__()
    scorer.attach()  # a Lightning scorer attached inside the mask, the mask closing first
    mask.__exit__(None, None, None)
    with fmoe.masked(model, plan):
        scorer.step(batches[0])
    scorer.detach()
    for name, t in scorer.result().tensors.items():
        torch.testing.assert_close(t, expected.tensors[name])
    assert not fmoe.model.hooks.has_hooks(model)
