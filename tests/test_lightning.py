import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch.utils.data import DataLoader

import fmoe
from fmoe.lightning.data import ResumableDataLoader
from fmoe.lightning.calibration import CalibrationModule
from fmoe.lightning.callbacks import FisherScoring, IntermediatePruning
from fmoe.lightning.sharding import shard, unshard
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches

ROOT = Path(__file__).resolve().parents[1]


def sequences(n=8, seq_len=12, seed=0, padded=True):
    """A list of single sequences (dicts of 1D tensors) that a DataLoader collates into batches."""
    rows = []
    for b in make_batches(n_batches=1, batch_size=n, seq_len=seq_len, seed=seed, pad="mixed" if padded else "none"):
        for i in range(n):
            rows.append({"input_ids": b["input_ids"][i], "attention_mask": b["attention_mask"][i]})
    return rows


def trainer(tmp_path, **kw):
    kw = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path, **kw}
    return L.Trainer(**kw)


def run_two_processes(tmp_path, *args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_calibrate.py"), str(tmp_path), *args], check=True,
                   env=env, timeout=timeout, cwd=tmp_path)


def close(a: fmoe.Scores, b: fmoe.Scores, rtol=1e-4, of_max=0.0):
    """Scores equal to rtol, with an absolute tolerance of 1e-10 plus `of_max` x each module's largest score."""
    assert a.tensors.keys() == b.tensors.keys()
    for n in a.tensors:
        atol = 1e-10 + of_max * float(b.tensors[n].max())
        torch.testing.assert_close(a.tensors[n], b.tensors[n], rtol=rtol, atol=atol)


def test_calibration_fit_equals_core_scores_then_prunes(tmp_path):
    model = tiny_model("qwen2_moe")
    data = sequences()
    expected = fmoe.score(model, [torch.utils.data.default_collate(data[i:i + 4]) for i in (0, 4)])
    probe = make_batches(n_batches=1, seed=5, pad="right")[0]
    module = CalibrationModule(model, criterion="fisher")
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=tmp_path / "out")
    trainer(tmp_path, callbacks=[pruning]).fit(module, DataLoader(data, batch_size=4))
    close(module.scores, expected)
    assert module.scores.samples == 8
    assert all(p.grad is None for p in model.parameters())
    # pruned == masked: replay the plan on a fresh copy of the same model
    reference = tiny_model("qwen2_moe")
    with fmoe.masked(reference, pruning.plan):
        masked_logits = reference(**probe).logits
    torch.testing.assert_close(model(**probe).logits, masked_logits, rtol=1e-4, atol=1e-5)
    assert fmoe.PruningPlan.load(tmp_path / "out" / "plan.json").to_dict() == pruning.plan.to_dict()
    close(fmoe.Scores.load(tmp_path / "out" / "scores"), expected)


def test_bf16_mixed_calibration_keeps_the_fp32_plan(tmp_path):
    scores = {}
    for precision in ("32-true", "bf16-mixed"):
        module = CalibrationModule(tiny_model("qwen3_moe"))
        trainer(tmp_path, precision=precision).fit(module, DataLoader(sequences(), batch_size=4))
        scores[precision] = module.scores
    close(scores["bf16-mixed"], scores["32-true"], rtol=0.1)  # autocast forward/backward, float32 sums
    plans = [fmoe.make_plan(s, 0.5, "layer", multiple_of=4).to_dict()["keep"] for s in scores.values()]
    assert plans[0] == plans[1]


class UserModule(L.LightningModule):
    """A LightningModule as a user writes one: their model, their loss, their optimizer."""

    def __init__(self, model, lr=0.0):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def configure_model(self):  # for ModelParallelStrategy (FSDP2); nothing under other strategies
        shard(self, "model")

    def teardown(self, stage):
        unshard(self, self.trainer)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fisher_scoring_callback_on_a_users_module(tmp_path, accumulate):
    model = tiny_model("olmoe")
    data = sequences(padded=False)  # equal lengths: HF's token-mean loss is the mean of sequence losses
    expected = fmoe.score(model, [torch.utils.data.default_collate(data[i:i + 4]) for i in (0, 4)])
    scoring, pruning = FisherScoring(), IntermediatePruning(amount=0.5, scope="expert", save_dir=tmp_path)
    user = UserModule(model)  # lr = 0: weights stay put, so scores must equal the core's
    fit = trainer(tmp_path, callbacks=[scoring, pruning], accumulate_grad_batches=accumulate)
    fit.fit(user, DataLoader(data, batch_size=4), DataLoader(data[:4], batch_size=4))  # with validation in the fit
    close(scoring.scores, expected, rtol=1e-3)
    assert all(isinstance(m, torch.nn.Module) and fmoe.model.experts.expert_widths(m) == [16] * 4
               for m in fmoe.find_experts(model).values())
    assert model.config.intermediate_size == 16


def test_fisher_scoring_on_a_users_training_under_fsdp2_equals_ddp(tmp_path):
    run_two_processes(tmp_path, "user")
    assert [json.loads((tmp_path / s / "sharded.json").read_text()) for s in ("ddp", "fsdp2")] == [False, True]
    ddp, fsdp = (fmoe.Scores.load(tmp_path / s / "scores") for s in ("ddp", "fsdp2"))
    close(fsdp, ddp, rtol=1e-4)
    assert fsdp.fingerprint == ddp.fingerprint  # the same trained weights at the end of both fits
    for strategy in ("ddp", "fsdp2"):
        plans = [fmoe.PruningPlan.load(tmp_path / strategy / f"plan_rank{r}.json") for r in (0, 1)]
        assert plans[0].to_dict() == plans[1].to_dict() and plans[0].is_uniform()
    # the user's trained weights were gathered back before pruning: both runs end with the same model
    ddp_model, fsdp_model = (fmoe.from_pretrained(tmp_path / s / "model") for s in ("ddp", "fsdp2"))
    assert fsdp_model.config.intermediate_size == 16
    fsdp_weights, initial = fsdp_model.state_dict(), tiny_model("olmoe").state_dict()
    for key, value in ddp_model.state_dict().items():
        torch.testing.assert_close(fsdp_weights[key], value, rtol=1e-4, atol=1e-6)
    assert not torch.equal(fsdp_weights["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


def test_sharded_runs_leave_the_plain_model_and_restart_cleanly(tmp_path):
    """One process under ModelParallelStrategy: validation writes nothing back (even in bf16), a failed run leaves
    the plain model, and a later run under another strategy does not shard with the old mesh."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from fmoe.lightning.recovery import Evaluation

    class Failing(Evaluation):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            raise RuntimeError("boom")

    model = tiny_model("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = DataLoader(sequences(), batch_size=4)
    seen = []

    class Probe(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            seen.append(fmoe.lightning.sharding.is_sharded(pl_module.model))

    environ = dict(os.environ)  # Lightning sets MASTER_PORT & co. for the process group it starts here
    try:
        evaluation = Evaluation(model, ("domain",))  # the same module in both runs
        for strategy, precision in ((ModelParallelStrategy(1, 1), "bf16-true"), ("auto", "32-true")):
            trainer(tmp_path, strategy=strategy, precision=precision, callbacks=[Probe()]).validate(
                evaluation, loader, verbose=False)
            assert evaluation.model is model
        failing = Failing(model, ("domain",))
        with pytest.raises(RuntimeError, match="boom"):
            trainer(tmp_path, strategy=ModelParallelStrategy(1, 1), callbacks=[Probe()]).validate(failing, loader)
        assert failing.model is model  # the exception put the plain model back
        ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
        single_file = ModelParallelStrategy(1, 1, save_distributed_checkpoint=False)
        with pytest.raises(ValueError, match="save_distributed_checkpoint=True"):
            trainer(tmp_path, strategy=single_file, callbacks=[ckpt], enable_checkpointing=True).fit(
                CalibrationModule(model), loader)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert seen == [True, False, True]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # validation wrote nothing back


def test_lora_recovery_under_ddp_reduces_held_out_loss(tmp_path):
    run_two_processes(tmp_path, "recover")
    before, after = map(float, (tmp_path / "ppl.txt").read_text().split())
    assert after < before
    model = fmoe.from_pretrained(tmp_path / "recovered")  # merged: plain (ragged) experts, no adapters
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert any(isinstance(m, fmoe.RaggedExperts) for m in fmoe.find_experts(model).values())


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="amount"):
        IntermediatePruning(amount=1.0)
    with pytest.raises(ValueError, match="valid: expert, layer, global"):
        IntermediatePruning(scope="model")
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(TypeError, match="ModelParallelStrategy"):  # before any calibration batch runs
        IntermediatePruning().setup(SimpleNamespace(strategy=FSDPStrategy()), None, "fit")


def test_callbacks_refuse_bad_options_and_a_missing_calibration_before_the_first_batch(tmp_path):
    from fmoe.lightning.callbacks import Compression, ExpertPruning

    for amount in (1.5, -0.1):
        with pytest.raises(ValueError, match="amount"):
            Compression("reap", amount)
    with pytest.raises(ValueError, match="valid: dims, expert_drop"):
        Compression("nosuch", 0.5)
    with pytest.raises(ValueError, match="valid: layer, global"):
        ExpertPruning(0.25, scope="expert")
    with pytest.raises(ValueError, match="takes no option"):
        Compression("layer_drop", 0.25, scope="layer")

    class Counting(UserModule):
        steps = 0

        def training_step(self, batch, batch_idx):
            Counting.steps += 1
            return super().training_step(batch, batch_idx)

    model = tiny_model("olmoe")
    with pytest.raises(TypeError, match="FisherScoring"):  # no scores would exist at the end of the fit
        trainer(tmp_path, callbacks=[IntermediatePruning(0.5)]).fit(Counting(model), DataLoader(sequences(), batch_size=4))
    assert Counting.steps == 0


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "resume", "resume fsdp2", "activation"])
def test_two_processes_equal_one_process(tmp_path, kind):
    run_two_processes(tmp_path, *kind.split())
    kind = kind.split()[0]
    model = tiny_model("qwen3_moe")
    data = sequences()
    epochs = 2 if kind == "resume" else 1  # resume: 1 epoch, checkpoint, resume to 2 == the same batches twice
    batches = [torch.utils.data.default_collate(data[i:i + 2]) for i in range(0, 8, 2)] * epochs
    expected = fmoe.score(model, batches, criterion="activation" if kind == "activation" else "fisher")
    close(fmoe.Scores.load(tmp_path / "scores"), expected)
    assert fmoe.Scores.load(tmp_path / "scores").samples == 8 * epochs  # each sample once per epoch, SUM-reduced
    stats = fmoe.Statistics.load(tmp_path / "statistics")  # measured in the same pass, reduced in the same step
    reference = fmoe.measure(model, batches, fisher=kind != "activation")
    assert stats.experts.keys() == reference.experts.keys() and stats.samples == reference.samples
    for criterion, by_name in reference.experts.items():
        for name, t in by_name.items():
            torch.testing.assert_close(stats.experts[criterion][name], t, rtol=1e-4, atol=1e-6 * float(t.max()))
    torch.testing.assert_close(stats.moe_similarity, reference.moe_similarity, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.block_similarity, reference.block_similarity, rtol=1e-4, atol=1e-6)
    if kind in ("ddp", "activation", "fsdp2"):
        plans = [json.loads((tmp_path / f"plan_rank{r}.json").read_text()) for r in (0, 1)]
        assert plans[0] == plans[1]



@pytest.mark.parametrize("scope", ["layer", "expert"])  # ragged experts (per-expert Linears) / fused (peft parameters)
def test_fsdp2_calibration_prunes_and_lora_under_fsdp2_equals_ddp(tmp_path, scope):
    run_two_processes(tmp_path, "fsdp2_lora", scope)
    result = json.loads((tmp_path / "lora.json").read_text())
    assert not result["pruned_is_sharded"]  # IntermediatePruning got the plain model back and pruned it
    plans = [fmoe.PruningPlan.load(tmp_path / f"plan_rank{r}.json") for r in (0, 1)]
    assert plans[0].to_dict() == plans[1].to_dict()
    assert plans[0].is_uniform() == (scope == "expert")
    assert result["fsdp2"]["sharded_fit"] and not result["ddp"]["sharded_fit"]
    for strategy in ("ddp", "fsdp2"):
        assert result[strategy]["after"] < result[strategy]["before"]
    assert result["fsdp2"]["before"] == pytest.approx(result["ddp"]["before"], rel=1e-5)
    # the same adapters, data and steps: FSDP2's reduce-scatter and DDP's all-reduce give the same merged model
    ddp, fsdp = (fmoe.from_pretrained(tmp_path / s).state_dict() for s in ("ddp", "fsdp2"))
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_scores(tmp_path):
    data = sequences(n=8)
    full = CalibrationModule(tiny_model("mixtral"))
    trainer(tmp_path, max_epochs=2).fit(full, DataLoader(data, batch_size=2))

    first = CalibrationModule(tiny_model("mixtral"))
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    trainer(tmp_path, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True).fit(first, DataLoader(data, batch_size=2))
    resumed = CalibrationModule(tiny_model("mixtral"))
    trainer(tmp_path, max_epochs=2).fit(resumed, DataLoader(data, batch_size=2), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    close(resumed.scores, full.scores, rtol=1e-5)
    assert resumed.scores.samples == 16


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_task_accuracy_on_two_processes_equals_one_process(tmp_path, strategy):
    from fmoe import toy
    from fmoe.lightning.data import TextDataModule
    from fmoe.lightning.recovery import evaluate
    from fmoe.evaluation.tasks import accuracy, load_tasks

    run_two_processes(tmp_path, "accuracy", strategy)  # fsdp2: sharded model, lockstep generation, padded shares
    two = json.loads((tmp_path / "result.json").read_text())
    model, tokenizer, config = toy.load()
    test = str(toy.corpus_files(config)["arithmetic"]["test"])
    tasks = {"arithmetic": load_tasks(test, limit=21)}  # 21 prompts: ranks answer 11 and 10
    data = TextDataModule(str(toy.TOY_DIR), test, test, seq_len=80, pack=False, n_samples=8, max_eval_samples=20)
    one = evaluate(model, data, {"accelerator": "cpu", "devices": 1}, tasks, tokenizer)
    assert one["arithmetic_acc"] == pytest.approx(accuracy(model, tokenizer, *tasks["arithmetic"]))
    assert two["arithmetic_acc"] == pytest.approx(one["arithmetic_acc"])
    assert two["domain_ppl"] == pytest.approx(one["domain_ppl"], rel=1e-4)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        evaluate(model, data, {"accelerator": "cpu", "devices": 1}, tasks)


@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-epoch 1, the end of epoch 1, mid-epoch 2 (5 batches an epoch)
def test_interrupted_calibration_resumes_to_the_same_scores(tmp_path, stop):
    data = sequences(n=10)
    full = CalibrationModule(tiny_model("mixtral"))
    run = trainer(tmp_path, max_epochs=2)
    run.fit(full, ResumableDataLoader(data, batch_size=2))
    assert run.global_step == 10  # every calibration batch is a step

    first = CalibrationModule(tiny_model("mixtral"))
    ckpt = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer(tmp_path, max_epochs=2, max_steps=stop, callbacks=[ckpt], enable_checkpointing=True).fit(
        first, ResumableDataLoader(data, batch_size=2))
    assert first.scores.samples == 2 * stop
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert saved and not any(k.startswith("model.") for k in saved)  # the scores, not the frozen weights
    resumed = CalibrationModule(tiny_model("mixtral"))
    trainer(tmp_path, max_epochs=2).fit(resumed, ResumableDataLoader(data, batch_size=2),
                                        ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.scores.samples == 20
    assert all(torch.equal(resumed.scores.tensors[n], full.scores.tensors[n]) for n in full.scores.tensors)


def test_lora_targets_attention_shared_and_routed_experts_not_routers():
    from peft import get_peft_model

    from fmoe.recovery.lora import lora_config
    from fmoe.model.structure import apply_widths

    model = tiny_model("qwen2_moe")
    names = list(fmoe.find_experts(model))
    keep = {names[0]: [torch.arange(16)] * 4, names[1]: [torch.arange(w) for w in (8, 16, 24, 32)]}
    apply_widths(model, keep)  # layer 0 stock (uniform), layer 1 ragged
    peft_model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    adapted = {n.split(".lora_")[0] for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("layers.0.mlp.experts" in n for n in adapted)  # fused experts via target_parameters
    assert all(any(f"layers.1.mlp.experts.buckets.{b}" in n for n in adapted) for b in range(4))  # one per width
    assert any("shared_expert.up_proj" in n for n in adapted) and any("self_attn.q_proj" in n for n in adapted)
    assert not any(n.endswith(("mlp.gate", "lm_head", "shared_expert_gate")) for n in adapted)


@pytest.mark.parametrize("family,widths", [("qwen2_moe", (8, 16, 24, 32)), ("gpt_oss", (8, 8, 32, 32))])
def test_lora_adapts_every_width_bucket_and_merges_exactly(family, widths):
    from peft import get_peft_model

    from fmoe.recovery.lora import lora_config
    from fmoe.model.structure import apply_widths

    model = tiny_model(family)
    name = list(fmoe.find_experts(model))[1]
    apply_widths(model, {name: [torch.arange(w) for w in widths]})
    ids = torch.randint(3, 128, (2, 10))
    before = model(input_ids=ids).logits
    peft_model = get_peft_model(model, lora_config(model, r=4, alpha=8))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n and ".buckets." in n:
                p.normal_(0, 0.5)  # adapters that change every bucket
    adapted = peft_model(input_ids=ids).logits
    assert (adapted - before).abs().max() > 1e-3
    merged = peft_model.merge_and_unload()
    assert isinstance(fmoe.find_experts(merged)[name], fmoe.RaggedExperts)
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_fisher_scoring_keeps_its_precision_in_a_long_accumulated_fit(tmp_path):
    """128 batches of 32 with accumulate_grad_batches=8: per-batch increments are tiny next to the running sums."""
    model = tiny_model("olmoe")
    data = sequences(n=4096, padded=False)
    expected = fmoe.score(model, [torch.utils.data.default_collate(data[i:i + 32]) for i in range(0, 4096, 32)])
    scoring = FisherScoring()
    trainer(tmp_path, callbacks=[scoring], accumulate_grad_batches=8).fit(UserModule(model),
                                                                          DataLoader(data, batch_size=32))
    assert scoring.scores.samples == 4096
    close(scoring.scores, expected, rtol=1e-4)


def fp16_on_cpu(init_scale: float, growth_interval: int = 1):
    """Lightning turns precision="16-mixed" into bf16 on CPU; the plugin itself runs fp16 autocast with a real
    GradScaler, whose scale here grows after every step (growth_interval=1), so it changes mid-run."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler), scaler


def test_fp16_grad_scaler_does_not_scale_the_scores(tmp_path):
    """Scores under a GradScaler whose scale changes (2^16 and up: scaled gradients overflow, the batch runs again
    at a lower scale) equal those of the same fp16 run at a constant scale of 1, in calibration and in a user's fit."""
    data = sequences(n=16, padded=False)
    for run in ("calibration", "user"):
        scores = {}
        for init, growth in ((1.0, 10**6), (2.0**16, 1)):
            plugin, scaler = fp16_on_cpu(init, growth)
            backoffs = []
            update = scaler.update
            scaler.update = lambda new_scale=None: (backoffs.append(new_scale), update(new_scale))
            if run == "calibration":
                module = CalibrationModule(tiny_model("qwen3_moe"))
                trainer(tmp_path, plugins=[plugin]).fit(module, DataLoader(data, batch_size=4))
                scores[init] = module.scores
            else:
                scoring = FisherScoring()
                trainer(tmp_path, plugins=[plugin], callbacks=[scoring]).fit(
                    UserModule(tiny_model("qwen3_moe")), DataLoader(data, batch_size=4))
                scores[init] = scoring.scores
            assert (scaler.get_scale() == 1.0) == (init == 1.0)
            if run == "calibration" and init > 1:  # at 2^16 the scaled gradients overflowed: batches ran again
                assert any(b is not None for b in backoffs)
        assert scores[2.0**16].samples == 16  # every batch counted once
        close(scores[2.0**16], scores[1.0], rtol=0.05, of_max=0.002)


def test_a_non_finite_gradient_stops_a_users_fit_before_the_optimizer_step(tmp_path):
    model = tiny_model("olmoe")
    batches = []

    def poison(module, grad_output):  # NaN gradients from the second batch on; the loss stays finite
        return (grad_output[0] * float("nan"),) if len(batches) > 1 else None

    class Counting(UserModule):
        def training_step(self, batch, batch_idx):
            batches.append(batch_idx)
            return super().training_step(batch, batch_idx)

    model.lm_head.register_full_backward_pre_hook(poison)
    with pytest.raises(FloatingPointError, match="non-finite gradient in"):
        trainer(tmp_path, callbacks=[FisherScoring()]).fit(Counting(model, lr=0.1),
                                                           DataLoader(sequences(padded=False), batch_size=2))
    assert len(batches) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights


def test_calibration_gives_the_model_back_as_it_came(tmp_path):
    model = tiny_model("mixtral").train()
    model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice of frozen parameters
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    module = CalibrationModule(model)
    assert all(p.requires_grad == flags[n] for n, p in model.named_parameters())  # constructing changes nothing
    trainer(tmp_path).fit(module, DataLoader(sequences(), batch_size=4))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    class Failing(CalibrationModule):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path).fit(Failing(model), DataLoader(sequences(), batch_size=4))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_a_sampler_that_would_repeat_samples_is_refused():
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from fmoe.lightning.calibration import refuse_repeated_samples

    def loader(n, **kw):
        data = sequences(n=n)
        return DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0, **kw))

    with pytest.raises(ValueError, match="7 samples, not a multiple of the 2 data-parallel ranks"):
        refuse_repeated_samples(SimpleNamespace(train_dataloader=loader(7)))
    refuse_repeated_samples(SimpleNamespace(train_dataloader=loader(8)))  # even: nothing repeated
    refuse_repeated_samples(SimpleNamespace(train_dataloader=loader(7, drop_last=True)))  # dropped, not repeated


def test_ranks_agree_on_errors_and_count_each_sample_once(tmp_path):
    """2 processes: tensor parallel ranks are not summed, a rank with nothing supervised still joins the backward,
    an uneven sampler is refused on both ranks, and a non-finite gradient on one rank stops both at the same step."""
    run_two_processes(tmp_path, "ranks", timeout=180)
    data = sequences()
    one = fmoe.score(tiny_model("qwen3_moe"), [torch.utils.data.default_collate(data[i:i + 4]) for i in (0, 4)])
    tp = fmoe.Scores.load(tmp_path / "tp_scores")
    assert tp.samples == 8
    close(tp, one)
    half = fmoe.Scores.load(tmp_path / "unsupervised_scores")  # rank 1's sequences had no supervised token
    only_even = fmoe.score(tiny_model("qwen3_moe"), [torch.utils.data.default_collate(data[i:i + 4:2]) for i in (0, 4)])
    assert half.samples == 4
    close(half, only_even)
    outcomes = [json.loads((tmp_path / f"outcome_rank{r}.json").read_text()) for r in (0, 1)]
    for outcome in outcomes:
        assert outcome["uneven"].startswith("ValueError") and "not a multiple" in outcome["uneven"]
        assert outcome["non_finite"].startswith("FloatingPointError")
    assert outcomes[0]["non_finite_step"] == outcomes[1]["non_finite_step"]
    assert "other rank" in outcomes[0]["non_finite"] and "non-finite gradient in" in outcomes[1]["non_finite"]
