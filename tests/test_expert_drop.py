from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import fmoe
from fmoe.model.checkpoint import is_stock_loadable
from fmoe.model.compat import EXPERT_COUNT_FIELDS, router_groups
from fmoe.model.layers import moe_layers
from fmoe.model.structure import EXPERT_COUNTS_FIELD
from fmoe.methods.expert_drop import ExpertPlan, drop_experts, plan_experts, select_scores
from fmoe.model.experts import expert_widths, num_experts
from fmoe.model.structure import WIDTHS_FIELD
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches

GROUPED = dict(n_group=2, topk_group=2)  # DeepSeek-V3 / GLM-4-MoE routers that pick 2 of 2 groups of 4 experts
CASES = [(f, GROUPED if f in ("deepseek_v3", "glm4_moe") else {}) for f in FAMILIES]
CASES.append(("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)))


def eight(family, seed=0, **overrides):
    """A tiny model of `family` with 8 routed experts and small routing-score corrections (random init spreads
    them wide, and then they, not the tokens, decide the routing)."""
    base = AutoConfig.for_model(family)
    key = next(k for k in EXPERT_COUNT_FIELDS if hasattr(base, k))
    model = tiny_model(family, seed=seed, **{key: 8}, **overrides)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 0.02)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def random_scores(model, seed=1, offset=0.0):
    """Per-expert scores, each layer its own (layer i shifted by i x offset)."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(num_experts(m), generator=gen) + i * offset
            for i, (name, m) in enumerate(fmoe.find_experts(model).items())}


@contextmanager
def routed_away(model, plan):
    """The unpruned model with the dropped experts' router logits at -inf: F.linear adds a 0/-inf mask when its
    weight is a router's (routers call F.linear or nn.Linear.forward), and routing-score corrections (DeepSeek-V3,
    GLM-4-MoE, ERNIE) of dropped experts are -inf too, so no dropped expert is ever picked."""
    layers, masks, corrections = moe_layers(model), {}, []
    for name, ids in plan.keep.items():
        router = model.get_submodule(layers[name].router)
        mask = torch.full((plan.num_experts[name],), float("-inf"))
        mask[ids] = 0.0
        masks[id(router.weight)] = (router.weight, mask)
        for owner in (router, getattr(router, "moe_statics", None)):
            bias = getattr(owner, "e_score_correction_bias", None)
            if bias is not None:
                corrections.append((bias, bias.detach().clone()))
                bias.data += mask.view_as(bias)
    linear = F.linear

    def masked_linear(x, weight, bias=None):
        out = linear(x, weight, bias)
        hit = masks.get(id(weight)) or next((m for m in masks.values() if m[0].shape == weight.shape  # a float32 copy
                                             and torch.equal(m[0].float(), weight.float())), None)
        return out if hit is None else out + hit[1].to(out.dtype)

    F.linear = masked_linear
    try:
        yield model
    finally:
        F.linear = linear
        for bias, value in corrections:
            bias.data.copy_(value)


def untouched(model):
    """Every tensor outside the routed experts and routers (attention, norms, shared experts and their gates)."""
    skip = tuple(n for layer in moe_layers(model).values() for n in (layer.experts + ".", layer.router + "."))
    return {n: t.clone() for n, t in model.state_dict().items() if not n.startswith(skip)}


SCOPED = [(f, o, scope) for f, o in CASES for scope in ("layer", "global")]


@pytest.mark.parametrize("family,overrides,scope", SCOPED, ids=[f"{f}{'-groups' if o else ''}-{s}" for f, o, s in SCOPED])
def test_dropped_equals_router_logits_at_minus_inf(family, overrides, scope):
    """Group-limited routers (overrides) lose experts from every group alike, in both scopes."""
    model = eight(family, **overrides)
    grouped = any(router_groups(model.get_submodule(layer.router)) for layer in moe_layers(model).values())
    assert grouped == bool(overrides)
    probe = make_batches(n_batches=1, batch_size=2, pad="right")[0]
    if scope == "layer":  # 3 per layer, or 1 from each of 2 groups
        plan = plan_experts(model, random_scores(model), count=2 if grouped else 3, criterion="random")
    else:  # the second layer's scores run higher: it loses fewer
        plan = plan_experts(model, random_scores(model, offset=0.3), count=4 if grouped else 5, scope="global",
                            normalize="none")
        assert len(set(plan.kept_counts().values())) > 1
        assert all(sum(e < 4 for e in ids) * 2 == len(ids) for ids in plan.keep.values()) or not grouped
    assert len({tuple(ids) for ids in plan.keep.values()}) > 1  # each layer its own experts
    dense = logits(model, probe)
    with routed_away(model, plan):
        expected = logits(model, probe)
    assert not torch.allclose(dense, expected, atol=1e-4)  # the dropped experts mattered
    before = untouched(model)
    drop_experts(model, plan)
    torch.testing.assert_close(logits(model, probe), expected, rtol=1e-5, atol=1e-5)
    after = untouched(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    for name, layer in moe_layers(model).items():
        kept = len(plan.keep[name])
        assert num_experts(model.get_submodule(name)) == kept
        assert model.get_submodule(layer.router).weight.shape[0] == kept
    assert plan.meta["achieved"] == pytest.approx(plan.removed_fraction())


def test_amount_plan_and_its_file(tmp_path):
    model = eight("qwen2_moe")
    plan = plan_experts(model, random_scores(model), amount=0.25, criterion="frequency")
    assert set(plan.kept_counts().values()) == {6} and plan.removed_fraction() == pytest.approx(0.25)
    plan.save(tmp_path / "experts.json")
    loaded = ExpertPlan.load(tmp_path / "experts.json")
    assert loaded == plan
    (tmp_path / "other.json").write_text('{"format": "fmoe.PruningPlan/1"}')
    with pytest.raises(ValueError, match="not an fmoe expert plan"):
        ExpertPlan.load(tmp_path / "other.json")
    global_plan = plan_experts(model, random_scores(model, offset=0.3), amount=0.25, scope="global", normalize="none")
    assert sum(8 - k for k in global_plan.kept_counts().values()) == 4  # equal experts: 1/4 of them
    assert len(set(global_plan.kept_counts().values())) > 1


@pytest.mark.parametrize("family,count", [("olmoe", 2), ("mixtral", 7), ("qwen3_moe", 2), ("deepseek_v3", 2),
                                          ("ernie4_5_moe", 7)])
def test_uniform_drop_round_trips_and_loads_stock(family, count, tmp_path):
    """Count 7 keeps one expert, fewer than top_k = 2: routers and config then pick one."""
    model = eight(family, **(GROUPED if family == "deepseek_v3" else {}))
    probe = make_batches(n_batches=1, batch_size=2, pad="right", seed=2)[0]
    plan = plan_experts(model, random_scores(model), count=count)
    with routed_away(model, plan):
        expected = logits(model, probe)
    drop_experts(model, plan)
    torch.testing.assert_close(logits(model, probe), expected, rtol=1e-5, atol=1e-5)
    assert model.config.num_experts_per_tok == min(2, 8 - count)
    assert all(getattr(model.config, k) == 8 - count for k in EXPERT_COUNT_FIELDS if hasattr(model.config, k))
    assert not hasattr(model.config, EXPERT_COUNTS_FIELD)
    expected = logits(model, probe)
    fmoe.save_pretrained(model, tmp_path / "m")
    torch.testing.assert_close(logits(fmoe.from_pretrained(tmp_path / "m"), probe), expected, rtol=0, atol=0)
    if family in ("olmoe", "mixtral", "qwen3_moe"):  # the others size shared experts from the routed width field
        assert is_stock_loadable(model)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        torch.testing.assert_close(logits(stock, probe), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family,overrides", [("qwen2_moe", {}), ("gpt_oss", {}), ("phimoe", {}), ("ernie4_5_moe", {}),
                                              ("glm4_moe", GROUPED)])
def test_uneven_drop_round_trips(family, overrides, tmp_path):
    model = eight(family, **overrides)
    probe = make_batches(n_batches=1, batch_size=2, pad="right", seed=2)[0]
    drop_experts(model, plan_experts(model, random_scores(model, offset=0.3), count=4 if overrides else 5,
                                     scope="global", normalize="none"))
    counts = {name: num_experts(m) for name, m in fmoe.find_experts(model).items()}
    assert len(set(counts.values())) > 1 and getattr(model.config, EXPERT_COUNTS_FIELD) == counts
    assert not is_stock_loadable(model)
    expected = logits(model, probe)
    fmoe.save_pretrained(model, tmp_path / "m")
    loaded = fmoe.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(loaded, probe), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_drop_then_dims_equals_masked(family):
    model = eight(family, **(GROUPED if family == "deepseek_v3" else {}))
    probe = make_batches(n_batches=1, batch_size=2, pad="right", seed=1)[0]
    dims = fmoe.score(model, make_batches(n_batches=1, batch_size=2), criterion="fisher")
    magnitude = fmoe.score(model, criterion="magnitude")
    plan = plan_experts(model, random_scores(model), count=2)
    drop_experts(model, plan)
    carried = select_scores(magnitude, plan, model)  # scores of the kept experts == the dropped model's own
    rescored = fmoe.score(model, criterion="magnitude")
    assert carried.fingerprint == rescored.fingerprint
    assert all(torch.equal(carried.tensors[n], rescored.tensors[n]) for n in rescored.tensors)
    dims_plan = fmoe.make_plan(select_scores(dims, plan, model), 0.5, "layer", multiple_of=4, model=model)
    with fmoe.masked(model, dims_plan):
        expected = logits(model, probe)
    fmoe.prune(model, dims_plan)
    torch.testing.assert_close(logits(model, probe), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="another model"):
        select_scores(fmoe.score(eight(family, seed=3, **(GROUPED if family == "deepseek_v3" else {})),
                                 criterion="magnitude"), plan, model)


@pytest.mark.filterwarnings("ignore:expert width")  # multiple_of=1: widths grouped_mm cannot run
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "phimoe"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_dims_then_drop_equals_ragged_routed_away(family, scope, tmp_path):
    model = eight(family)
    probe = make_batches(n_batches=1, batch_size=2, pad="right", seed=1)[0]
    fmoe.prune(model, fmoe.make_plan(fmoe.score(model, criterion="magnitude"), 0.5, "layer", multiple_of=1))
    modules = fmoe.find_experts(model)
    assert all(isinstance(m, fmoe.RaggedExperts) for m in modules.values())
    if scope == "layer":  # the kept experts stay ragged
        plan = plan_experts(model, random_scores(model), count=2)
    else:  # each layer keeps only the experts of its most common width: a stock module again
        scores = {}
        for name, m in modules.items():
            widths = torch.tensor(expert_widths(m))
            common = widths.mode().values
            scores[name] = (widths == common).float() + 0.1 * torch.rand(len(widths))
        count = sum(int((s < 1).sum()) for s in scores.values())
        plan = plan_experts(model, scores, count=count, scope="global", normalize="none")
    with routed_away(model, plan):
        expected = logits(model, probe)
    drop_experts(model, plan)
    torch.testing.assert_close(logits(model, probe), expected, rtol=1e-5, atol=1e-5)
    modules = fmoe.find_experts(model)
    assert getattr(model.config, WIDTHS_FIELD) == {n: expert_widths(m) for n, m in modules.items()}
    assert all(isinstance(m, fmoe.RaggedExperts) == (scope == "layer") for m in modules.values())
    fmoe.save_pretrained(model, tmp_path / "m")
    torch.testing.assert_close(logits(fmoe.from_pretrained(tmp_path / "m"), probe), expected, rtol=1e-5, atol=1e-5)


def test_plan_errors():
    model = eight("mixtral")
    plan = plan_experts(model, random_scores(model), count=2)
    with pytest.raises(ValueError, match="another model"):
        drop_experts(eight("mixtral", seed=5), plan)
    drop_experts(model, plan)
    with pytest.raises(ValueError, match="does not fit"):  # twice with the same plan
        drop_experts(model, plan)
    with pytest.raises(ValueError, match="no expert"):
        plan_experts(model, random_scores(model), amount=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        plan_experts(model, random_scores(model), amount=0.5, count=2)
    with pytest.raises(ValueError, match="at most 10"):  # 6 experts in each of 2 layers, one must stay
        plan_experts(model, random_scores(model), count=11, scope="global")
    grouped = eight("deepseek_v3", **GROUPED)
    scores = random_scores(grouped)
    with pytest.raises(ValueError, match="divide by 2"):
        plan_experts(grouped, scores, count=3)
    with pytest.raises(ValueError, match="at least 2"):  # 3 of 4 from each group leaves 1: no top-2 to rank by
        plan_experts(grouped, scores, count=6)
    with pytest.raises(ValueError, match="at most 8"):  # 2 of 4 from each group of each layer, in pairs
        plan_experts(grouped, scores, count=10, scope="global")
    with pytest.raises(ValueError, match="reaches 6 .a group-limited"):  # in pairs: 7 is out of reach
        plan_experts(grouped, scores, count=7, scope="global")
    broken = plan_experts(grouped, scores, count=2)
    first = next(iter(broken.keep))
    broken.keep[first] = [0, 1, 2, 3, 4, 5]  # 4 from the first group, 2 from the second
    with pytest.raises(ValueError, match="same number"):
        drop_experts(grouped, broken)
    single = eight("glm4_moe")  # n_group=1, as GLM-4.5/4.6 ship: the router still ranks its one group by .topk(2)
    with pytest.raises(ValueError, match="at least 2; the plan keeps 1"):
        plan_experts(single, random_scores(single), count=7)
    deepest = plan_experts(single, random_scores(single, offset=0.3), amount=0.99, scope="global")
    assert set(deepest.kept_counts().values()) == {2}  # the ranking stops at each layer's minimum
    narrow = eight("deepseek_v3", n_group=2, topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="top_k=3"):  # 3 experts from 1 group of 2 kept
        plan_experts(narrow, random_scores(narrow), count=4)


def test_dropping_compressed_experts_keeps_each_experts_vectors(tmp_path):
    """Compressed experts, then an expert drop, equal the drop first and compressed experts holding the kept rows of
    the same (random) vectors; the result round-trips."""
    from fmoe.model.structure import VECTORS
    from fmoe.methods.compressed import compress_experts

    model, reference = eight("olmoe"), eight("olmoe")
    scores = random_scores(model)
    compress_experts(model, main=1)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in fmoe.find_experts(model).values():
            for key in VECTORS:
                getattr(m, key).copy_(torch.rand(getattr(m, key).shape, generator=gen) + 0.5)
    vectors = {n: {k: getattr(m, k).detach().clone() for k in VECTORS} for n, m in fmoe.find_experts(model).items()}
    plan = plan_experts(model, scores, count=3)
    drop_experts(model, plan)
    drop_experts(reference, plan_experts(reference, scores, count=3))
    compress_experts(reference, main=1)
    with torch.no_grad():
        for n, m in fmoe.find_experts(reference).items():
            for key in VECTORS:
                getattr(m, key).copy_(vectors[n][key][plan.keep[n]])
    batch = make_batches(n_batches=1, seed=3)[0]
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    fmoe.save_pretrained(model, tmp_path / "m")
    torch.testing.assert_close(logits(fmoe.from_pretrained(tmp_path / "m"), batch), logits(model, batch), rtol=0, atol=0)
