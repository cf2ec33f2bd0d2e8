"""Recovery: peft adapters on a pruned MoE (attention, shared experts, routed experts), or the routed experts' own
weights, trained with Lightning on the data loss or by distillation from the dense model, evaluated with
torchmetrics, merged back before export.

What trains is fmoe.recovery.lora's `trainable`. Routed experts are adapted per expert through peft's
`target_parameters` (one rank-r adapter per expert): the fused tensors of uniform modules, and of each width bucket
of RaggedExperts. Routers are left alone. With a `teacher` the loss is fmoe.recovery.distill's mix of the KL to the
teacher's next-token distributions and the data loss; a live teacher is a frozen submodule (a replica per rank under
DDP, sharded per decoder layer like the student under FSDP2, so it is part of Lightning checkpoints), a cached one
is read by sequence.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torchmetrics import MeanMetric, SumMetric

from ..calibration.loss import prepare_batch, sequence_nll, training_loss
from ..evaluation.tasks import exact_match
from ..recovery.distill import TeacherCache, check_options, distillation_loss
from ..recovery.lora import trainable
from .sharding import RestoreOnException, is_sharded, materialize, shard, unshard

Tasks = dict[str, tuple[list[str], list[str]]]  # {name: (prompts, answers)}, e.g. from fmoe.evaluation.tasks.load_tasks


class Evaluation(L.LightningModule):
    """Perplexity of a model on each eval loader, from summed token NLL and token counts (torchmetrics SumMetric,
    SUM over ranks; no tokens x vocab tensor), and with `tasks` the exact-match accuracy of greedy answers
    (`<name>_acc`; each rank answers its share of the prompts, a MeanMetric averages over ranks). Under
    ModelParallelStrategy (FSDP2) the model is sharded per decoder layer for the fit and generation runs in
    lockstep across ranks. `to_logger=False` keeps the values from the Trainer's loggers (progress bar and
    `trainer.callback_metrics` only)."""

    def __init__(self, model: nn.Module, eval_names: tuple[str, ...] = ("domain", "general"),
                 tasks: Tasks | None = None, tokenizer=None, to_logger: bool = True):
        super().__init__()
        self.model, self.eval_names, self.to_logger = model, list(eval_names), to_logger
        self.nll = nn.ModuleList([SumMetric() for _ in self.eval_names])
        self.tokens = nn.ModuleList([SumMetric() for _ in self.eval_names])
        self.tasks, self.tokenizer = dict(tasks or {}), tokenizer
        if self.tasks and tokenizer is None:
            raise ValueError("task accuracy needs the tokenizer (tokenizer=...)")
        self.hits = nn.ModuleList([MeanMetric() for _ in self.tasks])

    def configure_model(self):
        materialize(self.model, self.trainer.strategy)  # DDP: a non-zero rank's empty model gets rank 0's weights
        shard(self, "model")  # FSDP2: a sharded twin (of rank 0's weights) runs the fit; see fmoe.lightning.sharding

    def teardown(self, stage: str):
        unshard(self, self.trainer)  # the plain model back, with what a fit trained

    def configure_callbacks(self):
        return [RestoreOnException()]

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        nll, counts = sequence_nll(self.model, prepare_batch(batch, self.device))
        self.nll[dataloader_idx].update(nll.sum())
        self.tokens[dataloader_idx].update(counts.sum())

    def on_validation_epoch_end(self):
        for i, name in enumerate(self.eval_names[: len(self.nll)]):
            tokens = self.tokens[i].compute()
            if tokens > 0:
                self.log(f"{name}_ppl", torch.exp(self.nll[i].compute() / tokens), prog_bar=True, sync_dist=False,
                         logger=self.to_logger)
            self.nll[i].reset()
            self.tokens[i].reset()
        if self.trainer.sanity_checking:
            return  # greedy generation is the expensive part: not for Lightning's two-batch sanity check
        rank, world, sharded = self.global_rank, self.trainer.world_size, is_sharded(self.model)
        for metric, (name, (prompts, answers)) in zip(self.hits, self.tasks.items()):
            mine = list(range(rank, len(prompts), world))
            share = mine
            if sharded:  # every forward is a collective: equal prompt counts (padding not counted), lockstep steps
                per_rank = -(-len(prompts) // world)
                share = (mine + [0] * per_rank)[:per_rank]
            hits = exact_match(self.model, self.tokenizer, [prompts[i] for i in share], [answers[i] for i in share],
                               synced=sharded)[: len(mine)]
            metric.update(torch.tensor(hits, dtype=torch.float32, device=self.device))
            self.log(f"{name}_acc", metric.compute(), prog_bar=True, sync_dist=False,  # compute() syncs ranks
                     logger=self.to_logger)
            metric.reset()


class LoRARecovery(Evaluation):
    """Fine-tune LoRA adapters on the (pruned) model; `validation_step` logs perplexity per eval loader. An empty
    (meta) model, a non-zero rank's, gets rank 0's weights and adapters when a fit starts (sharded under FSDP2,
    where it stays empty). The vectors of compressed experts (fmoe.methods.compressed) train too unless `compressed` is
    False; r=0 trains them alone (no adapters). `tune_experts` trains the routed experts' weights themselves
    instead of adapters on them (routers stay frozen).

    `teacher` turns on distillation (fmoe.recovery.distill): the dense model (live; an empty one is filled from rank 0 like
    the student), a TeacherCache, or the path of one (read in `setup`, after every rank has reached the fit, so
    rank 0 may write it just before). loss = kd_weight * T^2 * KL + (1 - kd_weight) * NLL at `temperature` T."""

    def __init__(self, model: nn.Module, r: int = 16, alpha: int = 32, lr: float = 2e-4, weight_decay: float = 0.0,
                 experts: bool = True, eval_names: tuple[str, ...] = ("domain", "general"),
                 tasks: Tasks | None = None, tokenizer=None, compressed: bool = True, tune_experts: bool = False,
                 teacher: nn.Module | TeacherCache | str | Path | None = None, temperature: float = 1.0,
                 kd_weight: float = 1.0):
        check_options(temperature, kd_weight)
        model = trainable(model, r, alpha, experts, compressed, tune_experts)
        super().__init__(model, eval_names, tasks, tokenizer)
        self.lr, self.weight_decay = lr, weight_decay
        self.temperature, self.kd_weight = temperature, kd_weight
        if isinstance(teacher, nn.Module):
            teacher = teacher.requires_grad_(False).eval()
        self.teacher = teacher

    def configure_model(self):
        super().configure_model()
        if isinstance(self.teacher, nn.Module):  # like the student: filled from rank 0 (DDP), sharded (FSDP2)
            materialize(self.teacher, self.trainer.strategy)
            shard(self, "teacher")

    def setup(self, stage: str):
        if isinstance(self.teacher, (str, Path)):  # every rank passed Lightning's pre-setup barrier: it is written
            self.teacher = TeacherCache(self.teacher)
        if isinstance(self.teacher, TeacherCache) and self.teacher.keeps_top_k and self.kd_weight == 1.0:
            warnings.warn("a top-k teacher cache constrains the student only on the teacher's k tokens of each "
                          "position; with kd_weight=1 nothing keeps it from moving probability to the others "
                          "(mix in the data loss: kd_weight < 1)", stacklevel=2)

    def on_fit_start(self):
        self.model.train()  # a model coming from calibration or evaluation is in eval mode
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()

    def training_step(self, batch, batch_idx):
        batch = prepare_batch(batch, self.device)
        size = batch.input_ids.shape[0]
        if self.teacher is None:
            loss, parts = training_loss(self.model, batch)  # HF's .loss, padding never supervised
        else:
            loss, parts = distillation_loss(self.model, batch, self.teacher, self.temperature, self.kd_weight)
            self.log("train_kd", parts["kd"], batch_size=size)
        self.log("train_nll", parts["nll"], batch_size=size)
        if "aux" in parts:  # output_router_logits: the load-balancing loss is part of the training loss
            self.log("train_aux", parts["aux"], batch_size=size)
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def merged(self) -> nn.Module:
        """The plain transformers model with the adapters folded in (stock or RaggedExperts modules again; trained
        compressed experts' vectors are kept)."""
        return self.model.merge_and_unload() if hasattr(self.model, "merge_and_unload") else self.model


def evaluate(model: nn.Module, datamodule, trainer_kwargs: dict | None = None, tasks: Tasks | None = None,
             tokenizer=None, metrics: dict[str, float] | None = None) -> dict[str, float]:
    """{'<eval name>_ppl': perplexity} of `model` on the datamodule's eval loaders and {'<task>_acc': exact match}
    of each task (a Trainer.validate run). Its loggers get them in one row with `metrics`, values measured outside
    the validation loop (e.g. model sizes, lm-eval scores)."""
    names = tuple(datamodule.eval_names)
    if not names:
        if tasks:
            raise ValueError("task accuracy is computed in the validation loop: the datamodule needs an eval set")
        return {}
    kwargs = dict(trainer_kwargs or {})
    for key in ("logger", "enable_checkpointing", "enable_model_summary", "enable_progress_bar"):
        if kwargs.get(key) is None:  # unset (a CLI's None included): a validation run stays quiet
            kwargs[key] = False
    runner = L.Trainer(**kwargs)
    runner.validate(Evaluation(model.eval(), names, tasks, tokenizer, to_logger=False), datamodule=datamodule,
                    verbose=False)
    values = {k.split("/")[0]: float(v) for k, v in runner.callback_metrics.items()}  # "/dataloader_idx_N" dropped
    for logger in runner.loggers:  # rank 0 writes
        logger.log_metrics({**(metrics or {}), **values}, step=0)
        logger.save()
    return values


def epochs_for(steps: int, sequences: int, batch_size: int, trainer: L.Trainer) -> int:
    """max_epochs for a fit bounded by `steps` optimizer steps over `sequences` training sequences: the epochs the
    steps take, never fewer (max_steps still ends the fit), so that the progress bar counts them ("Epoch 3/7",
    where max_epochs=-1 shows "Epoch 3/-2"). The world size bounds the data-parallel ranks from above, so batches
    per rank are never overcounted; fmoe.lightning.data.TextDataModule evens the sequences out over the ranks."""
    world = max(1, trainer.world_size)
    batches = max(1, -(-((sequences - sequences % world) // world) // batch_size))
    limit = trainer.limit_train_batches
    batches = max(1, min(batches, limit) if isinstance(limit, int) else int(batches * limit))
    per_epoch = -(-batches // trainer.accumulate_grad_batches)  # the last, partial window steps too
    return max(1, -(-steps // per_epoch))
