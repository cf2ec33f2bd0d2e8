"""The registry of compression methods: every method plans from one calibration, saves, loads and applies the same
way, and the Lightning callbacks and the recipe reach exactly what the library computes."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader

import fmoe
from fmoe import methods
from fmoe.lightning.callbacks import BlockDropping, ExpertPruning, LayerDropping
from fmoe.lightning.calibration import CalibrationModule
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import make_batches
from tests.test_lightning import sequences, trainer

# 4 layers of 8 experts (top-2): every method has room at 25% and 50%
CONFIG = dict(num_experts=8, num_hidden_layers=4)


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model("olmoe", **CONFIG)
    return model, methods.calibrate(model, make_batches(n_batches=2, seed=1), progress=False)


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid: dims, expert_drop"):
        methods.method("merge_experts")


@pytest.mark.parametrize("name", list(methods.METHODS))
@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_every_method_plans_saves_loads_and_applies_alike(calibrated, name, amount, tmp_path):
    model, calibration = calibrated
    compressed = copy.deepcopy(model)
    plan = fmoe.compress(compressed, name, amount, calibration)
    assert 0 < plan.meta["achieved"] <= 1
    plan.save(tmp_path / "plan.json")
    loaded = fmoe.load_plan(tmp_path / "plan.json")
    assert type(loaded) is methods.METHODS[name].plan_type and loaded.to_dict() == plan.to_dict()
    replayed = fmoe.apply_plan(copy.deepcopy(model), loaded)
    probe = make_batches(n_batches=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(replayed(**probe).logits, compressed(**probe).logits, rtol=0, atol=0)
        changed = not torch.allclose(compressed(**probe).logits, model(**probe).logits)
    assert changed
    fewer = fmoe.active_parameters(compressed) < fmoe.active_parameters(model)
    assert fewer and (name == "compressed_experts" or
                      sum(p.numel() for p in compressed.parameters()) < sum(p.numel() for p in model.parameters()))
    fmoe.save_pretrained(compressed, tmp_path / "export")
    with torch.no_grad():
        torch.testing.assert_close(fmoe.from_pretrained(tmp_path / "export")(**probe).logits,
                                   compressed(**probe).logits, rtol=0, atol=0)


def test_a_method_without_its_statistics_is_refused(calibrated):
    model, calibration = calibrated
    with pytest.raises(ValueError, match="plans from statistics"):
        methods.make(model, "reap", 0.25, fmoe.Calibration(scores=calibration.scores))


@pytest.mark.parametrize("callback, name, options", [
    (lambda: ExpertPruning(amount=0.25, criterion="reap"), "reap", {}),
    (lambda: ExpertPruning(amount=0.5, criterion="fisher", scope="global"), "expert_fisher", {"scope": "global"}),
    (lambda: LayerDropping(count=1), "layer_drop", {"count": 1}),
    (lambda: BlockDropping(count=2, mode="consecutive"), "block_drop", {"count": 2, "mode": "consecutive"}),
])
def test_callbacks_reach_what_the_library_computes(tmp_path, callback, name, options):
    model = tiny_model("olmoe", **CONFIG)
    reference = copy.deepcopy(model)
    data = sequences()
    compression = callback()
    compression.save_dir = tmp_path / "out"
    module = CalibrationModule(model)  # the callback turns on the expert and layer statistics
    trainer(tmp_path, callbacks=[compression]).fit(module, DataLoader(data, batch_size=4))
    batches = [torch.utils.data.default_collate(data[i:i + 4]) for i in (0, 4)]
    calibration = methods.calibrate(reference, batches, progress=False)
    amount = None if "count" in options else compression.amount
    expected = fmoe.compress(reference, name, amount, calibration, **options)
    assert compression.plan.to_dict() == expected.to_dict()
    probe = make_batches(n_batches=1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, reference(**probe).logits, rtol=1e-5, atol=1e-6)
    assert fmoe.load_plan(tmp_path / "out" / "plan.json").to_dict() == expected.to_dict()
    saved = fmoe.Statistics.load(tmp_path / "out" / "statistics")
    for criterion, tensors in calibration.statistics.experts.items():
        for layer, t in tensors.items():
            torch.testing.assert_close(saved.experts[criterion][layer], t, rtol=1e-5, atol=1e-8)


def test_recipe_compresses_with_any_method(tmp_path):
    from fmoe.recipes import prune_recover

    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
              "--task_limit", "10", "--data.n_samples", "16", "--lm_eval.tasks", "[]"]
    rows = prune_recover.main([*common, "--export_dir", str(tmp_path / "reap"), "--prune.method", "reap",
                               "--prune.amount", "0.25", "--stages.recover", "false"])
    plan = fmoe.load_plan(tmp_path / "plan.json")
    assert isinstance(plan, fmoe.ExpertPlan) and set(plan.kept_counts().values()) == {6}
    assert rows["pruned"]["params"] < rows["dense"]["params"]
    loaded = fmoe.from_pretrained(tmp_path / "reap")
    # still top-2 of equal experts: as much expert compute per token; 2 router rows per layer fewer
    router_rows = 2 * loaded.config.num_hidden_layers * loaded.config.hidden_size
    assert rows["dense"]["active"] - rows["pruned"]["active"] == router_rows
    assert {m.down_proj.shape[0] for m in fmoe.find_experts(loaded).values()} == {6}

    rows = prune_recover.main([*common, "--export_dir", str(tmp_path / "ce"), "--prune.method", "compressed_experts",
                               "--recover.max_steps", "4", "--recover.val_check_interval", "2"])
    assert list(rows) == ["dense", "pruned", "recovered"]
    assert rows["recovered"]["active"] < rows["dense"]["active"] < rows["recovered"]["params"]
    loaded = fmoe.from_pretrained(tmp_path / "ce")
    vectors = [p for n, p in loaded.named_parameters() if "compress_" in n]
    assert vectors and any(not torch.equal(v, torch.ones_like(v)) for v in vectors)  # trained in the recovery stage


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_edit_cuts_an_empty_model_to_the_same_shapes(calibrated, name):
    """A non-zero rank under FSDP2 holds the model on meta: rank 0 plans, every rank applies the plan."""
    from fmoe.model.checkpoint import empty_model

    model, calibration = calibrated
    plan = methods.make(model, name, 0.5, calibration)
    empty = fmoe.apply_plan(empty_model(copy.deepcopy(model.config)), plan)
    real = fmoe.apply_plan(copy.deepcopy(model), plan)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    assert empty.config.to_dict() == real.config.to_dict()


def test_statistics_of_another_model_are_refused(calibrated):
    _, calibration = calibrated
    other = tiny_model("olmoe", seed=1, **CONFIG)
    for name in ("reap", "layer_drop", "block_drop", "dims"):
        with pytest.raises(ValueError, match="another model"):
            methods.make(other, name, 0.25, calibration)


def test_expert_and_block_callbacks_on_two_processes_equal_one(tmp_path):
    """ExpertPruning under DDP and BlockDropping under FSDP2 (2 CPU processes): both ranks apply rank 0's plan, which
    is the plan of one process calibrating on the same batches; the exports equal the one-process edit."""
    from tests.test_lightning import run_two_processes

    run_two_processes(tmp_path, "methods")
    data = sequences()
    batches = [torch.utils.data.default_collate(data[i:i + 2]) for i in range(0, 8, 2)]
    probe = make_batches(n_batches=1, seed=5)[0]
    for name, options in (("reap", {"count": 1}), ("block_drop", {"count": 1})):
        plans = [fmoe.load_plan(tmp_path / name / f"plan_rank{r}.json").to_dict() for r in (0, 1)]
        reference = tiny_model("qwen3_moe", num_hidden_layers=3)
        expected = fmoe.compress(reference, name, None, methods.calibrate(reference, batches, progress=False), **options)
        assert plans[0] == plans[1] == expected.to_dict()
        with torch.no_grad():
            torch.testing.assert_close(fmoe.from_pretrained(tmp_path / name / "export")(**probe).logits,
                                       reference(**probe).logits, rtol=1e-5, atol=1e-6)


def test_drop_experts_then_slim_the_survivors_from_one_calibration(calibrated, tmp_path):
    model, calibration = calibrated
    compressed = copy.deepcopy(model)
    dropped = fmoe.compress(compressed, "reap", 0.25, calibration)
    slimmed = fmoe.compress(compressed, "dims", 1 / 3, calibration.after(dropped, compressed), multiple_of=1,
                            max_widths=None)
    routed = lambda m: sum(p.numel() for e in fmoe.find_experts(m).values() for p in e.parameters())  # noqa: E731
    assert routed(compressed) / routed(model) == pytest.approx(0.5, abs=0.01)
    replayed = fmoe.apply_plan(fmoe.apply_plan(copy.deepcopy(model), dropped), slimmed)  # the two plans, replayed
    probe = make_batches(n_batches=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(replayed(**probe).logits, compressed(**probe).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="only an expert drop"):
        calibration.after(fmoe.methods.make(model, "layer_drop", 0.25, calibration), model)


# every option a planner varies in shape (its scopes, Block Drop's modes): the amount sweep covers each one
VARIANTS = {"dims": [{"scope": s} for s in ("expert", "layer", "global")],
            **{n: [{"scope": s} for s in ("layer", "global")]
               for n in ("expert_drop", "expert_frequency", "reap", "expert_fisher")},
            "block_drop": [{"mode": m} for m in ("discrete", "consecutive")]}
FAMILY_CASES = [(f, {}) for f in FAMILIES] + [  # and group-limited routers, 8 experts in 2 groups
    ("deepseek_v3", dict(n_routed_experts=8, n_group=2, topk_group=1)),
    ("glm4_moe", dict(n_routed_experts=8, n_group=2, topk_group=2)),
    ("deepseek_v2", dict(n_routed_experts=8, topk_method="group_limited_greedy", n_group=2, topk_group=1))]


@pytest.mark.parametrize("family,overrides", FAMILY_CASES,
                         ids=[f + ("-groups" if o else "") for f, o in FAMILY_CASES])
def test_every_plan_runs_on_every_family_at_extreme_amounts(family, overrides):
    """A plan never makes a model that cannot run: at every amount up to 0.99, each method (each scope or mode)
    either refuses with a ValueError or plans an edit after which the forward runs and stays finite; every one
    accepts some amount of the sweep (one calibration per family, copies of the model per plan)."""
    model = tiny_model(family, **overrides)
    calibration = methods.calibrate(model, make_batches(n_batches=1), progress=False)
    probe = make_batches(n_batches=1, seed=7)[0]
    for name in methods.METHODS:
        for options in VARIANTS.get(name, [{}]):
            accepted = []
            for amount in (0.5, 0.75, 0.99):
                edited = copy.deepcopy(model)
                try:
                    plan = methods.make(edited, name, amount, calibration, **options)
                except ValueError as refusal:
                    assert str(refusal)
                    continue
                methods.method(name).edit(edited, plan)
                with torch.no_grad():
                    logits = edited(**probe).logits
                assert torch.isfinite(logits).all(), (name, options, amount)
                accepted.append(amount)
            assert accepted, f"{name} {options} refused every amount of the sweep on {family}"


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_edit_leaves_the_callers_config_alone(calibrated, name):
    """transformers' from_config shares the caller's config object with the model: an edit must not rewrite it,
    or the next model built from that config comes out compressed."""
    from transformers import AutoModelForCausalLM

    model, calibration = calibrated
    config = copy.deepcopy(model.config)
    before = config.to_dict()
    built = AutoModelForCausalLM.from_config(config)
    built.load_state_dict(model.state_dict())
    plan = methods.make(model, name, 0.5, calibration)
    edited = fmoe.apply_plan(built, plan)
    assert config.to_dict() == before and edited.config is not config
    assert all(getattr(m, "config", edited.config) is edited.config for m in edited.modules())  # one config inside
    shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
    assert edited.config.to_dict() == fmoe.apply_plan(copy.deepcopy(model), plan).config.to_dict()


@pytest.fixture
def registered():
    """A method registered the way a new module would: a planner over the calibration's statistics, an edit."""
    from fmoe.methods.expert_drop import ExpertPlan, drop_experts, plan_experts

    def plan(model, calibration, amount=None, scope="layer"):  # the experts a layer's router weighs least
        statistics = calibration.need("statistics", "least_weighted", model)
        return plan_experts(model, statistics.experts["router"], amount=amount, scope=scope, criterion="router")

    def check(amount, **options):
        methods.registry.check_choices("least_weighted", options, scope=("layer",))

    methods.register("least_weighted", methods.Method(plan, drop_experts, ExpertPlan, "statistics", "a test method",
                                                      check=check))
    yield "least_weighted"
    del methods.METHODS["least_weighted"]


def test_a_new_method_is_one_registration(calibrated, registered, tmp_path):
    model, calibration = calibrated
    with pytest.raises(ValueError, match="registered already"):
        methods.register(registered, methods.METHODS[registered])
    methods.check(registered, 0.25, scope="layer")
    with pytest.raises(ValueError, match="unknown scope 'global' for method 'least_weighted'"):
        methods.check(registered, 0.25, scope="global")
    with pytest.raises(ValueError, match="takes no option"):
        methods.check(registered, 0.25, count=2)
    compressed = copy.deepcopy(model)
    plan = fmoe.compress(compressed, registered, 0.25, calibration)
    expected = fmoe.compress(copy.deepcopy(model), "expert_drop", 0.25, calibration)  # the same router statistic
    assert plan.keep == expected.keep
    plan.save(tmp_path / "plan.json")
    replayed = fmoe.apply_plan(copy.deepcopy(model), fmoe.load_plan(tmp_path / "plan.json"))
    probe = make_batches(n_batches=1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(replayed(**probe).logits, compressed(**probe).logits, rtol=0, atol=0)
