"""Callbacks: FisherScoring (scores during someone else's fit), and at the end of a calibration fit a compression
method's plan + physical edit: IntermediatePruning (dims), ExpertPruning, LayerDropping, BlockDropping, or any
registered method through Compression."""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from .. import methods
from ..calibration.scorer import Scorer
from ..calibration.scores import Scores
from ..methods.dims.iterative import iterate, step_amounts
from ..methods.dims.prune import weight_bytes
from ..methods.dims.refit import LAM, recorded, refit
from ..methods.registry import Calibration
from ..model.experts import find_experts, fingerprint
from .calibration import (CalibrationModule, grad_scaler, loss_scale, rank0_object, refuse_repeated_samples,
                          sum_across_ranks, sync_flags)
from .plans import record_plan, save_plans
from .sharding import is_sharded, mesh_of, unshard


def find_hf_model(pl_module: nn.Module, attr: str | None = None) -> nn.Module:
    """The HF MoE inside a LightningModule: `attr` if given, else the module itself or its first submodule
    (in registration order) that has routed experts and a config."""
    if attr is not None:
        return pl_module.get_submodule(attr)
    for module in pl_module.modules():
        if hasattr(module, "config") and hasattr(module, "get_experts_implementation"):
            try:
                find_experts(module)
                return module
            except ValueError:
                continue
    raise ValueError(f"{type(pl_module).__name__} holds no transformers MoE with routed experts; "
                     "pass FisherScoring(model_attr=...) to name it")


def on_rank0(trainer, make):
    """`make()` on rank 0 (it holds the weights under FSDP2), its result on every rank; an error there is raised on
    every rank (a collective in a multi-process run: every rank calls it)."""
    result = error = None
    if trainer.is_global_zero:
        try:
            result = make()
        except Exception as raised:  # noqa: BLE001  (re-raised on every rank below)
            error = raised
    result, error = rank0_object((result, error))
    if error is not None:
        raise error
    return result


class FisherScoring(L.Callback):
    """Collect Fisher scores from a user's own training fit (their loss, optimizer and batches).

    Batches must be dicts with `input_ids` (and `attention_mask` if padded). The callback's hooks see
    g = dL/dh of the user's loss L. With HF's default loss (mean over all supervised tokens of the batch) the
    per-sequence term is (tokens_n / tokens_batch) * dL_n/dm; with `loss_reduction="mean_of_sequences"`
    (L = mean over sequences of their mean, or equal-length packed sequences) it is dL_n/dm / B, and each
    per-sequence gradient is multiplied by B (times accumulate_grad_batches) before it is squared, to match
    `fmoe.score`. Rankings within a scope are unaffected by a constant factor. Under fp16 mixed precision the
    GradScaler's scale of each step is divided out, and a step whose gradients overflow (the scaler skips it) adds
    nothing; otherwise a non-finite gradient stops the fit on every rank at the same step. A DistributedSampler that
    would repeat samples is refused. Hooks are off during validation. Not handled: gradient checkpointing
    (recomputed forwards would call the hooks twice).

    Under ModelParallelStrategy (FSDP2), call `fmoe.lightning.sharding.shard(self, "model")` in your
    `configure_model` and `unshard(self, self.trainer)` in your `teardown`: the fit runs a sharded twin, and
    the plain model (with what the fit trained) is back afterwards; IntermediatePruning brings it back itself.

    Args:
        model_attr: the LightningModule's attribute that holds the transformers MoE (default: found by search).
        loss_reduction: "mean_of_sequences" (the loss is a mean over sequences) or "none" (a sum of the
            sequences' losses).
    """

    def __init__(self, model_attr: str | None = None, loss_reduction: str = "mean_of_sequences"):
        if loss_reduction not in ("mean_of_sequences", "none"):
            raise ValueError(f"unknown loss_reduction {loss_reduction!r}; valid: mean_of_sequences, none")
        self.model_attr, self.loss_reduction = model_attr, loss_reduction
        self.scorer: Scorer | None = None
        self.scores: Scores | None = None
        self._resume_after_validation = False

    def on_train_start(self, trainer, pl_module):
        refuse_repeated_samples(trainer)
        model = find_hf_model(pl_module, self.model_attr)
        self.scorer = Scorer(model, "fisher").to(pl_module.device)
        self.scorer.attach(freeze=False)  # their weights keep training

    # Validation inside the fit runs without the hooks (no backward there, and its batches are not calibration).
    def on_validation_start(self, trainer, pl_module):
        self._resume_after_validation = self.scorer is not None and self.scorer.is_attached
        if self.scorer is not None:
            self.scorer.detach()

    def on_validation_end(self, trainer, pl_module):
        if self._resume_after_validation:
            self.scorer.attach(freeze=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not isinstance(batch, dict) or "input_ids" not in batch:
            raise TypeError("FisherScoring needs dict batches with 'input_ids' (and 'attention_mask' if padded)")
        prepared = self.scorer.observe(batch)
        self._counts = (prepared.input_ids.shape[0], int(prepared.attention_mask.sum()))
        # their loss is the mean over B sequences, divided by Lightning by accumulate_grad_batches (k), and
        # multiplied by a GradScaler's scale S: dL_n/dm = g * B * k / S, scaled before squaring and summing
        per_sequence = self._counts[0] * trainer.accumulate_grad_batches if self.loss_reduction == "mean_of_sequences" else 1
        self.scorer.gradient_scale = per_sequence / loss_scale(trainer)

    def on_after_backward(self, trainer, pl_module):
        # after each backward and before the optimizer step, so a non-finite gradient stops the fit before it
        # reaches the weights; a step the GradScaler will skip adds nothing
        if self.scorer is None or not self.scorer.is_attached:
            return
        if self.scorer.end_step(sync=sync_flags(trainer), skip_non_finite=grad_scaler(trainer) is not None):
            self.scorer.count(*self._counts)
            self._counts = (0, 0)  # a second backward in the same batch adds sums, not samples

    def on_train_end(self, trainer, pl_module):
        self.scorer.detach()
        self.scorer.fingerprint = fingerprint(self.scorer.model)  # their fit changed the weights: name the result
        self.scores = sum_across_ranks(self.scorer, trainer.strategy)
        self.scorer = None  # let go of the (possibly sharded) model the fit ran

    def on_exception(self, trainer, pl_module, exception):
        if self.scorer is not None:
            self.scorer.detach()


class Compression(L.Callback):
    """Compress the model at the end of a calibration fit with any registered compression method.

    The method (`fmoe.methods.METHODS`) plans from the fit's dim scores or expert/layer statistics and edits the
    model physically; calibration and plan are saved. Scores and statistics come from a CalibrationModule
    (statistics need `structure=True`, which this callback turns on before the fit) or, for dim scores, a
    FisherScoring callback of the same Trainer. Shapes change only in `on_fit_end`, after the loop and before
    anything else uses the model. In a multi-process run rank 0 plans and every rank applies its plan, so ranks
    cannot disagree; an empty (meta) model, a non-zero rank's under FSDP2, is cut to the plan's shapes. The plan
    applied is `self.plan`; it is also recorded on the model, and checkpoints saved afterwards carry it, so a module
    with `fmoe.lightning.RestorePlans` reloads them.

    Args:
        method: a compression method of fmoe.methods.METHODS (dims, expert_drop, reap, layer_drop, block_drop, ...).
        amount: the share removed: of routed intermediate dims (dims), of routed parameters (the others); None
            with a `count`.
        save_dir: where the scores, statistics and plan.json go (default: the trainer's log_dir).
        verbose: log (rank zero) what was removed.
        model_attr: the LightningModule's attribute that holds the transformers MoE, when it is not a
            CalibrationModule (default: found by search).
        **options: the method's own options (scope, count, mode, ...: fmoe.methods.options_of).
    """

    def __init__(self, method: str = "dims", amount: float | None = 0.5, save_dir: str | Path | None = None,
                 verbose: bool = True, model_attr: str | None = None, **options: object):
        methods.check(method, amount, **options)  # before a calibration run is spent
        self.entry = methods.method(method)
        self.method, self.amount, self.options = method, amount, options
        self.save_dir, self.verbose, self.model_attr = save_dir, verbose, model_attr
        self.plan = None

    def setup(self, trainer, pl_module, stage):
        if type(trainer.strategy).__name__ == "FSDPStrategy":  # checked before a calibration run is spent
            raise TypeError(f"{type(self).__name__} needs the model's own parameters, which FSDP1 flattens: use "
                            "lightning.pytorch.strategies.ModelParallelStrategy (FSDP2) or DDP")
        if self.entry.reads == "statistics":
            if not isinstance(pl_module, CalibrationModule):
                raise TypeError(f"{self.method} plans from expert/layer statistics, which a CalibrationModule fit "
                                f"measures; {type(pl_module).__name__} is not one")
            pl_module.measure_structure()
        elif self.entry.reads == "scores" and not isinstance(pl_module, CalibrationModule) and \
                not any(isinstance(c, FisherScoring) for c in trainer.callbacks):
            raise TypeError(f"{type(self).__name__} ({self.method}) plans from dim scores, which a CalibrationModule "
                            f"fit or a FisherScoring() callback gathers; {type(pl_module).__name__} is not a "
                            "CalibrationModule and the Trainer has no FisherScoring: add FisherScoring() to its "
                            "callbacks")

    def _calibration(self, trainer, pl_module) -> Calibration:
        if isinstance(pl_module, CalibrationModule) and pl_module.scores is not None:
            return Calibration(pl_module.scores, pl_module.statistics)
        for callback in trainer.callbacks:
            if isinstance(callback, FisherScoring) and callback.scores is not None:
                return Calibration(callback.scores)
        raise RuntimeError(f"{type(self).__name__} found no calibration: train a CalibrationModule or add "
                           "FisherScoring()")

    def make_plan(self, trainer, pl_module, model: nn.Module, calibration: Calibration):
        """(the plan, rank 0's on every rank; the calibration saved with it)."""
        plan = on_rank0(trainer, lambda: methods.make(model, self.method, self.amount, calibration, **self.options))
        return plan, calibration

    def on_fit_end(self, trainer, pl_module):
        calibration = self._calibration(trainer, pl_module)
        unshard(pl_module, trainer)  # FSDP2 via fmoe's shard(): the plain model, with what the fit trained
        model = pl_module.model if isinstance(pl_module, CalibrationModule) else find_hf_model(pl_module, self.model_attr)
        if is_sharded(model):
            raise TypeError(f"{type(self).__name__} cannot edit a model sharded in place: under "
                            "ModelParallelStrategy call fmoe.lightning.sharding.shard(self, '<model attribute>') in "
                            "configure_model, which keeps the plain model to edit")
        before, params = weight_bytes(model), sum(p.numel() for p in model.parameters())
        self.plan, calibration = self.make_plan(trainer, pl_module, model, calibration)
        self.entry.edit(model, self.plan)  # an empty model: shapes only (its plan was checked on rank 0)
        record_plan(model, self.plan)
        if trainer.optimizers and not isinstance(pl_module, CalibrationModule) and not mesh_of(pl_module):
            # the fit's optimizers hold removed parameters: fresh ones over the edited model, so that a checkpoint
            # saved from now on resumes with `trainer.fit(..., ckpt_path=...)`
            trainer.strategy.setup_optimizers(trainer)
        directory = Path(self.save_dir or trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            if calibration.scores is not None:
                calibration.scores.save(directory / "scores")
            if calibration.statistics is not None:
                calibration.statistics.save(directory / "statistics")
            self.plan.save(directory / "plan.json")
        if self.verbose:
            after = sum(p.numel() for p in model.parameters())
            rank_zero_info(f"{type(self).__name__} ({self.method}): parameters {params:,} -> {after:,}, weights "
                           f"{before / 2**20:.1f} MB -> {weight_bytes(model) / 2**20:.1f} MB; calibration and plan "
                           f"in {directory}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        save_plans(pl_module, checkpoint)  # also when the module's own hooks do not (without RestorePlans)


class IntermediatePruning(Compression):
    """Remove routed intermediate dims (method "dims") at the end of a calibration fit.

    Plans from the fit's dim scores and prunes physically. Follows `ModelPruning` conventions: `amount` is the share
    of routed intermediate dims removed, `verbose` logs (rank zero) what was removed. Scores come from a
    CalibrationModule or a FisherScoring callback of the same Trainer. With `reconstruct`, the CalibrationModule's
    fit also gathers the Gram sums of fmoe.reconstruct and the kept dims are refit by least squares (ridge `lam`)
    after pruning, on every rank that holds weights (from the fit's activations: with `steps` > 1 too, once, after
    the last step).

    With `steps` > 1 the dims go in that many steps (fmoe.methods.dims.iterative, linear schedule): step 1 plans
    from the fit's scores, each later step scores the model again with the dims of the steps before masked, over one
    pass of the fit's own train dataloader (under DDP each rank its shard, sums reduced over ranks), and rank 0
    plans. This needs a CalibrationModule fit (its criterion scores again) and DDP or one process: under
    ModelParallelStrategy (FSDP2) only rank 0 holds the plain model between fits. The scores saved are the last
    step's.

    Args:
        amount: the share of routed intermediate dims removed.
        scope: where dims compete: "expert" (each expert alike), "layer" (the experts of a layer) or "global".
        multiple_of: kept widths are multiples of this (aligned grouped matmuls).
        min_width: the least width an expert keeps (default: multiple_of).
        normalize: "global" scope: "mean" divides each layer's scores by their mean first, "none" compares them raw.
        max_widths: distinct widths per layer (one grouped matmul each); None: unbounded.
        save_dir: where the scores and plan.json go (default: the trainer's log_dir).
        verbose: log (rank zero) what was removed.
        model_attr: the LightningModule's attribute that holds the transformers MoE, when it is not a
            CalibrationModule (default: found by search).
        steps: remove the amount in this many steps, scoring the partly pruned model again before each.
        reconstruct: refit the kept dims' down projections by least squares (fmoe.reconstruct).
        lam: the refit's ridge towards the pruned weights, in pseudo-tokens per kept dim.
    """

    def __init__(self, amount: float = 0.5, scope: str = "layer", multiple_of: int = 16,
                 min_width: int | None = None, normalize: str = "mean", max_widths: int | None = 4,
                 save_dir: str | Path | None = None, verbose: bool = True, model_attr: str | None = None,
                 steps: int = 1, reconstruct: bool = False, lam: float = LAM):
        super().__init__("dims", amount, save_dir, verbose, model_attr, scope=scope, multiple_of=multiple_of,
                         min_width=min_width, normalize=normalize, max_widths=max_widths)
        step_amounts(amount, steps)  # bad steps fail before a calibration run is spent
        if reconstruct and not (lam >= 0 and math.isfinite(lam)):  # checked before a calibration run is spent
            raise ValueError(f"lam must be a finite non-negative ridge factor, got {lam}")
        self.steps, self.reconstruct, self.lam = steps, reconstruct, lam

    def setup(self, trainer, pl_module, stage):
        super().setup(trainer, pl_module, stage)
        if self.reconstruct:
            if not isinstance(pl_module, CalibrationModule):
                raise TypeError(f"reconstruct=True refits from Gram sums, which a CalibrationModule fit gathers; "
                                f"{type(pl_module).__name__} is not one")
            pl_module.measure_gram()
        if self.steps > 1:
            from lightning.pytorch.strategies import ModelParallelStrategy

            if isinstance(trainer.strategy, ModelParallelStrategy):
                raise TypeError("IntermediatePruning(steps > 1) scores the plain model on every rank between steps, "
                                "and under ModelParallelStrategy (FSDP2) only rank 0 holds it: use DDP or one "
                                "process, or steps=1")
            if not isinstance(pl_module, CalibrationModule):
                raise TypeError(f"IntermediatePruning(steps > 1) scores again with the fit's CalibrationModule; "
                                f"{type(pl_module).__name__} is not one (with FisherScoring, use steps=1)")

    def make_plan(self, trainer, pl_module, model: nn.Module, calibration: Calibration):
        if self.steps == 1:
            plan, calibration = super().make_plan(trainer, pl_module, model, calibration)
            return self.record(plan), calibration
        first = calibration.need("scores", "dims", model)
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(f"IntermediatePruning(steps > 1) scores over the fit's one train dataloader, not "
                            f"{type(loader).__name__}")
        limit = trainer.num_training_batches  # one pass, as limit_train_batches cuts it
        limit = None if limit == float("inf") else int(limit)
        device, home = trainer.strategy.root_device, next(model.parameters()).device  # teardown moved it home

        def rescore(step: int) -> Scores:
            if step == 1:
                return first
            scorer = Scorer(model, pl_module.criterion).to(device)
            with scorer.attached():  # the model as it stands: the previous step's mask is open
                for batch in islice(loader, limit):
                    scorer.step(batch, sync=sync_flags(trainer))  # every rank raises at the same batch
            return sum_across_ranks(scorer, trainer.strategy)  # a collective: every rank takes part

        options = dict(self.options)
        scope = options.pop("scope")
        model.to(device)
        try:
            plan, last = iterate(model, self.amount, self.steps, scope, rescore,
                                 decide=lambda make: on_rank0(trainer, make), **options)
        finally:
            model.to(home)
        return self.record(plan), Calibration(last, calibration.statistics)

    def record(self, plan):
        """The plan as saved: with `reconstruct`, its meta records the refit that on_fit_end applies after it."""
        return recorded(plan, self.lam) if self.reconstruct else plan

    def on_fit_end(self, trainer, pl_module):
        super().on_fit_end(trainer, pl_module)
        if self.reconstruct:  # an empty (meta) model, a non-zero rank's under FSDP2, has no weights to refit
            refit(pl_module.model, self.plan, pl_module.gram, self.lam)


class ExpertPruning(Compression):
    """Drop whole routed experts at the end of a calibration fit, the lowest ranked by an expert criterion.

    Args:
        amount: the share of routed parameters removed; None with a `count`.
        criterion: "router" (mean routing probability: Expert Drop), "frequency" (share of tokens routed), "reap"
            (REAP: routing weight x output norm) or "fisher" (expert-level Fisher).
        scope: "layer" (the same number from every layer) or "global" (ranked across layers).
        count: drop this many experts instead (per layer, or in all for the global scope).
        normalize: "global" scope: "mean" divides each layer's scores by their mean first, "none" compares them raw.
        save_dir: where the statistics and plan.json go (default: the trainer's log_dir).
        verbose: log (rank zero) what was removed.
    """

    CRITERIA = {"router": "expert_drop", "frequency": "expert_frequency", "reap": "reap", "fisher": "expert_fisher"}

    def __init__(self, amount: float | None = 0.25, criterion: str = "router", scope: str = "layer",
                 count: int | None = None, normalize: str = "mean", save_dir: str | Path | None = None,
                 verbose: bool = True):
        if criterion not in self.CRITERIA:
            raise ValueError(f"unknown expert criterion {criterion!r}; valid: {', '.join(self.CRITERIA)}")
        super().__init__(self.CRITERIA[criterion], amount, save_dir, verbose, scope=scope, count=count,
                         normalize=normalize)


class LayerDropping(Compression):
    """Drop whole MoE sublayers at the end of a calibration fit, the most redundant by cos(x', x' + MoE(norm(x'))).

    A sublayer is the norm, router, routed and shared experts of a decoder layer.

    Args:
        amount: the share of routed parameters removed; None with a `count`.
        count: drop this many MoE sublayers instead.
        save_dir: where the statistics and plan.json go (default: the trainer's log_dir).
        verbose: log (rank zero) what was removed.
    """

    def __init__(self, amount: float | None = 0.25, count: int | None = None, save_dir: str | Path | None = None,
                 verbose: bool = True):
        super().__init__("layer_drop", amount, save_dir, verbose, count=count)


class BlockDropping(Compression):
    """Drop whole decoder blocks at the end of a calibration fit, the most redundant by cos(h_l, h_l+1).

    Args:
        amount: the share of routed parameters removed; None with a `count`.
        count: drop this many blocks instead.
        mode: "discrete" (the most redundant blocks) or "consecutive" (the best window of consecutive blocks).
        save_dir: where the statistics and plan.json go (default: the trainer's log_dir).
        verbose: log (rank zero) what was removed.
    """

    def __init__(self, amount: float | None = 0.25, count: int | None = None, mode: str = "discrete",
                 save_dir: str | Path | None = None, verbose: bool = True):
        super().__init__("block_drop", amount, save_dir, verbose, count=count, mode=mode)
