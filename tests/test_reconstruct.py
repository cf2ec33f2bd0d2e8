import copy
import dataclasses

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import fmoe
import fmoe.toy
from fmoe.model.hooks import experts_hooks
from fmoe.model.experts import expert_parameters, find_experts, up_name, up_rows
from fmoe.lightning.calibration import CalibrationModule
from fmoe.lightning.callbacks import IntermediatePruning
from fmoe.calibration.loss import corpus_nll
from fmoe.calibration.gram import gather
from fmoe.methods.dims.refit import refit
from fmoe.calibration.scorer import Scorer
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches, overflow_then_rerun, unpadded
from tests.test_lightning import run_two_processes, sequences, trainer

FAMILIES = ["olmoe", "qwen2_moe", "gpt_oss", "deepseek_v3"]
MANY = dict(n_batches=4, batch_size=4, seq_len=24)  # every routed expert sees more tokens than it keeps dims
SCOPES = {"ragged": dict(scope="layer", multiple_of=1), "uniform": dict(scope="expert", multiple_of=8)}


def plan_for(model, kind="ragged", amount=0.5, seed=0):
    return fmoe.make_plan(fmoe.score(model, criterion="random", seed=seed), amount, **SCOPES[kind], model=model)


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b).logits[b["attention_mask"].bool()] for b in batches])  # real tokens only


def down(model, name, e):
    module = find_experts(model)[name]
    params = module.expert_parameters(e) if isinstance(module, fmoe.RaggedExperts) else expert_parameters(module, e)
    w = params["down_proj"].T if module.is_transposed else params["down_proj"]  # [H, k]
    bias = params.get("down_proj_bias")
    return w.detach(), None if bias is None else bias.detach()


def silence_dropped(model, plan):
    """Zero the gate and up rows (and biases) of every dim the plan drops: those dims' h is exactly 0. Returns
    the plan re-signed for the edited weights."""
    with torch.no_grad():
        for name, module in find_experts(model).items():
            width = plan.widths[name][0]
            for e, keep in enumerate(plan.keep[name]):
                dropped = torch.ones(width, dtype=torch.bool)
                dropped[keep] = False
                rows = up_rows(dropped.nonzero()[:, 0], width, module)
                params = expert_parameters(module, e)
                params[up_name(module)].index_fill_(1 if module.is_transposed else 0, rows, 0.0)
                if module.has_bias:
                    params[f"{up_name(module)}_bias"].index_fill_(0, rows, 0.0)
    return dataclasses.replace(plan, fingerprint=fmoe.fingerprint(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_dim_kept_changes_nothing(family):
    model, batches = tiny_model(family), make_batches()
    expected = logits(model, batches)
    fmoe.reconstruct(model, plan_for(model, "uniform", amount=0.0), batches)
    torch.testing.assert_close(logits(model, batches), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(SCOPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_dims_that_never_fire_reconstruct_exactly(family, kind):
    model, batches = tiny_model(family), make_batches(**MANY)
    plan = silence_dropped(model, plan_for(model, kind))
    expected = logits(model, batches)
    plain = fmoe.prune(copy.deepcopy(model), plan)
    exact = fmoe.reconstruct(copy.deepcopy(model), plan, batches, lam=0.0)
    ridge = fmoe.reconstruct(copy.deepcopy(model), plan, batches)
    torch.testing.assert_close(logits(exact, batches), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(ridge, batches), expected, rtol=1e-2, atol=1e-2)
    for (name, e), _ in _experts(plan):
        for fitted, reference in zip(down(exact, name, e), down(plain, name, e)):
            if reference is not None:
                torch.testing.assert_close(fitted, reference, rtol=1e-5, atol=1e-6)


def plan_widths(model, name):
    from fmoe.model.experts import expert_widths

    return expert_widths(find_experts(model)[name])


def _experts(plan):
    return [((name, e), keep) for name, keeps in plan.keep.items() for e, keep in enumerate(keeps)]


def dense_activations(model, batches):
    """{name: [(h [n, I], expert output before the routing weight [n, H]) per expert]} of the real tokens."""
    rows = {name: [] for name in find_experts(model)}

    class Capture:
        edits_model = False

        def __init__(self, name):
            self.name = name

        def __call__(self, routing, h):
            self.h, self.experts = h.detach(), routing.experts
            return h

        def on_output(self, routing, o):
            rows[self.name].append((self.experts, self.h, o.detach()))
            return o

    with experts_hooks(model, {n: Capture(n) for n in rows}), torch.no_grad():
        for b in batches:  # unpadded: every row is a real token
            model(**b)
    out = {}
    for name, calls in rows.items():
        experts, h, o = (torch.cat(parts) for parts in zip(*calls))
        out[name] = [(h[experts == e].double(), o[experts == e].double()) for e in range(len(plan_widths(model, name)))]
    return out


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # without and with a down bias
def test_refit_equals_least_squares(family):
    model = tiny_model(family)
    batches = make_batches(**MANY, pad="none")
    plan = plan_for(model, "ragged")
    acts = dense_activations(model, batches)
    fitted = fmoe.reconstruct(copy.deepcopy(model), plan, batches, lam=0.0)
    for (name, e), keep in _experts(plan):
        h, o = acts[name][e]
        if keep.numel() == h.shape[1] or h.shape[0] == 0:  # every dim kept, or no token: the plain pruned weights
            continue
        design = h[:, keep]  # [n, k], and a column of ones where the family has a down bias
        if find_experts(model)[name].has_bias:
            design = torch.cat([design, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
        assert h.shape[0] > design.shape[1]  # overdetermined
        solution = torch.linalg.lstsq(design, o, driver="gelsd").solution  # [k(+1), H]
        w, b = down(fitted, name, e)
        torch.testing.assert_close(w.double(), solution[: keep.numel()].T, rtol=1e-4, atol=1e-5)
        if b is not None:
            torch.testing.assert_close(b.double(), solution[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_lowers_the_layer_error_of_pruning(family):
    model = tiny_model(family)
    batches = make_batches(**MANY, pad="none")
    plan = plan_for(model, "ragged")
    acts = dense_activations(model, batches)
    plain = fmoe.prune(copy.deepcopy(model), plan)
    fitted = fmoe.reconstruct(copy.deepcopy(model), plan, batches)
    for name in plan.keep:
        errors = []
        for pruned in (plain, fitted):
            total = 0.0
            for e, keep in enumerate(plan.keep[name]):
                h, o = acts[name][e]
                w, b = down(pruned, name, e)
                approx = h[:, keep] @ w.double().T + (0.0 if b is None else b.double())
                total += float((approx - o).square().sum())
            errors.append(total)
        assert errors[1] < errors[0]


def test_layers_per_pass_and_uniform_plans_give_the_same_model():
    model, batches = tiny_model("qwen2_moe"), make_batches()
    for kind in SCOPES:
        plan = plan_for(model, kind)
        once = fmoe.reconstruct(copy.deepcopy(model), plan, batches)
        per_layer = fmoe.reconstruct(copy.deepcopy(model), plan, batches, layers_at_once=1)
        assert isinstance(find_experts(once)["model.layers.0.mlp.experts"], fmoe.RaggedExperts) == (kind == "ragged")
        for key, t in once.state_dict().items():
            torch.testing.assert_close(per_layer.state_dict()[key], t, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one-shot iterator"):
        fmoe.reconstruct(copy.deepcopy(model), plan, iter(batches), layers_at_once=1)


def close_grams(a, b, rtol=1e-5, atol=1e-8):
    for field in ("products", "sums", "counts"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys()
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=rtol, atol=atol * float(y[name].abs().max()))


def test_gram_sums_add_over_batches_and_ignore_padding():
    model, batches = tiny_model("deepseek_v3"), make_batches()
    both = gather(model, batches)
    one, two = gather(model, batches[:1]), gather(model, batches[1:])
    summed = one + two
    close_grams(summed, both)
    assert (summed.samples, summed.tokens) == (both.samples, both.tokens)
    close_grams(gather(model, unpadded(batches)), both, rtol=1e-4, atol=1e-5)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert sum(float(c.sum()) for c in both.counts.values()) == 2 * 2 * real_tokens  # 2 layers, top-2
    names = list(find_experts(model))
    assert list(gather(model, batches, names[1:]).products) == names[1:]


@pytest.mark.parametrize("criterion", ["fisher", "activation"])
def test_scorer_gathers_the_same_gram(criterion):
    model, batches = tiny_model("olmoe"), make_batches()
    scorer = Scorer(model, criterion, gram=True)
    with scorer.attached():
        for b in batches:
            scorer.step(b)
    close_grams(scorer.gram(), gather(model, batches))
    assert any(k.startswith("gram/products/") for k in scorer.state())
    twin = Scorer(model, criterion, gram=True)
    twin.load_state(scorer.state(), scorer.samples, scorer.tokens)
    close_grams(twin.gram(), scorer.gram(), rtol=0)
    with pytest.raises(ValueError, match="gram=True"):
        Scorer(model, criterion).gram()


def test_a_step_run_again_after_overflowing_gradients_counts_once():
    model, batches = tiny_model("olmoe"), make_batches()
    scorer = Scorer(model, "fisher", gram=True)
    overflow_then_rerun(scorer, batches)
    close_grams(scorer.gram(), gather(model, batches))


def test_reconstruct_needs_a_calibration_module():
    from types import SimpleNamespace

    from fmoe.lightning.callbacks import FisherScoring

    with pytest.raises(TypeError, match="reconstruct=True refits from Gram sums, which a CalibrationModule"):
        IntermediatePruning(reconstruct=True).setup(SimpleNamespace(strategy=None, callbacks=[FisherScoring()]),
                                                    torch.nn.Linear(1, 1), "fit")


def test_calibration_fit_with_reconstruct_equals_core(tmp_path):
    data = sequences()
    model = tiny_model("qwen3_moe")
    module = CalibrationModule(model, criterion="activation")
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=tmp_path / "out",
                                  reconstruct=True, verbose=False)
    trainer(tmp_path, callbacks=[pruning]).fit(module, DataLoader(data, batch_size=4))
    assert module.gram is not None
    batches = [default_collate(data[i:i + 4]) for i in (0, 4)]
    reference = fmoe.reconstruct(tiny_model("qwen3_moe"), pruning.plan, batches)
    plain = fmoe.prune(tiny_model("qwen3_moe"), pruning.plan)
    expected, plain = reference.state_dict(), plain.state_dict()
    assert any(not torch.equal(expected[k], plain[k]) for k in expected)  # the refit changed the pruned weights
    for key, t in module.model.state_dict().items():
        torch.testing.assert_close(t, expected[key], rtol=1e-5, atol=1e-6)


def test_two_processes_reconstruct_like_one(tmp_path):
    run_two_processes(tmp_path, "reconstruct")
    plan = fmoe.PruningPlan.load(tmp_path / "plan.json")
    data = sequences()
    expected = fmoe.reconstruct(tiny_model("qwen3_moe"), plan, [default_collate(data[i:i + 2]) for i in range(0, 8, 2)])
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"weights_rank{rank}.pt")
        assert weights.keys() == expected.state_dict().keys()
        for key, t in weights.items():
            torch.testing.assert_close(t, expected.state_dict()[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # gpt_oss: a down bias, so the refit has an intercept
def test_compensated_saliency_is_the_error_of_removing_one_dim_with_the_others_refit(family):
    """For every dim j of an expert: score_j == the calibration output error after removing j alone and refitting
    the other dims (and the intercept, where there is a bias) by least squares (lam=0: exact), from the same
    Gram statistics."""
    from fmoe.calibration.gram import compensated, gather
    from fmoe.methods.dims.refit import solve

    model = tiny_model(family)
    stats = gather(model, make_batches(n_batches=3, batch_size=6, seq_len=16))
    name = next(iter(stats.products))
    scores = compensated(stats, lam=0.0)[name]
    e = int(stats.counts[name].argmax())
    g, s, n = stats.products[name][e], stats.sums[name][e], stats.counts[name][e].double()  # [I, I], [I], []
    w = stats.down[name][e].double()
    w = w.T if stats.transposed[name] else w  # [H, I]
    bias = stats.down_bias[name]
    b = None if bias is None else bias[e].double()
    width = g.shape[0]
    for j in (0, 5, width - 1):
        keep = torch.tensor([i for i in range(width) if i != j])
        x, b2 = solve(g, s, stats.counts[name][e], w, b, keep, lam=0.0)
        # sum_t ||X h_K + b' - (W h + b)||^2 from the sums: residual r_t = [X, -W] [h_K; h] + (b' - b)
        m = torch.cat([x, -w], 1)  # [H, k + I]
        index = torch.cat([keep, torch.arange(width)])
        gg, ss = g[index][:, index], s[index]
        d = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b2 - b
        error = torch.trace(m @ gg @ m.T) + 2 * d @ (m @ ss) + n * d @ d
        torch.testing.assert_close(scores[e, j].double(), error, rtol=1e-3, atol=1e-6)


def test_rank_mean_orders_by_the_mean_rank():
    model = tiny_model("olmoe")
    a, b = fmoe.score(model, criterion="random", seed=1), fmoe.score(model, criterion="random", seed=2)
    both = fmoe.calibration.scores.rank_mean(a, b)
    name = next(iter(a.tensors))
    ranks = lambda t: t.flatten().argsort().argsort().double().view_as(t) / (t.numel() - 1)  # noqa: E731
    torch.testing.assert_close(both.tensors[name].double(), (ranks(a.tensors[name]) + ranks(b.tensors[name])) / 2,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="same model"):
        fmoe.calibration.scores.rank_mean(a, fmoe.score(tiny_model("olmoe", seed=3), criterion="random"))
    tied = fmoe.Scores({name: torch.tensor([[0.0, 0.0, 0.0, 5.0]])}, "t", "x")
    shared = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 1.0]])  # ties share their mean rank
    torch.testing.assert_close(fmoe.calibration.scores.rank_mean(tied, tied).tensors[name], shared)


def test_reconstruct_leaves_the_callers_plan_as_it_was():
    model, batches = tiny_model("olmoe"), make_batches(n_batches=2, seed=1)
    plan = plan_for(model)
    before = copy.deepcopy(plan.to_dict())
    fmoe.reconstruct(model, plan, batches, lam=0.05)
    assert plan.to_dict() == before  # saving it records no refit that fmoe.apply_plan would not make
    refit_plan = fmoe.prune_iteratively(tiny_model("olmoe"), batches, 0.5, steps=1, reconstruct=True, lam=0.05)
    assert refit_plan.meta["reconstruct"] == {"lam": 0.05}
    assert "reconstruct" not in fmoe.prune_iteratively(tiny_model("olmoe"), batches, 0.5, steps=1).meta


def test_saved_plan_records_the_refit_and_only_then(tmp_path):
    data = sequences()
    saved = {}
    for reconstruct in (False, True):
        out = tmp_path / str(reconstruct)
        pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=out, reconstruct=reconstruct,
                                      lam=0.05, verbose=False)
        trainer(tmp_path, callbacks=[pruning]).fit(CalibrationModule(tiny_model("qwen3_moe"), criterion="activation"),
                                                   DataLoader(data, batch_size=4))
        saved[reconstruct] = fmoe.PruningPlan.load(out / "plan.json").to_dict()
        assert saved[reconstruct] == pruning.plan.to_dict()
    assert "reconstruct" not in saved[False]["meta"]
    assert saved[True]["meta"].pop("reconstruct") == {"lam": 0.05}
    assert saved[True] == saved[False]  # the same cut, and the refit on top of it recorded


def test_refit_is_never_worse_than_plain_pruning_at_any_calibration_size():
    """The toy, a 0.5 magnitude plan, refit (default lam) from 2 to 64 training sequences: held-out NLL (test
    split) at most the plainly pruned model's. A ridge towards zero overfits the small sizes."""
    from fmoe.methods.dims.refit import solutions, write

    model, tokenizer, config = fmoe.toy.load()
    files = fmoe.toy.corpus_files(config)
    calib = fmoe.toy.batches(tokenizer, fmoe.toy.interleaved(files, "train")[:64], 1)
    held = fmoe.toy.batches(tokenizer, fmoe.toy.interleaved(files, "test", 12), 12)
    plan = fmoe.make_plan(fmoe.score(model, criterion="magnitude"), 0.5, "layer", model=model)
    plain = fmoe.prune(copy.deepcopy(model), plan)
    plain_nll = corpus_nll(plain, held)
    stats, start = None, 0
    for size in (2, 8, 16, 32, 64):  # Gram sums over prefixes: each group's statistics gathered once
        part = gather(model, calib[start:size])
        stats, start = part if stats is None else stats + part, size
        refit_nll = corpus_nll(write(copy.deepcopy(plain), solutions(stats, plan)), held)
        assert refit_nll <= plain_nll, (size, refit_nll, plain_nll)
    assert refit_nll < plain_nll  # and the refit does something
