import pytest
import torch

import fmoe
from fmoe.scores import Scores


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


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range_is_an_error(ratio):
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        fmoe.make_plan(fake_scores(), ratio)


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
