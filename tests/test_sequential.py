"""Sequential dim pruning: one MoE layer is one shot, layer l is planned from scores with the layers before it
masked, pruned == masked, global scope refused, and with reconstruction each layer is refit on the inputs the
already cut and refit layers give it."""

import pytest
import torch

import fmoe
from fmoe.methods.dims.sequential import prune_sequentially
from fmoe.model.experts import expert_widths
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches
from tests.test_iterative import logits, same_plan

OPTIONS = dict(multiple_of=1, max_widths=None)


def test_one_moe_layer_is_one_shot():
    batches = make_batches()
    model, reference = tiny_model("qwen2_moe", num_hidden_layers=1), tiny_model("qwen2_moe", num_hidden_layers=1)
    expected = fmoe.make_plan(fmoe.score(reference, batches, "router"), 0.5, "layer", model=reference, **OPTIONS)
    fmoe.prune(reference, expected)
    plan = prune_sequentially(model, batches, 0.5, "router", **OPTIONS)
    assert same_plan(plan, expected) and plan.meta["sequential"] and plan.meta["achieved"] == 0.5
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family, criterion", [("gpt_oss", "fisher"), ("qwen3_moe", "compensated")])
def test_each_layer_is_planned_with_the_layers_before_it_masked(family, criterion):
    batches, probe = make_batches(), make_batches(n_batches=1, seed=5, pad="right")[0]
    model, original = tiny_model(family, num_hidden_layers=3), tiny_model(family, num_hidden_layers=3)
    plan = prune_sequentially(model, batches, 0.6, criterion, **OPTIONS)
    names = list(fmoe.find_experts(original))
    for i, name in enumerate(names):  # independently: score with the plan's earlier layers masked, plan all layers
        with fmoe.masked(original, {n: plan.keep[n] for n in names[:i]}):
            scores = fmoe.score(original, batches, criterion, progress=False)
        layer = fmoe.make_plan(scores, 0.6, "layer", model=original, **OPTIONS)
        assert all(torch.equal(a, b) for a, b in zip(plan.keep[name], layer.keep[name], strict=True)), name
    one_shot = fmoe.make_plan(fmoe.score(original, batches, criterion, progress=False), 0.6, "layer", **OPTIONS)
    assert not same_plan(plan, one_shot) and plan.fingerprint == fmoe.fingerprint(original)
    with fmoe.masked(original, plan):
        torch.testing.assert_close(logits(model, probe), logits(original, probe), rtol=1e-4, atol=1e-5)


def test_expert_scope_and_bad_arguments():
    model = tiny_model("olmoe")
    plan = prune_sequentially(model, make_batches(), 0.5, "activation", scope="expert", multiple_of=4)
    assert plan.is_uniform() and plan.meta["scope"] == "expert"
    with pytest.raises(ValueError, match="no layer order"):
        prune_sequentially(tiny_model("olmoe"), make_batches(), 0.5, scope="global")
    with pytest.raises(ValueError, match="not an iterator"):
        prune_sequentially(tiny_model("olmoe"), iter(make_batches()), 0.5)
    with pytest.raises(ValueError, match="amount"):
        prune_sequentially(tiny_model("olmoe"), make_batches(), 1.0)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # gpt_oss: transposed down projections, a bias
def test_reconstruction_refits_each_layer_after_the_ones_before(family):
    batches = make_batches(n_batches=2, seed=1)
    model, reference = tiny_model(family, num_hidden_layers=2), tiny_model(family, num_hidden_layers=2)
    plan = prune_sequentially(model, batches, 0.5, "router", scope="expert", reconstruct=True, multiple_of=4)
    assert plan.meta["reconstruct"] == {"lam": fmoe.methods.dims.refit.LAM}
    # step by step, physically: cut and refit layer l (fmoe.reconstruct) on the model whose earlier layers are cut
    for name in fmoe.find_experts(reference):
        scores = fmoe.score(reference, batches, "router", progress=False)
        layer = fmoe.make_plan(scores, 0.5, "expert", multiple_of=4)
        assert all(torch.equal(a, b) for a, b in zip(plan.keep[name], layer.keep[name], strict=True)), name
        widths = {n: expert_widths(m) for n, m in fmoe.find_experts(reference).items()}
        keep = {n: [torch.arange(w) for w in ws] for n, ws in widths.items()} | {name: layer.keep[name]}
        fmoe.reconstruct(reference, fmoe.PruningPlan(keep, widths, fmoe.fingerprint(reference)), batches)
    a, b = model.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    plain = tiny_model(family, num_hidden_layers=2)
    prune_sequentially(plain, batches, 0.5, "router", scope="expert", multiple_of=4)
    assert any(not torch.equal(x, y) for x, y in zip(a.values(), plain.state_dict().values()) if x.shape == y.shape)
