import pytest
import torch

import fmoe
from fmoe.calibration.scores import Scores


def fake_scores(n_layers=2, experts=4, width=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.experts": torch.rand(experts, width, generator=gen) * (10 ** i) for i in range(n_layers)}
    return Scores(tensors, "fisher", "abc")


def test_expert_scope_is_uniform_and_keeps_each_experts_top_dims():
    scores = fake_scores()
    plan = fmoe.make_plan(scores, 0.5, "expert", multiple_of=1)
    assert plan.is_uniform() and plan.removed_fraction() == 0.5
    for name, keeps in plan.keep.items():
        for e, keep in enumerate(keeps):
            assert torch.equal(keep, torch.sort(scores.tensors[name][e].topk(16).indices).values)


def test_layer_scope_ranks_across_experts_of_a_layer():
    scores = fake_scores()
    scores.tensors["layers.0.experts"][0] += 100  # expert 0 dominates its layer
    plan = fmoe.make_plan(scores, 0.5, "layer", multiple_of=1, min_width=1)
    widths = plan.kept_widths()["layers.0.experts"]
    assert widths[0] == 32 and sum(widths) == 64
    for name, t in scores.tensors.items():  # kept dims are exactly the layer's top half
        kept = torch.zeros_like(t, dtype=torch.bool)
        for e, k in enumerate(plan.keep[name]):
            kept[e, k] = True
        assert t[kept].min() >= t[~kept].max()


def test_global_scope_normalises_layers_by_mean():
    scores = fake_scores()
    scores.tensors["layers.1.experts"] += 1  # every layer-1 score above every layer-0 score
    raw = fmoe.make_plan(scores, 0.5, "global", multiple_of=1, min_width=1, normalize="none")
    normed = fmoe.make_plan(scores, 0.5, "global", multiple_of=1, min_width=1)
    assert sum(raw.kept_widths()["layers.0.experts"]) == 4  # min_width only: raw scale decides
    assert abs(sum(normed.kept_widths()["layers.0.experts"]) - 64) <= 12
    assert abs(normed.removed_fraction() - 0.5) < 0.02


def test_rounding_and_min_width():
    scores = fake_scores()
    plan = fmoe.make_plan(scores, 0.6, "layer", multiple_of=8, min_width=8)
    assert all(w % 8 == 0 and 8 <= w <= 32 for ws in plan.kept_widths().values() for w in ws)
    assert fmoe.make_plan(scores, 0.0, "layer").removed_fraction() == 0


def test_deterministic_ties_by_index():
    scores = Scores({"m": torch.ones(2, 32)}, "random", "x")
    plan = fmoe.make_plan(scores, 0.5, "expert", multiple_of=1)
    assert all(torch.equal(k, torch.arange(16)) for k in plan.keep["m"])
    again = fmoe.make_plan(scores, 0.5, "expert", multiple_of=1)
    assert plan.to_dict() == again.to_dict()


@pytest.mark.parametrize("amount", [-0.1, 1.0, 1.5])
def test_amount_outside_range_is_an_error(amount):
    with pytest.raises(ValueError, match=r"amount must be in \[0, 1\)"):
        fmoe.make_plan(fake_scores(), amount)


def test_unknown_scope_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: expert, layer, global"):
        fmoe.make_plan(fake_scores(), 0.5, "block")


def test_json_roundtrip(tmp_path):
    plan = fmoe.make_plan(fake_scores(), 0.5, "layer", multiple_of=4)
    plan.save(tmp_path / "plan.json")
    loaded = fmoe.PruningPlan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == plan.to_dict()
    assert all(k.dtype == torch.long for ks in loaded.keep.values() for k in ks)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an fmoe pruning plan"):
        fmoe.PruningPlan.load(tmp_path / "bad.json")


def qwen_shaped_scores(seed=0):
    """Scores at Qwen1.5-MoE-A2.7B shape: 24 layers x 60 experts x 1408 dims, skewed as real importance is."""
    gen = torch.Generator().manual_seed(seed)
    return Scores({f"layers.{i}.experts": torch.rand(60, 1408, generator=gen, dtype=torch.float64).float() ** 4
                   for i in range(24)}, "fisher", "abc")


@pytest.mark.parametrize("amount", [0.5, 0.75])
@pytest.mark.parametrize("multiple_of", [16, 64])
def test_plans_remove_what_was_asked(amount, multiple_of):
    scores = qwen_shaped_scores()
    kept = round(60 * 1408 * (1 - amount))  # per layer
    for scope in ("layer", "global"):
        plan = fmoe.make_plan(scores, amount, scope, multiple_of=multiple_of)
        widths = plan.kept_widths()
        assert all(w % multiple_of == 0 and multiple_of <= w <= 1408 for ws in widths.values() for w in ws)
        totals = [sum(ws) for ws in widths.values()]
        if scope == "layer":  # every layer within one unit of its budget
            assert all(abs(t - kept) <= multiple_of for t in totals), totals
        else:  # the whole model within one unit
            assert abs(sum(totals) - 24 * kept) <= multiple_of
        assert abs(plan.removed_fraction() - amount) <= multiple_of / 1408
    plan = fmoe.make_plan(scores, amount, "expert", multiple_of=multiple_of)
    assert plan.is_uniform()
    assert all(abs(w - 1408 * (1 - amount)) <= multiple_of / 2 for ws in plan.kept_widths().values() for w in ws)


def test_budget_is_kept_when_min_width_lifts_experts():
    scores = fake_scores(experts=8, width=64)
    for name in scores.tensors:
        scores.tensors[name][:4] *= 1e-6  # half the experts would keep nothing; min_width lifts them
    plan = fmoe.make_plan(scores, 0.75, "layer", multiple_of=8, min_width=8)
    for ws in plan.kept_widths().values():
        assert sum(ws) == 128 and min(ws) == 8  # the lifted dims come off the other experts


def test_min_width_must_be_a_multiple_and_scores_finite():
    with pytest.raises(ValueError, match="min_width must be a positive multiple of multiple_of=16"):
        fmoe.make_plan(fake_scores(), 0.5, multiple_of=16, min_width=24)
    scores = fake_scores()
    scores.tensors["layers.1.experts"][2, 5] = float("nan")
    with pytest.raises(ValueError, match="layers.1.experts hold 1 non-finite"):
        fmoe.make_plan(scores, 0.5)


def test_budget_holds_when_full_widths_are_not_multiples():
    scores = Scores({"m": torch.rand(10, 100, generator=torch.Generator().manual_seed(0))}, "fisher", "abc")
    plan = fmoe.make_plan(scores, 0.3, "layer", multiple_of=64)  # widths 64 or the full 100
    assert all(w in (64, 100) for w in plan.kept_widths()["m"])
    assert abs(sum(plan.kept_widths()["m"]) - 700) <= 32


def kept_mass(scores, plan):
    return sum(float(scores.tensors[n][e, k].double().sum()) for n, ks in plan.keep.items() for e, k in enumerate(ks))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_max_widths_bounds_distinct_widths_per_layer_at_the_same_budget(scope):
    scores = qwen_shaped_scores()
    free = fmoe.make_plan(scores, 0.5, scope, max_widths=None)
    assert max(len(set(ws)) for ws in free.kept_widths().values()) > 4  # the bound has something to do
    uniform = fmoe.make_plan(scores, 0.5, "expert")
    for bound in (1, 2, 4):
        plan = fmoe.make_plan(scores, 0.5, scope, max_widths=bound)
        for name, ws in plan.kept_widths().items():
            assert len(set(ws)) <= bound and all(w % 16 == 0 for w in ws)
            target = sum(free.kept_widths()[name])  # each layer keeps what the unbounded plan keeps: exactly, or
            assert abs(sum(ws) - target) <= (60 * 16 // 2 if bound == 1 else 0)  # as near as one width allows
            for e, keep in enumerate(plan.keep[name]):  # and each expert its top-w dims
                assert torch.equal(keep, torch.sort(scores.tensors[name][e].topk(ws[e]).indices).values)
        assert kept_mass(scores, free) >= kept_mass(scores, plan)
        if bound > 1 and scope == "layer":  # choosing widths per expert beats one width for all
            assert kept_mass(scores, plan) > kept_mass(scores, uniform)
    assert plan.meta["max_widths"] == 4


def test_width_levels_are_assigned_optimally_under_the_exact_budget():
    """The knapsack step against brute force: given levels, the best assignment at exactly the budget."""
    import itertools

    from fmoe.methods.dims.plan import _assign

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 8, generator=gen) ** 4 * torch.rand(5, 1, generator=gen)
    mass = torch.cat([torch.zeros(5, 1, dtype=torch.float64),
                      torch.sort(scores.double(), dim=1, descending=True).values.cumsum(1)], dim=1)
    for levels in ([2, 7], [1, 4, 6], [3, 5]):
        gap, kept, widths = _assign(mass, levels, 1, 20)
        options = [(sum(float(mass[e, w]) for e, w in enumerate(ws)), ws)
                   for ws in itertools.product(levels, repeat=5) if sum(ws) == 20]
        if not options:
            assert gap > 0
            continue
        assert gap == 0 and sum(widths) == 20
        assert kept == pytest.approx(max(options)[0], rel=1e-12)
        assert kept == pytest.approx(sum(float(mass[e, w]) for e, w in enumerate(widths)), rel=1e-12)


def test_max_widths_keeps_exact_budgets_and_the_width_grid_on_random_layers():
    gen = torch.Generator().manual_seed(0)
    for case in range(24):
        experts, width = int(torch.randint(6, 41, (1,), generator=gen)), int(torch.randint(4, 24, (1,), generator=gen)) * 16
        width += 4 * (case % 3 == 0)  # a full width off the grid: levels stay multiples of 16 (or the full width)
        scores = Scores({"m": torch.rand(experts, width, generator=gen) ** 3
                         * torch.rand(experts, 1, generator=gen)}, "fisher", "x")
        amount = (0.3, 0.6, 0.85)[case % 3]
        free = fmoe.make_plan(scores, amount, "layer", multiple_of=16, max_widths=None).kept_widths()["m"]
        for bound in (2, 4):
            widths = fmoe.make_plan(scores, amount, "layer", multiple_of=16, max_widths=bound).kept_widths()["m"]
            assert len(set(widths)) <= bound and sum(widths) == sum(free), (case, bound)
            assert all(w % 16 == 0 or w == width for w in widths), (case, widths)


def test_plan_reports_what_it_achieved_and_warns_when_rounding_defeats_the_amount():
    scores = fake_scores(width=16)
    with pytest.warns(UserWarning, match="removes 0.0% of routed dims, not the 50.0% asked"):
        plan = fmoe.make_plan(scores, 0.5, "layer")  # 16 wide, multiple_of 16: nothing can go
    assert plan.meta["achieved"] == plan.removed_fraction() == 0.0
    plan = fmoe.make_plan(fake_scores(), 0.5, "layer", multiple_of=1)
    assert plan.meta["achieved"] == plan.removed_fraction() == 0.5


def test_a_plan_missing_an_experts_module_is_refused_by_prune_and_prune_checkpoint(tmp_path):
    from fmoe.toy.tiny import tiny_model

    model = tiny_model("qwen2_moe")
    plan = fmoe.make_plan(fmoe.score(model, [], "magnitude"), 0.5, "layer", model=model)
    missing = next(iter(plan.keep))
    del plan.keep[missing]  # its widths entry stays: the plan still "fits" the model's shapes
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="plan keeps no dims for experts modules"):
        fmoe.prune(model, plan)
    with pytest.raises(ValueError, match="plan keeps no dims for experts modules"):
        fmoe.apply_plan(model, plan)
    with pytest.raises(ValueError, match="plan keeps no dims for experts modules"):
        fmoe.prune_checkpoint(tmp_path / "src", plan, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
