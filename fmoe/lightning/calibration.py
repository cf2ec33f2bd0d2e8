"""CalibrationModule: a LightningModule whose `trainer.fit` over calibration batches accumulates importance scores.

    trainer = L.Trainer(max_epochs=1, callbacks=[IntermediatePruning(amount=0.5, scope="layer")])
    trainer.fit(CalibrationModule(model, criterion="fisher"), calibration_dataloader)

With `structure=True` the same pass measures the expert- and layer-level statistics of fmoe.calibration.statistics: after the
fit `self.statistics` holds their SUM over ranks, reduced in the same collective step as the scores. With
`gram=True` it also gathers the per-expert Gram sums of fmoe.calibration.gram: after the fit `self.gram` holds their SUM
over ranks (same collective), with the down projections of the unpruned model, for `fmoe.methods.dims.refit.refit`.

No weight update and no weight gradient: the model's weights are frozen; for Fisher the only trainable parameters
are zero scalars added to each layer's expert activations (DDP needs a parameter the forward uses). Each rank
accumulates locally; at the end of the fit the sums are SUM-reduced once, so every rank holds the same scores (and
computes the same plan). Every batch counts as a trainer step (an optimizer over a frozen scalar is stepped), so
`max_steps`, step-based `ModelCheckpoint`s and, with a resumable loader (`fmoe.lightning.data.ResumableDataLoader`, which
TextDataModule uses), mid-epoch resume behave as in any fit. Checkpoints hold the summed scores, not the frozen
weights, except under ModelParallelStrategy (FSDP2), whose distributed checkpoints only load whole modules.
The model may be the empty one `fmoe.lightning.sharding.load_model` gives a non-zero rank: under DDP
`configure_model` fills it from rank 0 before the scorer is made; under FSDP2 it stays empty (the sharded twin gets
rank 0's weights) and the scores carry rank 0's model fingerprint.
"""

from __future__ import annotations

import time

import lightning.pytorch as L
import torch
from torch import nn

from .. import _aliases
from ..calibration.criteria import scorer_criterion
from ..calibration.gram import GramStatistics
from ..calibration.scorer import Scorer
from ..calibration.scores import Scores, criterion_name
from ..calibration.statistics import Statistics
from ..model.experts import on_meta
from .plans import PLANS_KEY, restore_plans, save_plans
from .sharding import RestoreOnException, data_parallel_mesh, is_sharded, materialize, shard, unshard

_STATE_KEY = "fmoe_scorer"


def data_parallel_rank(strategy) -> int:
    return (getattr(strategy, "distributed_sampler_kwargs", None) or {}).get("rank", 0)


def sum_over_data(tensor: torch.Tensor, strategy) -> torch.Tensor:
    """SUM of `tensor` over the ranks that saw different data (under ModelParallelStrategy the data-parallel mesh
    dimension: tensor-parallel ranks see the same batches); a collective, so every rank must call it."""
    mesh = data_parallel_mesh(strategy)
    if mesh is None:
        return strategy.reduce(tensor, reduce_op="sum")
    torch.distributed.all_reduce(tensor, group=mesh.get_group())
    return tensor


def reduced_state(scorer: Scorer, strategy) -> tuple[dict[str, torch.Tensor], int, int]:
    """(state, samples, tokens) SUM-reduced over data-parallel ranks; a collective, so every rank must call it."""
    state = {k: sum_over_data(t.detach().clone(), strategy) for k, t in scorer.state().items()}
    counts = torch.tensor([scorer.samples, scorer.tokens], dtype=torch.int64, device=scorer.device)  # exact
    counts = sum_over_data(counts, strategy)
    return state, int(counts[0]), int(counts[1])


def sum_across_ranks(scorer: Scorer, strategy) -> Scores:
    """Replace a scorer's local sums by their SUM over ranks (every rank ends with the same scores); return them."""
    scorer.load_state(*reduced_state(scorer, strategy))
    return scorer.result()


def grad_scaler(trainer):
    """The GradScaler of fp16 mixed precision, or None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def loss_scale(trainer) -> float:
    """The factor by which a GradScaler multiplied the loss of this step; 1 without one."""
    scaler = grad_scaler(trainer)
    return 1.0 if scaler is None else float(scaler.get_scale())


def sync_flags(trainer):
    """A SUM over every rank, for the per-step finiteness flags (every rank raises at the same step)."""
    return lambda flags: trainer.strategy.reduce(flags, reduce_op="sum")


def refuse_repeated_samples(trainer) -> None:
    """A DistributedSampler over a dataset that does not split evenly repeats samples to even out the ranks, and
    scores would count them twice: refuse before the first batch (the condition is the same on every rank)."""
    from torch.utils.data import DistributedSampler

    loaders = trainer.train_dataloader
    loaders = loaders.values() if isinstance(loaders, dict) else loaders if isinstance(loaders, (list, tuple)) else [loaders]
    for loader in loaders:
        for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
                n, ranks = len(sampler.dataset), sampler.num_replicas
                if n % ranks:
                    raise ValueError(
                        f"the calibration set has {n} samples, not a multiple of the {ranks} data-parallel ranks: "
                        "DistributedSampler would repeat samples and scores would count them twice. Use a multiple "
                        f"of {ranks} samples (fmoe.lightning.data.TextDataModule cuts its sets to one), or a sampler with "
                        "drop_last=True")


def rank0_object(obj):
    """Rank 0's `obj` on every rank of a multi-process run (a collective: every rank calls it); `obj` itself
    otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    sent = [obj]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


def rank0_fingerprint(own: str | None) -> str | None:
    """`own`, or rank 0's model fingerprint where `own` is None (an empty model has no weights to fingerprint);
    a collective in a multi-process run: every rank calls it."""
    sent = rank0_object(own)
    return own if own is not None else sent


def check_strategy(criterion: str, strategy) -> None:
    """Criteria that read the experts' weights (compensated, magnitude) cannot run under ModelParallelStrategy
    (FSDP2), where only rank 0 holds the weights: an empty rank's scorer would have nothing to read at the end."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    reads = sorted({"compensated", "magnitude"} & set(scorer_criterion(criterion)[1]))
    if reads and isinstance(strategy, ModelParallelStrategy):
        raise ValueError(f"{criterion!r}: {', '.join(reads)} read the experts' weights, which under "
                         "ModelParallelStrategy only rank 0 holds; use DDP or one process for these criteria")


@_aliases.renamed(method="criterion")
class CalibrationModule(L.LightningModule):
    """Score `model`'s routed intermediate dims over the batches of `trainer.fit` (see the module docstring).

    Args:
        model: the transformers MoE to score (its weights stay frozen).
        criterion: the scoring criterion: fisher, activation, router, magnitude, random, compensated, or a
            combination such as "rank_mean(compensated, router)" (fmoe.score's criteria but grad_abs).
        structure: also measure expert- and layer-level statistics (the expert, layer and block drops plan from
            them).
        gram: also gather the per-expert Gram sums of a least-squares refit (fmoe.reconstruct).
    """

    method = _aliases.renamed_attribute("method", "criterion")

    def __init__(self, model: nn.Module, criterion: str = "fisher", structure: bool = False, gram: bool = False):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])  # `load_from_checkpoint(path, model=...)` restores the rest
        self.model = model
        self.criterion = criterion_name(*scorer_criterion(criterion))  # checked before any fit (empty model too)
        self.structure = structure
        self.gathers_gram = gram
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints carry the scorer state, not the (frozen, unchanged) weights
        # what the no-op optimizer steps: frozen, so DDP ignores it, but a registered parameter, which distributed
        # checkpoints (FSDP2) need to name the optimizer's state
        self.step_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)
        self.scorer: Scorer | None = None
        if not on_meta(model):  # an empty model (a non-zero rank's, see load_model) is scored once it is filled
            self._make_scorer()
        self.scores: Scores | None = None
        self.statistics: Statistics | None = None
        self.gram: GramStatistics | None = None
        self._seconds = 0.0

    def measure_structure(self) -> None:
        """Measure expert and layer statistics in this fit too (callbacks whose method plans from them call it
        before the fit starts)."""
        if not self.structure:
            self.structure = True
            if self.scorer is not None:
                self._make_scorer()

    def measure_gram(self) -> None:
        """Gather the Gram sums of fmoe.calibration.gram in this fit too (IntermediatePruning(reconstruct=True) calls
        it before the fit starts)."""
        if not self.gathers_gram:
            self.gathers_gram = True
            if self.scorer is not None:
                self._make_scorer()

    def _make_scorer(self) -> None:
        """The scorer over the model's weights (its fingerprint reads them) and the parameters DDP must see."""
        self.scorer = Scorer(self.model, self.criterion, structure=self.structure, gram=self.gathers_gram)
        anchors = self.scorer.anchors
        self.anchors = nn.ParameterList(anchors.values())  # registered so DDP and device moves see them
        if not anchors:  # activation/router run no backward, but DDP refuses a module with no trainable parameter
            self.ddp_anchor = nn.Parameter(torch.zeros((), device=self.step_anchor.device))

    def configure_optimizers(self):
        # scoring only: an optimizer over a frozen scalar, stepped once per batch so that batches count as steps
        return torch.optim.SGD([self.step_anchor], lr=0.0)

    def configure_model(self) -> None:
        """Freeze the model for the fit (DDP must see only the anchors as trainable; the user's requires_grad flags
        come back when the fit ends). Under ModelParallelStrategy (FSDP2) the fit runs a sharded twin (see
        fmoe.lightning.sharding); anchors stay replicated. `self.model` is the plain model again once the fit ends."""
        if self._trainer is None:  # `load_from_checkpoint` calls it outside any fit: nothing to prepare
            return
        materialize(self.model, self.trainer.strategy)  # DDP: a non-zero rank's empty model gets rank 0's weights
        if self.scorer is None:
            self._make_scorer()
        self.scorer.fingerprint = rank0_fingerprint(self.scorer.fingerprint)
        self.scorer.detach()  # left attached by an interrupted run
        self.restore_model()
        self._user_flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        check_strategy(self.criterion, self.trainer.strategy)  # before anything is sharded
        shard(self, "model")
        self.scorer.use(self.model)

    def configure_callbacks(self):
        return [RestoreOnException()]

    def on_fit_start(self) -> None:
        self.scorer.to(self.device)
        self.scorer.attach(freeze=True)

    def on_train_start(self) -> None:
        refuse_repeated_samples(self.trainer)

    def training_step(self, batch, batch_idx):
        start = time.perf_counter()
        self.model.eval()  # Lightning puts modules in train mode; scoring wants no dropout or router jitter
        loss = self._score(batch)
        self.step_anchor.grad = torch.zeros_like(self.step_anchor)  # a GradScaler's step checks some gradient
        self.optimizers().step()  # changes nothing; advances trainer.global_step
        self._seconds += time.perf_counter() - start
        batch_size = batch["input_ids"].shape[0]
        self.log_dict({"samples": float(self.scorer.samples), "tokens": float(self.scorer.tokens),
                       "seconds": self._seconds}, prog_bar=True, batch_size=batch_size)
        if loss is not None:
            self.log("calibration_loss", loss / batch_size, prog_bar=True, batch_size=batch_size)
        return loss

    def _score(self, batch) -> torch.Tensor | None:
        """One scoring step. Under fp16 loss scaling a batch whose scaled gradients overflow (on any rank) runs
        again at half the scale, as a GradScaler backs off, so no batch is lost or counted twice."""
        scaler = grad_scaler(self.trainer)
        fisher = self.scorer.needs_grad
        while True:
            if fisher:  # the GradScaler multiplied the loss by S; S changes during the run
                self.scorer.gradient_scale = 1.0 / loss_scale(self.trainer)
            loss = self.scorer.step(batch, backward=self.manual_backward, sync=sync_flags(self.trainer),
                                    skip_non_finite=scaler is not None)
            if loss is not None or not fisher:
                return loss
            if scaler.get_scale() < 2.0**-24:
                raise FloatingPointError("gradients overflow fp16 at every loss scale: use bf16 or fp32")
            scaler.update(scaler.get_scale() / 2)

    def on_train_end(self) -> None:
        self.scorer.detach()
        self.scores = sum_across_ranks(self.scorer, self.trainer.strategy)
        self.statistics = self.scorer.statistics() if self.structure else None
        self.teardown("fit")  # weights are frozen: nothing to gather; the plain model is back for pruning
        self.gram = self.scorer.gram() if self.gathers_gram else None  # with the plain model's down projections

    def teardown(self, stage: str) -> None:
        unshard(self)
        if self.scorer is not None:
            self.scorer.use(self.model)
        self.restore_model()

    def restore_model(self) -> None:
        """The plain model with the requires_grad flags it had before the fit (after a fit, or a failed one)."""
        flags = self.__dict__.pop("_user_flags", None)
        if flags is not None:
            for name, p in self.model.named_parameters():
                p.requires_grad_(flags.get(name, p.requires_grad))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Called on every rank (only rank 0 writes): store the SUM over ranks, so any world size can resume it.
        if is_sharded(self.model) and not getattr(self.trainer.strategy, "_save_distributed_checkpoint", True):
            raise ValueError("a calibration under ModelParallelStrategy resumes from distributed checkpoints only: "
                             "leave save_distributed_checkpoint=True")
        state, samples, tokens = reduced_state(self.scorer, self.trainer.strategy)
        save_plans(self, checkpoint)  # once a compression edited the model, its weights stay in the checkpoint too
        if not is_sharded(self.model) and PLANS_KEY not in checkpoint:  # FSDP2's cannot load without the weights
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}
        checkpoint[_STATE_KEY] = {"state": {k: t.cpu() for k, t in state.items()}, "samples": samples,
                                  "tokens": tokens, "method": self.criterion, "fingerprint": self.scorer.fingerprint,
                                  "structure": self.structure, "gram": self.gathers_gram}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if PLANS_KEY in checkpoint:  # saved after a compression: the edited model (plans, then its weights)
            restore_plans(self, checkpoint)
            return
        saved = checkpoint.get(_STATE_KEY)
        if saved is None:
            raise ValueError("checkpoint holds no fmoe calibration state")
        if saved["method"] != self.criterion or saved["fingerprint"] != self.scorer.fingerprint:
            raise ValueError(f"checkpoint is a {saved['method']!r} calibration of model {saved['fingerprint']}, "
                             f"this run is {self.criterion!r} on {self.scorer.fingerprint}")
        if saved.get("structure", False) != self.structure:
            raise ValueError(f"checkpoint was a calibration with structure={saved.get('structure', False)}, this run "
                             f"has structure={self.structure}")
        if saved.get("gram", False) != self.gathers_gram:
            raise ValueError(f"checkpoint was a calibration with gram={saved.get('gram', False)}, this run has "
                             f"gram={self.gathers_gram}")
        if data_parallel_rank(self.trainer.strategy) == 0:  # the saved sums cover every rank; others start at 0
            self.scorer.load_state(saved["state"], saved["samples"], saved["tokens"])
