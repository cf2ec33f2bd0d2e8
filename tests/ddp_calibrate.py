"""2-process calibration on CPU (gloo), run by tests/test_lightning.py:

    python tests/ddp_calibrate.py OUT_DIR ddp     # DDP, then IntermediatePruning on every rank
    python tests/ddp_calibrate.py OUT_DIR fsdp2   # ModelParallelStrategy: fully_shard per decoder layer, then pruning
    python tests/ddp_calibrate.py OUT_DIR fsdp2_lora SCOPE  # FSDP2 calibration + pruning, LoRA under DDP and FSDP2
    python tests/ddp_calibrate.py OUT_DIR user    # FisherScoring + pruning in a user's training, DDP and FSDP2
    python tests/ddp_calibrate.py OUT_DIR recover # DDP calibration + pruning, then LoRA recovery under DDP
    python tests/ddp_calibrate.py OUT_DIR resume [fsdp2]  # stop mid-epoch 2 (step 3 of 4), resume to 2 epochs
    python tests/ddp_calibrate.py OUT_DIR activation  # DDP with a criterion that runs no backward
    python tests/ddp_calibrate.py OUT_DIR accuracy STRATEGY  # evaluation of the toy model: perplexity + exact match
    python tests/ddp_calibrate.py OUT_DIR ranks   # TP=2 scores, an unsupervised rank, uneven data, a NaN on one rank
    python tests/ddp_calibrate.py OUT_DIR methods # ExpertPruning under DDP, BlockDropping under FSDP2
    python tests/ddp_calibrate.py OUT_DIR reconstruct  # DDP, IntermediatePruning with least-squares reconstruction
    python tests/ddp_calibrate.py OUT_DIR distill # distillation recovery: LoRA / tuned experts, DDP / FSDP2, cached
"""

import copy
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

import fmoe
from fmoe.lightning.data import ResumableDataLoader
from fmoe.lightning.calibration import CalibrationModule
from fmoe.lightning.callbacks import FisherScoring, IntermediatePruning
from fmoe.lightning.recovery import LoRARecovery
from fmoe.lightning.sharding import is_sharded
from fmoe.toy.tiny import tiny_model
from tests.test_lightning import UserModule, sequences


def two_cpus(**kwargs) -> L.Trainer:
    """A quiet Trainer over 2 CPU processes (gloo)."""
    quiet = dict(accelerator="cpu", devices=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False)
    return L.Trainer(**{**quiet, **kwargs})


def resume(out: Path, strategy: str = "ddp") -> None:
    ckpt = L.callbacks.ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=1)
    make = fsdp2 if strategy == "fsdp2" else lambda: strategy
    # 8 sequences, 2 ranks, batches of 2: 2 steps an epoch; stopping at step 3 interrupts the second epoch
    two_cpus(max_epochs=2, max_steps=3, callbacks=[ckpt], enable_checkpointing=True, strategy=make()).fit(
        CalibrationModule(tiny_model("qwen3_moe"), structure=True), ResumableDataLoader(sequences(), batch_size=2))
    resumed = CalibrationModule(tiny_model("qwen3_moe"), structure=True)
    trainer = two_cpus(max_epochs=2, strategy=make())
    trainer.fit(resumed, ResumableDataLoader(sequences(), batch_size=2), ckpt_path=out / "ckpt" / "last.ckpt")
    if trainer.is_global_zero:
        resumed.scores.save(out / "scores")
        resumed.statistics.save(out / "statistics")


def fsdp2() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


class Sharded(L.Callback):
    """Records whether the fit ran a sharded model."""

    def on_train_start(self, trainer, pl_module):
        self.sharded = is_sharded(pl_module.model)


def lora_under_both_strategies(out: Path, scope: str) -> None:
    """FSDP2 calibration + pruning, then the same LoRA run (same seed, data, steps) under DDP and under FSDP2."""
    module = CalibrationModule(tiny_model("qwen3_moe"))
    pruning = IntermediatePruning(amount=0.5, scope=scope, multiple_of=4, save_dir=out)
    trainer = two_cpus(strategy=fsdp2(), max_epochs=1, callbacks=[pruning])
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    pruning.plan.save(out / f"plan_rank{trainer.global_rank}.json")
    pruned = module.model
    results = {"pruned_is_sharded": is_sharded(pruned)}
    held_out = DataLoader(sequences(n=8, seed=4, padded=False), batch_size=4)
    for name, strategy in (("ddp", lambda: "ddp"), ("fsdp2", fsdp2)):
        L.seed_everything(0)  # the same adapter initialisation in both runs
        recovery = LoRARecovery(copy.deepcopy(pruned), r=4, alpha=8, lr=1e-2, eval_names=("domain",))
        probe = Sharded()
        fit = two_cpus(strategy=strategy(), max_epochs=2, callbacks=[probe])
        before = fit.validate(recovery, held_out, verbose=False)[0]["domain_ppl"]
        fit.fit(recovery, DataLoader(sequences(n=16, seed=3, padded=False), batch_size=2), held_out)
        after = two_cpus(strategy=strategy()).validate(recovery, held_out, verbose=False)[0]["domain_ppl"]
        merged = recovery.merged()
        results[name] = {"before": before, "after": after, "sharded_fit": probe.sharded}
        if trainer.is_global_zero:
            fmoe.save_pretrained(merged, out / name)
    if trainer.is_global_zero:
        (out / "lora.json").write_text(json.dumps(results))


def sharp_teacher():
    """The dense tiny model with a 20x output head, so that a pruned student has far to go (tests/test_distill.py)."""
    import torch

    model = tiny_model("qwen3_moe")
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


class TeacherProbe(L.Callback):
    """Records whether the fit's teacher was sharded and whether it was filled (not meta)."""

    def on_train_start(self, trainer, pl_module):
        teacher = pl_module.teacher
        if not hasattr(teacher, "parameters"):  # a TeacherCache
            self.seen = {"cache": len(teacher)}
            return
        self.seen = {"sharded": is_sharded(teacher), "filled": not any(p.is_meta for p in teacher.parameters())}

    def on_train_batch_end(self, trainer, pl_module, *args):  # FSDP2: no teacher parameter is left whole
        if "sharded" in self.seen and self.seen["sharded"]:
            self.seen["resharded"] = all(type(p).__name__ == "DTensor" for p in pl_module.teacher.parameters())


def distill(out: Path) -> None:
    """DDP calibration + pruning, then distillation from the dense model (rank 0 reads it, the others get it when
    the fit starts) with LoRA and with the routed experts tuned, under DDP and FSDP2 (teacher sharded like the
    student), and from a full-vocabulary logit cache (rank 0 writes it just before the fit) under DDP."""
    import torch.distributed as dist

    from fmoe.recovery.distill import cache_teacher
    from fmoe.lightning.sharding import load_model

    module = CalibrationModule(tiny_model("qwen3_moe"))
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=out)
    trainer = two_cpus(strategy="ddp", max_epochs=1, callbacks=[pruning])
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    rank = trainer.global_rank
    if rank == 0:
        fmoe.save_pretrained(sharp_teacher(), out / "teacher")
    dist.barrier()
    train = sequences(n=16, seed=3)
    seen = {}
    for name, strategy, r, tune, teacher in (("ddp_lora", lambda: "ddp", 4, False, "live"),
                                             ("fsdp2_lora", fsdp2, 4, False, "live"),
                                             ("ddp_experts", lambda: "ddp", 0, True, "live"),
                                             ("fsdp2_experts", fsdp2, 0, True, "live"),
                                             ("ddp_cached", lambda: "ddp", 4, False, "cached")):
        if teacher == "cached":
            teacher = out / "teacher.safetensors"
            if rank == 0:  # no barrier: the fit's setup waits for every rank
                cache_teacher(fmoe.from_pretrained(out / "teacher"), DataLoader(train, batch_size=4), teacher)
        else:
            teacher = load_model(out / "teacher")  # meta on rank 1
        L.seed_everything(0)
        recovery = LoRARecovery(copy.deepcopy(module.model), r=r, alpha=8, lr=1e-2 if r else 1e-3, eval_names=(),
                                tune_experts=tune, teacher=teacher, temperature=2.0, kd_weight=0.5)
        probe = TeacherProbe()
        two_cpus(strategy=strategy(), max_epochs=2, callbacks=[probe]).fit(recovery, DataLoader(train, batch_size=2))
        seen[name] = probe.seen
        merged = recovery.merged()
        if rank == 0:
            fmoe.save_pretrained(merged, out / name)
            fmoe.save_pretrained(module.model, out / "pruned")
    (out / f"distill_rank{rank}.json").write_text(json.dumps(seen))


def user_training(out: Path) -> None:
    """FisherScoring and IntermediatePruning in a user's own training fit (lr > 0), under DDP and under FSDP2."""
    for name, strategy in (("ddp", lambda: "ddp"), ("fsdp2", fsdp2)):
        user = UserModule(tiny_model("olmoe"), lr=0.05)
        pruning, probe = IntermediatePruning(amount=0.5, scope="expert", save_dir=out / name), Sharded()
        trainer = two_cpus(strategy=strategy(), max_epochs=2, callbacks=[FisherScoring(), pruning, probe])
        trainer.fit(user, DataLoader(sequences(padded=False), batch_size=2))
        pruning.plan.save(out / name / f"plan_rank{trainer.global_rank}.json")
        if trainer.is_global_zero:
            fmoe.save_pretrained(user.model, out / name / "model")
            (out / name / "sharded.json").write_text(json.dumps(probe.sharded))


def accuracy(out: Path, strategy: str) -> None:
    from fmoe import toy
    from fmoe.lightning.data import TextDataModule
    from fmoe.lightning.recovery import evaluate
    from fmoe.evaluation.tasks import load_tasks

    model, tokenizer, config = toy.load()
    test = str(toy.corpus_files(config)["arithmetic"]["test"])
    data = TextDataModule(str(toy.TOY_DIR), test, test, seq_len=80, pack=False, n_samples=8, max_eval_samples=20)
    kwargs = dict(accelerator="cpu", devices=2, strategy=fsdp2() if strategy == "fsdp2" else strategy)
    result = evaluate(model, data, kwargs, {"arithmetic": load_tasks(test, limit=21)}, tokenizer)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        (out / "result.json").write_text(json.dumps(result))


def ranks(out: Path) -> None:
    """Runs that used to double-count, hang or split the ranks; each rank records how each ended."""
    import torch

    outcome = {}
    # tensor_parallel_size=2: both ranks see the same batches; scores are summed over data-parallel ranks only
    module = CalibrationModule(tiny_model("qwen3_moe"))
    trainer = two_cpus(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), max_epochs=1)
    trainer.fit(module, DataLoader(sequences(), batch_size=4))
    rank = trainer.global_rank
    if rank == 0:
        module.scores.save(out / "tp_scores")
    # rank 1's sequences (odd indices under DistributedSampler) have no supervised token: it still joins the backward
    data = [{**row, "labels": row["input_ids"].masked_fill(row["attention_mask"] == 0, -100)} for row in sequences()]
    for i in range(1, len(data), 2):
        data[i]["labels"] = torch.full_like(data[i]["input_ids"], -100)
    module = CalibrationModule(tiny_model("qwen3_moe"))
    two_cpus(strategy="ddp", max_epochs=1).fit(module, DataLoader(data, batch_size=2))
    if rank == 0:
        module.scores.save(out / "unsupervised_scores")
    # 7 sequences over 2 ranks: DistributedSampler would repeat one; refused on both ranks before any batch
    try:
        two_cpus(strategy="ddp", max_epochs=1).fit(CalibrationModule(tiny_model("qwen3_moe")),
                                                   DataLoader(sequences()[:7], batch_size=2))
        outcome["uneven"] = "finished"
    except Exception as err:
        outcome["uneven"] = f"{type(err).__name__}: {err}"
    # a NaN gradient on rank 1 only, at its second batch: both ranks stop at the same step with the same error
    model = tiny_model("qwen3_moe")
    calls = []

    def poison(module, grad_output):
        calls.append(1)
        return (grad_output[0] * float("nan"),) if rank == 1 and len(calls) == 2 else None

    model.lm_head.register_full_backward_pre_hook(poison)
    module = CalibrationModule(model)
    run = two_cpus(strategy="ddp", max_epochs=1)
    try:
        run.fit(module, DataLoader(sequences(), batch_size=2))
        outcome["non_finite"] = "finished"
    except Exception as err:
        outcome["non_finite"] = f"{type(err).__name__}: {err}"
    outcome["non_finite_step"] = module.scorer.samples
    (out / f"outcome_rank{rank}.json").write_text(json.dumps(outcome))


def close() -> None:
    """Close the process group once every rank is done: left to interpreter exit, gloo's threads sometimes abort
    the process ("terminate called without an active exception") after all the work was written."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def methods(out: Path) -> None:
    """ExpertPruning (REAP) under DDP and BlockDropping under FSDP2: every rank's plan and rank 0's export."""
    from fmoe.lightning.callbacks import BlockDropping, ExpertPruning

    for name, callback, strategy in (("reap", ExpertPruning(criterion="reap", count=1), lambda: "ddp"),
                                     ("block_drop", BlockDropping(count=1), fsdp2)):
        module = CalibrationModule(tiny_model("qwen3_moe", num_hidden_layers=3))
        callback.save_dir = out / name
        trainer = two_cpus(strategy=strategy(), max_epochs=1, callbacks=[callback], default_root_dir=out)
        trainer.fit(module, DataLoader(sequences(), batch_size=2))
        callback.plan.save(out / name / f"plan_rank{trainer.global_rank}.json")
        if trainer.is_global_zero:
            fmoe.save_pretrained(module.model, out / name / "export")


def reconstruct(out: Path) -> None:
    """DDP calibration gathering Gram sums, then pruning and the refit on every rank: each rank's weights."""
    import torch

    module = CalibrationModule(tiny_model("qwen3_moe"), criterion="activation")
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=out, reconstruct=True)
    trainer = two_cpus(strategy="ddp", max_epochs=1, callbacks=[pruning], default_root_dir=out)
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    torch.save(module.model.state_dict(), out / f"weights_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    stages = {"resume": resume, "accuracy": accuracy, "fsdp2_lora": lora_under_both_strategies, "user": user_training,
              "ranks": ranks, "methods": methods, "reconstruct": reconstruct, "distill": distill}
    if kind in stages:
        stages[kind](out, *sys.argv[3:])
        close()
        sys.exit()
    module = CalibrationModule(tiny_model("qwen3_moe"), criterion="fisher" if kind != "activation" else "activation",
                               structure=kind != "recover")
    pruning = IntermediatePruning(amount=0.5, scope="layer", multiple_of=4, save_dir=out)
    trainer = two_cpus(strategy=fsdp2() if kind == "fsdp2" else "ddp", max_epochs=1, callbacks=[pruning],
                       default_root_dir=out)
    trainer.fit(module, DataLoader(sequences(), batch_size=2))
    if kind == "recover":
        recovery = LoRARecovery(module.model, r=4, alpha=8, lr=1e-2, eval_names=("domain",))
        train = DataLoader(sequences(n=16, seed=3, padded=False), batch_size=2)
        held_out = DataLoader(sequences(n=8, seed=4, padded=False), batch_size=4)
        fit = two_cpus(strategy="ddp", max_epochs=3)
        before = fit.validate(recovery, held_out, verbose=False)[0]["domain_ppl"]
        fit.fit(recovery, train, held_out)
        after = fit.validate(recovery, held_out, verbose=False)[0]["domain_ppl"]
        merged = recovery.merged()
        if fit.is_global_zero:
            fmoe.save_pretrained(merged, out / "recovered")
            (out / "ppl.txt").write_text(f"{before} {after}")
    else:  # every rank must reach the same plan (IntermediatePruning saved rank 0's scores to OUT_DIR/scores)
        pruning.plan.save(out / f"plan_rank{trainer.global_rank}.json")
        if trainer.is_global_zero:
            module.statistics.save(out / "statistics")
    close()
