import math

import pytest
import torch

import fmoe
from fmoe.model.hooks import experts_hooks
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches, overflow_then_rerun, unpadded


def slow_fisher(model, sequences):
    """Reference: one sequence at a time, explicit mask leaves m = 1, HF's own `.loss`, autograd w.r.t. m."""
    modules = fmoe.find_experts(model)
    total = {n: torch.zeros(4, 32, dtype=torch.float64) for n in modules}
    for p in model.parameters():
        p.requires_grad_(False)
    for seq in sequences:
        masks = {n: torch.ones(4, 32, requires_grad=True) for n in modules}
        hooks = {n: (lambda m: lambda routing, h: h * m[routing.experts])(masks[n]) for n in modules}
        with experts_hooks(model, hooks):
            loss = model(input_ids=seq["input_ids"], labels=seq["input_ids"]).loss
        grads = torch.autograd.grad(loss, list(masks.values()))
        for n, g in zip(masks, grads, strict=True):
            total[n] += g.double() ** 2
    for p in model.parameters():
        p.requires_grad_(True)
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_fisher_matches_per_sequence_reference_with_padding(family):
    model = tiny_model(family)
    batches = make_batches(n_batches=2, batch_size=3, pad="mixed")
    scores = fmoe.score(model, batches, criterion="fisher")
    ref = slow_fisher(model, unpadded(batches))
    assert scores.samples == 6 and scores.tokens == sum(int(b["attention_mask"].sum()) - 3 for b in batches)
    for name, expected in ref.items():
        assert expected.sum() > 0
        torch.testing.assert_close(scores.tensors[name].double(), expected, rtol=2e-3, atol=1e-9)


def test_fisher_is_additive_over_batches_and_computes_no_weight_grads(model):
    batches = make_batches(n_batches=2)
    both = fmoe.score(model, batches)
    first, second = fmoe.score(model, batches[:1]), fmoe.score(model, batches[1:])
    for name, t in both.tensors.items():
        torch.testing.assert_close(t, first.tensors[name] + second.tensors[name], rtol=1e-5, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_fisher_does_not_depend_on_padding_side_or_batching(model):
    left = fmoe.score(model, make_batches(n_batches=1, batch_size=4, pad="left"))
    right = fmoe.score(model, make_batches(n_batches=1, batch_size=4, pad="right"))
    alone = fmoe.score(model, unpadded(make_batches(n_batches=1, batch_size=4, pad="left")))
    alone_right = fmoe.score(model, unpadded(make_batches(n_batches=1, batch_size=4, pad="right")))
    for name in left.tensors:
        torch.testing.assert_close(left.tensors[name], alone.tensors[name], rtol=2e-3, atol=1e-9)
        torch.testing.assert_close(right.tensors[name], alone_right.tensors[name], rtol=2e-3, atol=1e-9)


def test_bf16_model_scores_accumulate_in_float32():
    model = tiny_model("qwen3_moe", dtype=torch.bfloat16)
    scores = fmoe.score(model, make_batches(n_batches=1))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() and t.sum() > 0 for t in scores.tensors.values())


def test_non_finite_loss_stops_scoring():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite calibration loss"):
        fmoe.score(model, make_batches(n_batches=1))


def test_non_finite_gradient_stops_scoring_with_a_finite_loss():
    model = tiny_model("mixtral")
    losses = []
    model.register_forward_hook(lambda m, args, out: losses.append(out.logits.detach()))
    # the loss stays finite; only the gradient flowing back from the head is poisoned
    model.lm_head.register_full_backward_pre_hook(lambda m, grad_output: (grad_output[0] * float("nan"),))
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in model\.layers\.\d\.mlp\.experts"):
        fmoe.score(model, make_batches(n_batches=1))
    assert losses and all(torch.isfinite(x).all() for x in losses)


def slow_grad_abs(model, sequences):
    modules = fmoe.find_experts(model)
    total = {n: torch.zeros(4, 32, dtype=torch.float64) for n in modules}
    for seq in sequences:
        model.zero_grad()
        model(input_ids=seq["input_ids"], labels=seq["input_ids"]).loss.backward()
        for n, m in modules.items():
            gu = m.gate_up_proj.grad.abs().double()
            down = m.down_proj.grad.abs().double()
            if m.is_transposed:  # gpt-oss: [E, H, 2I] interleaved, down [E, I, H]
                gate, up, d = gu[:, :, 0::2].sum(1), gu[:, :, 1::2].sum(1), down.sum(2)
                hidden = gu.shape[1]
            else:  # [E, 2I, H] concatenated, down [E, H, I]
                gate, up, d = gu[:, :32].sum(2), gu[:, 32:].sum(2), down.sum(1)
                hidden = gu.shape[2]
            total[n] += (gate + up + d) / (3 * hidden)
    model.zero_grad(set_to_none=True)
    return {n: t / len(sequences) for n, t in total.items()}


def test_grad_abs_matches_per_sequence_weight_gradients(model):
    batches = make_batches(n_batches=1, batch_size=3)
    scores = fmoe.score(model, batches, criterion="grad_abs")
    ref = slow_grad_abs(model, unpadded(batches))
    for name, expected in ref.items():
        torch.testing.assert_close(scores.tensors[name].double(), expected, rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())


def test_activation_and_router_ignore_padding(model):
    padded = make_batches(n_batches=1, batch_size=4)
    for criterion in ("activation", "router"):
        a = fmoe.score(model, padded, criterion=criterion)
        b = fmoe.score(model, unpadded(padded), criterion=criterion)
        for name in a.tensors:
            torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=1e-4, atol=1e-6)
        assert a.tokens == int(padded[0]["attention_mask"].sum())


def test_router_weighs_activation_by_routing_weight(model):
    batches = make_batches(n_batches=1)
    router = fmoe.score(model, batches, criterion="router")
    modules = fmoe.find_experts(model)
    expected = {n: torch.zeros(4, 32, dtype=torch.float64) for n in modules}
    valid = batches[0]["attention_mask"].reshape(-1).bool()

    def record(name):
        def hook(routing, h):  # sum over real routed tokens of weight x |h|, expert by expert
            for e in range(4):
                keep = valid[routing.tokens] & (routing.experts == e)
                expected[name][e] += (routing.weights[keep, None] * h[keep].abs()).double().sum(0)
            return h
        return hook

    with torch.no_grad(), experts_hooks(model, {n: record(n) for n in modules}):
        model(**batches[0])
    for name, t in expected.items():
        assert t.sum() > 0
        torch.testing.assert_close(router.tensors[name].double(), t, rtol=1e-5, atol=1e-7)


def test_data_free_methods_are_deterministic():
    model = tiny_model("olmoe")
    r1, r2 = fmoe.score(model, criterion="random", seed=3), fmoe.score(model, criterion="random", seed=3)
    r3 = fmoe.score(model, criterion="random", seed=4)
    m1 = fmoe.score(model, criterion="magnitude")
    for name in r1.tensors:
        assert torch.equal(r1.tensors[name], r2.tensors[name]) and not torch.equal(r1.tensors[name], r3.tensors[name])
        module = fmoe.find_experts(model)[name]
        e, j = 1, 7
        expected = (module.gate_up_proj[e, j].norm() * module.gate_up_proj[e, 32 + j].norm()
                    * module.down_proj[e, :, j].norm())
        assert math.isclose(m1.tensors[name][e, j].item(), expected.item(), rel_tol=1e-5)


def test_scores_save_load_roundtrip(tmp_path, model):
    scores = fmoe.score(model, make_batches(n_batches=1))
    scores.save(tmp_path / "s")
    loaded = fmoe.Scores.load(tmp_path / "s")
    assert (loaded.criterion, loaded.fingerprint, loaded.samples, loaded.tokens) == (
        scores.criterion, scores.fingerprint, scores.samples, scores.tokens)
    assert all(torch.equal(loaded.tensors[n], t) for n, t in scores.tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp leftovers


def test_bad_inputs_are_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="valid: fisher"):
        fmoe.score(model, [], criterion="taylor")
    with pytest.raises(ValueError, match="needs calibration batches"):
        fmoe.score(model, None, criterion="fisher")
    with pytest.raises(KeyError, match="input_ids"):
        fmoe.score(model, [{"tokens": torch.ones(1, 4, dtype=torch.long)}])
    with pytest.raises(ValueError, match="integer"):
        fmoe.score(model, [{"input_ids": torch.ones(1, 4)}])
    with pytest.raises(ValueError, match="nothing to score"):
        fmoe.score(model, [])
    with pytest.raises(FileNotFoundError, match="no fmoe scores"):
        fmoe.Scores.load(tmp_path)


def test_padding_never_counts_even_when_labels_supervise_it(model):
    padded = make_batches(n_batches=1, batch_size=4, pad="right")
    with_labels = [{**b, "labels": b["input_ids"]} for b in padded]  # pad ids supervised by the labels
    a, b = fmoe.score(model, with_labels), fmoe.score(model, unpadded(padded))
    assert a.tokens == b.tokens
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=2e-3, atol=1e-9)


@pytest.mark.parametrize("criterion", fmoe.CRITERIA)
def test_scoring_inside_a_mask_scores_the_masked_model(criterion):
    model = tiny_model("qwen3_moe")
    batches = make_batches(n_batches=1)
    plan = fmoe.make_plan(fmoe.score(model, criterion="random", seed=1), 0.5, "expert", multiple_of=8, model=model)
    with fmoe.masked(model, plan):
        inside = fmoe.score(model, batches, criterion)
    outside = fmoe.score(model, batches, criterion)
    for name, keeps in plan.keep.items():
        kept = torch.zeros(4, 32, dtype=torch.bool)
        for e, k in enumerate(keeps):
            kept[e, k] = True
        assert (inside.tensors[name][~kept] == 0).all()  # masked dims score 0
        assert (outside.tensors[name][~kept] != 0).any()
    if criterion == "fisher":  # the kept dims score as in the pruned model, which the mask stands for
        pruned = fmoe.prune(tiny_model("qwen3_moe"), plan)
        reference = fmoe.score(pruned, batches, criterion)
        for name, keeps in plan.keep.items():
            got = torch.stack([inside.tensors[name][e, k] for e, k in enumerate(keeps)])
            torch.testing.assert_close(got, reference.tensors[name], rtol=2e-3, atol=1e-9)


def equal_scores(a: fmoe.Scores, b: fmoe.Scores) -> None:
    assert (a.criterion, a.samples, a.tokens, a.fingerprint) == (b.criterion, b.samples, b.tokens, b.fingerprint)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_a_combined_criterion_equals_its_criteria_combined(tmp_path):
    from torch.utils.data import DataLoader, default_collate

    from fmoe.lightning.calibration import CalibrationModule
    from fmoe.calibration.scores import rank_mean
    from tests.test_lightning import sequences, trainer

    model, data = tiny_model("olmoe"), sequences()
    batches = [default_collate(data[i:i + 4]) for i in (0, 4)]
    spec = "rank_mean(compensated, router)"
    combined = fmoe.score(model, batches, spec, progress=False)
    expected = rank_mean(fmoe.score(model, batches, "compensated"), fmoe.score(model, batches, "router"))
    equal_scores(combined, expected)  # one pass for both criteria, the same numbers
    assert combined.criterion == "rank_mean(compensated,router)"
    combined.save(tmp_path / "s")
    assert fmoe.Scores.load(tmp_path / "s").criterion == combined.criterion  # the saved scores name the criterion
    for other in ("rank_mean(fisher, activation)", "rank_mean(grad_abs, magnitude)"):  # with a backward; own pass
        parts = other[len("rank_mean("):-1].split(", ")
        equal_scores(fmoe.score(model, batches, other), rank_mean(*(fmoe.score(model, batches, p) for p in parts)))
    module = CalibrationModule(model, criterion=spec)
    trainer(tmp_path).fit(module, DataLoader(data, batch_size=4))
    equal_scores(module.scores, expected)


@pytest.mark.parametrize("spec", ["nosuch", "rank_mean(compensated", "rank_mean(router)", "mean(fisher, router)",
                                  "rank_mean(fisher, nosuch)", "rank_mean(rank_mean(fisher, router), magnitude)"])
def test_a_bad_criterion_is_refused_with_the_valid_names(spec):
    from fmoe.lightning.calibration import CalibrationModule

    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match=r"valid: fisher, grad_abs, .*rank_mean\(name, name"):
        fmoe.score(model, make_batches(), spec)
    with pytest.raises(ValueError, match="valid: fisher"):
        CalibrationModule(model, criterion=spec)
    with pytest.raises(ValueError, match="grad_abs takes weight gradients"):  # a Scorer runs no grad_abs
        CalibrationModule(model, criterion="rank_mean(grad_abs, router)")


def test_a_combination_counts_a_batch_run_again_after_overflow_once():
    from fmoe.calibration.scorer import Scorer

    model, batches = tiny_model("olmoe"), make_batches()
    scorer = Scorer(model, "rank_mean(fisher, router)")
    overflow_then_rerun(scorer, batches)
    router = fmoe.score(model, batches, "router")
    for name, t in scorer._tensors("router").items():
        torch.testing.assert_close(t, router.tensors[name])
    equal_scores(scorer.result(), fmoe.score(model, batches, "rank_mean(fisher, router)"))
