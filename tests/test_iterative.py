"""Iterative dim pruning: steps nest, the last removes the requested share, steps=1 is one shot, pruned == masked,
and the Lightning callback and the recipe give what fmoe.prune_iteratively gives."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import fmoe
from fmoe import toy
from fmoe.methods.dims.iterative import is_nested, plan_step, step_amounts
from fmoe.lightning.calibration import CalibrationModule
from fmoe.lightning.callbacks import IntermediatePruning
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches
from tests.test_lightning import close, sequences, trainer

ROOT = Path(__file__).resolve().parents[1]


def same_plan(a: fmoe.PruningPlan, b: fmoe.PruningPlan) -> bool:
    return a.widths == b.widths and a.fingerprint == b.fingerprint and a.keep.keys() == b.keep.keys() and all(
        torch.equal(x, y) for n in a.keep for x, y in zip(a.keep[n], b.keep[n], strict=True))


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_one_step_is_the_one_shot_path():
    batches = make_batches()
    one_shot, iterative = tiny_model("qwen2_moe"), tiny_model("qwen2_moe")
    expected = fmoe.make_plan(fmoe.score(one_shot, batches), 0.5, "layer", multiple_of=4, model=one_shot)
    fmoe.prune(one_shot, expected)
    plan = fmoe.prune_iteratively(iterative, batches, 0.5, steps=1, multiple_of=4, progress=False)
    assert same_plan(plan, expected) and expected.meta.items() <= plan.meta.items()
    assert plan.meta["steps"] == 1 and plan.meta["step_ratios"] == [0.5]
    a, b = one_shot.state_dict(), iterative.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_steps_nest_reach_the_share_and_pruned_equals_masked(family):
    batches, probe = make_batches(), make_batches(n_batches=1, seed=5, pad="right")[0]
    model, original = tiny_model(family), tiny_model(family)
    seen = []

    def after_step(m, plan, step):  # the step's mask is in place: the model runs as the plan masks the original
        with fmoe.masked(original, plan.keep):
            torch.testing.assert_close(logits(m, probe), logits(original, probe))
        seen.append((step, copy.deepcopy(plan)))

    plan = fmoe.prune_iteratively(model, batches, 0.6, steps=4, after_step=after_step, multiple_of=1,
                                  max_widths=None, progress=False)
    amounts = step_amounts(0.6, 4)
    assert [s for s, _ in seen] == [1, 2, 3, 4] and plan.meta["step_ratios"] == amounts and plan.meta["clipped"] == 0
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert is_nested(after, before) and after.removed_fraction() > before.removed_fraction()
    for (_, step_plan), r in zip(seen, amounts):  # layer scope, multiple_of=1: each layer keeps exactly round()
        for name, widths in step_plan.kept_widths().items():
            assert sum(widths) == round(sum(step_plan.widths[name]) * (1 - r))
    assert same_plan(plan, seen[-1][1])
    with fmoe.masked(original, plan):
        torch.testing.assert_close(logits(model, probe), logits(original, probe), rtol=1e-4, atol=1e-5)


def test_after_step_may_change_the_weights():
    model, seen = tiny_model("qwen2_moe"), []
    dense = fmoe.fingerprint(model)

    def reconstruct(m, plan, step):  # stands for a reconstruction of the layer outputs
        with torch.no_grad():
            for experts in fmoe.find_experts(m).values():
                experts.down_proj.mul_(1.5)
        seen.append(fmoe.fingerprint(m))

    plan = fmoe.prune_iteratively(model, make_batches(), 0.5, steps=2, after_step=reconstruct, multiple_of=4,
                                  progress=False)
    assert dense not in seen and plan.fingerprint == seen[-1]  # the plan names the model it pruned


def test_rounding_never_brings_a_removed_dim_back():
    gen = torch.Generator().manual_seed(0)
    dense = fmoe.Scores({"m": torch.rand(2, 8, generator=gen) + torch.tensor([[0.0] * 8, [2.0] * 8])}, "fisher", "fp")
    previous = fmoe.make_plan(dense, 0.5, "layer", multiple_of=1, max_widths=None)  # expert 1 keeps the most
    assert previous.kept_widths()["m"][0] < 4
    masked = torch.zeros(2, 8)
    for e, keep in enumerate(previous.keep["m"]):
        masked[e, keep] = dense.tensors["m"][e, keep]  # what scoring inside the mask gives: removed dims score 0
    # min_width 4 asks expert 0 for more dims than it still has: it keeps its own, and nothing comes back
    plan = plan_step(fmoe.Scores({"m": masked}, "fisher", "fp"), 0.6, "layer", previous, multiple_of=2, min_width=4,
                     max_widths=None)
    assert is_nested(plan, previous) and plan.meta["clipped"] > 0
    assert plan.kept_widths()["m"][0] == previous.kept_widths()["m"][0]


def test_schedules_and_bad_arguments():
    assert step_amounts(0.75, 1) == [0.75] and step_amounts(0.6, 3) == pytest.approx([0.2, 0.4, 0.6])
    geometric = step_amounts(0.75, 4, "geometric")
    assert geometric[-1] == 0.75
    remaining = [1.0] + [1 - r for r in geometric]
    assert [b / a for a, b in zip(remaining, remaining[1:])] == pytest.approx([0.25 ** 0.25] * 4)  # same share each
    model = tiny_model("qwen2_moe")
    with pytest.raises(ValueError, match="steps"):
        fmoe.prune_iteratively(model, make_batches(), 0.5, steps=0)
    with pytest.raises(ValueError, match="schedule"):
        fmoe.prune_iteratively(model, make_batches(), 0.5, schedule="cosine")
    with pytest.raises(ValueError, match="re-iterable"):
        fmoe.prune_iteratively(model, iter(make_batches()), 0.5, steps=2)
    with pytest.raises(ValueError, match="steps"):
        IntermediatePruning(steps=0)


def test_on_the_toy_scoring_again_changes_the_plan():
    model, tokenizer, config = toy.load()
    original = copy.deepcopy(model)
    texts = [r["text"] for r in toy.read_jsonl(toy.corpus_files(config)["arithmetic"]["train"])[:16]]
    batches = toy.batches(tokenizer, texts, batch_size=16)
    one_shot = fmoe.make_plan(fmoe.score(model, batches, progress=False), 0.75, "layer", multiple_of=1,
                              max_widths=None, model=model)
    calls = []
    plan = fmoe.prune_iteratively(model, batches, 0.75, steps=3, multiple_of=1, max_widths=None, progress=False,
                                  after_step=lambda m, p, s: calls.append(copy.deepcopy(p)))
    assert len(calls) == 3 and all(is_nested(b, a) for a, b in zip(calls, calls[1:]))
    assert plan.removed_fraction() == one_shot.removed_fraction() == 0.75 and not same_plan(plan, one_shot)
    with fmoe.masked(original, plan):
        torch.testing.assert_close(logits(model, batches[0]), logits(original, batches[0]), rtol=1e-4, atol=1e-4)


def test_lightning_steps_equal_prune_iteratively(tmp_path):
    data = sequences()
    batches = [default_collate(data[i:i + 4]) for i in (0, 4)]
    reference, plans = tiny_model("qwen2_moe"), []
    expected = fmoe.prune_iteratively(reference, batches, 0.5, steps=3, multiple_of=4, progress=False,
                                      after_step=lambda m, p, s: plans.append(copy.deepcopy(p)))
    model = tiny_model("qwen2_moe")
    pruning = IntermediatePruning(amount=0.5, multiple_of=4, steps=3, save_dir=tmp_path / "out")
    trainer(tmp_path, callbacks=[pruning]).fit(CalibrationModule(model), DataLoader(data, batch_size=4))
    assert same_plan(pruning.plan, expected) and pruning.plan.meta["steps"] == 3
    probe = make_batches(n_batches=1, seed=5, pad="right")[0]
    torch.testing.assert_close(logits(model, probe), logits(reference, probe))
    fresh = tiny_model("qwen2_moe")
    with fmoe.masked(fresh, plans[1]):  # the scores saved are the last step's: step 2's plan masked
        last = fmoe.score(fresh, batches, progress=False)
    saved = fmoe.Scores.load(tmp_path / "out" / "scores")
    close(saved, last)
    assert saved.samples == 8


def two_processes(out: Path) -> None:
    """Run as a script: a 2-process DDP calibration (gloo) pruning in 3 steps; each rank saves its plan."""
    pruning = IntermediatePruning(amount=0.5, multiple_of=4, steps=3, save_dir=out)
    fit = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=1, callbacks=[pruning])
    fit.fit(CalibrationModule(tiny_model("qwen3_moe")), DataLoader(sequences(), batch_size=2))
    pruning.plan.save(out / f"plan_rank{fit.global_rank}.json")


def test_steps_under_ddp_equal_one_process(tmp_path):
    """Each rank scores its shard again at each step, sums are reduced over ranks, rank 0 plans for both."""
    subprocess.run([sys.executable, __file__, str(tmp_path)], check=True, timeout=300, cwd=tmp_path,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    data = sequences()
    batches = [default_collate(data[i:i + 2]) for i in range(0, 8, 2)]
    plans = []
    expected = fmoe.prune_iteratively(tiny_model("qwen3_moe"), batches, 0.5, steps=3, multiple_of=4, progress=False,
                                      after_step=lambda m, p, s: plans.append(copy.deepcopy(p)))
    saved = [json.loads((tmp_path / f"plan_rank{r}.json").read_text()) for r in (0, 1)]
    assert saved[0] == saved[1] == json.loads(json.dumps(expected.to_dict()))
    fresh = tiny_model("qwen3_moe")
    with fmoe.masked(fresh, plans[1]):
        last = fmoe.score(fresh, batches, progress=False)
    close(fmoe.Scores.load(tmp_path / "scores"), last)  # the last step's, every sample once
    assert fmoe.Scores.load(tmp_path / "scores").samples == 8


def test_lightning_steps_refused_where_they_cannot_run():
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = CalibrationModule(tiny_model("qwen2_moe"))
    with pytest.raises(TypeError, match="ModelParallelStrategy"):
        IntermediatePruning(steps=2).setup(SimpleNamespace(strategy=ModelParallelStrategy()), module, "fit")
    with pytest.raises(TypeError, match="CalibrationModule"):
        IntermediatePruning(steps=2).setup(SimpleNamespace(strategy=object(), callbacks=[]), torch.nn.Module(), "fit")
    IntermediatePruning(steps=1).setup(SimpleNamespace(strategy=ModelParallelStrategy()), module, "fit")


def test_recipe_prunes_in_steps(tmp_path):
    from fmoe.recipes import prune_recover

    export = tmp_path / "e"
    rows = prune_recover.main(["--export_dir", str(export), "--trainer.default_root_dir", str(tmp_path),
                               "--trainer.enable_progress_bar", "false", "--stages.recover", "false",
                               "--data.n_samples", "16", "--data.max_eval_samples", "16", "--task_limit", "10",
                               "--prune.steps", "2", "--lm_eval.tasks", "[]"])
    assert list(rows) == ["dense", "pruned"] and "arithmetic_acc" in rows["pruned"]
    plan = fmoe.PruningPlan.load(tmp_path / "plan.json")
    assert plan.meta["steps"] == 2 and plan.meta["step_ratios"] == [0.25, 0.5]
    model = fmoe.from_pretrained(export)
    assert {n: fmoe.model.experts.expert_widths(m) for n, m in fmoe.find_experts(model).items()} == plan.kept_widths()
    # --prune.reconstruct: the same plan sliced from the toy, then only the kept down columns refit
    prune_recover.main(["--export_dir", str(tmp_path / "ls"), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.enable_progress_bar", "false", "--stages.recover", "false",
                        "--stages.evaluate", "false", "--data.n_samples", "16", "--prune.steps", "2",
                        "--prune.reconstruct", "true"])
    refit, sliced = fmoe.from_pretrained(tmp_path / "ls"), fmoe.prune(fmoe.toy.load()[0], plan)
    for name, module in fmoe.find_experts(sliced).items():
        for key, tensor in fmoe.find_experts(refit)[name].state_dict().items():
            same = torch.equal(tensor, module.state_dict()[key])
            refit_expected = key.endswith("down_proj") and tensor.shape[-1] < 128  # experts keeping all 128 stay
            assert same != refit_expected, key  # up projections as sliced, pruned down projections refit
    from fmoe.methods.dims.refit import LAM

    saved = fmoe.PruningPlan.load(tmp_path / "plan.json")  # the plan.json says what was applied: the refit too
    assert "reconstruct" not in plan.meta and saved.meta.pop("reconstruct") == {"lam": LAM}
    assert saved.to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="steps"):
        prune_recover.main(["--trainer.default_root_dir", str(tmp_path), "--prune.method", "reap",
                            "--prune.steps", "2", "--stages.evaluate", "false", "--tasks", "{}"])



def test_iterative_with_reconstruction_refits_the_iterative_plan():
    model, reference = tiny_model("olmoe"), tiny_model("olmoe")
    batches = make_batches(n_batches=2, seed=1)
    plan = fmoe.prune_iteratively(model, batches, 0.5, steps=3, reconstruct=True, multiple_of=1, max_widths=None)
    expected = fmoe.reconstruct(reference, plan, batches)  # the same plan, refit from the unpruned model
    for (name, a), b in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), name
    plain = fmoe.prune(tiny_model("olmoe"), plan)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ValueError, match="not an iterator"):
        fmoe.prune_iteratively(tiny_model("olmoe"), iter(batches), 0.5, steps=1, reconstruct=True)
    with pytest.raises(ValueError, match="no calibration token"):
        fmoe.reconstruct(tiny_model("olmoe"), plan, [])


def test_a_criterion_function_scores_each_step():
    model, reference = tiny_model("olmoe"), tiny_model("olmoe")
    batches = make_batches(n_batches=2, seed=1)
    mixed = lambda m: fmoe.calibration.scores.rank_mean(fmoe.score(m, batches, "compensated"), fmoe.score(m, batches, "router"))  # noqa: E731
    plan = fmoe.prune_iteratively(model, batches, 0.5, steps=2, criterion=mixed, multiple_of=1, max_widths=None)
    first = fmoe.make_plan(mixed(reference), 0.25, "layer", multiple_of=1, max_widths=None, model=reference)
    for name, keeps in plan.keep.items():  # the last step's kept dims nest in the first step's, planned from `mixed`
        assert all(set(k.tolist()) <= set(f.tolist()) for k, f in zip(keeps, first.keep[name]))


if __name__ == "__main__":
    two_processes(Path(sys.argv[1]))


def test_lightning_steps_rescore_with_a_combined_criterion(tmp_path):
    spec = "rank_mean(compensated, router)"
    data = sequences()
    batches = [default_collate(data[i:i + 4]) for i in (0, 4)]
    reference = tiny_model("qwen2_moe")
    expected = fmoe.prune_iteratively(reference, batches, 0.5, steps=2, criterion=spec, multiple_of=4, progress=False)
    model = tiny_model("qwen2_moe")
    pruning = IntermediatePruning(amount=0.5, multiple_of=4, steps=2, save_dir=tmp_path / "out")
    trainer(tmp_path, callbacks=[pruning]).fit(CalibrationModule(model, criterion=spec), DataLoader(data, batch_size=4))
    assert same_plan(pruning.plan, expected)
    assert fmoe.Scores.load(tmp_path / "out" / "scores").criterion == "rank_mean(compensated,router)"
    fisher = fmoe.prune_iteratively(tiny_model("qwen2_moe"), batches, 0.5, steps=2, multiple_of=4, progress=False)
    assert not same_plan(fisher, expected)  # the criterion decides the plan
