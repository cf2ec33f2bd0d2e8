"""Importance of every intermediate dim of every routed expert, from one calibration pass.

Criteria (higher = keep):
- fisher:     F[e, j] = sum_n (dL_n/dm[e, j])^2, m a mask on h = act(gate) * up, L_n the mean next-token NLL of
              sequence n. dL_n/dm_j = sum_{t in n} h_tj * g_tj (g = dL/dh) is taken from activation x
              activation-gradient products in one batched backward, with every weight frozen (no weight grads).
- grad_abs:   the criterion of the Less-is-MoE release: mean over samples of mean |dL_n/dW| over the dim's
              gate row, up row and down column (weight gradients of the experts, one sequence at a time).
- activation: mean |h_j| over the tokens routed to the expert.
- router:     sum over routed tokens of routing weight x |h_j|.
- magnitude:  ||gate_j|| * ||up_j|| * ||down_j|| from the weights alone (no data).
- compensated: the output error removing dim j alone costs once the expert's other dims are refit by least
              squares, ||down_j||^2 / [(G + lam I)^-1]_jj with G = sum h h^T over the expert's routed tokens (an
              optimal-brain-surgeon saliency; fmoe.calibration.gram.compensated), from one forward pass.
- random:     seeded uniform noise (a baseline).
Criteria combine: "rank_mean(compensated, router)" averages each criterion's per-layer ranks (fmoe.calibration.scores); `score`
and every Scorer (so the Lightning calibration) take such a spec wherever they take a criterion.
Sums accumulate in float64 (float32 on MPS, which has none; returned as float32) whatever the model dtype; padding
tokens never contribute. Inside `fmoe.masked` every criterion scores the masked model: masked dims score 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _aliases
from ..model.experts import find_experts, fingerprint, on_meta
from .context import Accumulator, Context, frozen
from .criteria import (CRITERIA, DATA_CRITERIA, check_scorable, grad_abs_scores, magnitude_scores, masked_zero,
                       random_scores, scorer_criterion, sequence_losses)
from .gram import Gram, GramStatistics, compensated
from .loss import Batch, prepare_batch
from .scores import Scores, combine, criterion_name, parse_criterion
from .statistics import Statistics, StructureStatistics


@_aliases.renamed(method="criterion")
class Scorer:
    """Step-wise accumulation of a criterion: any criterion but grad_abs, or a combination of them (see
    `fmoe.calibration.scores.parse_criterion`), every criterion of a combination measured in the same pass. `score()` and the
    Lightning layer both drive it, so there is one implementation of each criterion.

        scorer = Scorer(model, "fisher")
        with scorer.attached():          # fmoe experts forward + hooks; weights frozen, eval mode
            for batch in batches:
                scorer.step(batch)       # forward (+ one backward for fisher)
        scores = scorer.result()

    Lightning hooks that cannot hold a `with` block call `attach()` and `detach()` instead. With `structure`, the
    same pass also measures the expert- and layer-level statistics of fmoe.calibration.statistics (`statistics()`); their sums
    join `state()` under "structure/" keys, so rank reduction and checkpoints cover them. With `gram`, the same
    pass gathers the per-expert Gram sums of fmoe.calibration.gram (`gram()`), under "gram/" keys (compensated scores
    come from such sums too). Criteria that read weights (compensated, magnitude) read the model the scorer was made
    with: `use` switches only the module the batches run through.
    """

    method = _aliases.renamed_attribute("method", "criterion")

    def __init__(self, model: nn.Module, criterion: str = "fisher", structure: bool = False, gram: bool = False,
                 seed: int = 0):
        self.combiner, self.criteria = scorer_criterion(criterion)
        self.model, self.criterion, self.seed = model, criterion_name(self.combiner, self.criteria), seed
        self.modules = self.weights = find_experts(model)
        check_scorable(self.modules)
        empty = on_meta(model)  # an empty (meta) model has no weights to fingerprint
        self.fingerprint = None if empty else fingerprint(model)
        self.device = torch.device("cpu") if empty else next(model.parameters()).device
        self.accs = {c: DATA_CRITERIA[c](self.modules, self.device) for c in self.criteria if c in DATA_CRITERIA}
        self.needs_grad = "fisher" in self.accs  # one backward per step
        self.structure = StructureStatistics(model, self.device, fisher=self.needs_grad,
                                             gradient_scale=lambda: self.gradient_scale) if structure else None
        self.gathers_gram = gram
        self.grams = Gram(self.modules, self.device) if gram or "compensated" in self.criteria else None
        # every accumulator of the pass, in hook order: the criteria's, then the statistics and the Gram sums
        self.parts: list[Accumulator] = [*self.accs.values(), *(p for p in (self.structure, self.grams) if p)]
        self.ctx = Context()
        self.samples = self.tokens = 0
        self._stack: ExitStack | None = None

    @property
    def gradient_scale(self) -> float:
        """dL_n/dm is the Fisher hooks' gradient times this (see Fisher.gradient_scale); 1 without Fisher."""
        return self.accs["fisher"].gradient_scale if self.needs_grad else 1.0

    @gradient_scale.setter
    def gradient_scale(self, value: float) -> None:
        if self.needs_grad:
            self.accs["fisher"].gradient_scale = value

    @property
    def anchors(self) -> dict[str, nn.Parameter]:
        """The trainable zero scalars Fisher adds to the activations (DDP needs a parameter the forward uses)."""
        return self.accs["fisher"].anchors if self.needs_grad else {}

    def use(self, model: nn.Module) -> None:
        """Score through another module with the same experts (e.g. a sharded twin of the model); not attached."""
        if self.is_attached:
            raise RuntimeError("detach the scorer before switching models")
        self.model, self.modules = model, find_experts(model)

    def attach(self, freeze: bool = True) -> None:
        """Install the hooks; with `freeze`, eval mode and no weight gradients (all restored by `detach`)."""
        if self.is_attached:
            return
        stack = ExitStack()
        if freeze:
            stack.enter_context(frozen(self.model))
        for part in self.parts:
            stack.enter_context(part.attached(self.model, self.ctx))
        self._stack = stack

    @property
    def is_attached(self) -> bool:
        return self._stack is not None

    def detach(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @contextmanager
    def attached(self, freeze: bool = True):
        self.attach(freeze)
        try:
            yield self
        finally:
            self.detach()

    def observe(self, raw: Mapping[str, torch.Tensor]) -> Batch:
        """Tell the hooks which sequence each token of the next forward belongs to (for someone else's loop)."""
        batch = prepare_batch(raw, self.device)
        self.ctx.set(batch)
        return batch

    def to(self, device) -> Scorer:
        """Move the accumulated state (the model is moved by its owner)."""
        self.device = torch.device(device)
        for part in self.parts:
            part.to(self.device)
        return self

    def step(self, raw: Mapping[str, torch.Tensor], backward=None, sync: Callable | None = None,
             skip_non_finite: bool = False) -> torch.Tensor | None:
        """Score one batch; returns the summed per-sequence loss (fisher), or None (other criteria, or a batch whose
        gradients overflowed and were dropped under `skip_non_finite`; see `end_step`).

        `backward(loss)` defaults to `loss.backward()`; Lightning passes `manual_backward` (DDP needs it). Every
        call runs the same backward whatever the batch holds (a batch with nothing supervised adds zeros), and
        `sync(flags)` (a SUM over ranks) makes every rank raise on a non-finite loss or gradient at the same step.
        """
        batch = self.observe(raw)
        if not self.needs_grad:
            with torch.no_grad():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False)
            self.count(batch.input_ids.shape[0], int(batch.attention_mask.sum()))
            return None
        losses, counts = sequence_losses(self.model, batch)
        total = losses.sum()
        (backward or torch.Tensor.backward)(total)  # one backward; per-sample terms are separated in the hooks
        if not self.end_step(torch.isfinite(losses).all(), sync, skip_non_finite):
            return None
        self.count(*(int(v) for v in torch.stack([(counts > 0).sum(), counts.sum()]).tolist()))
        return total.detach()

    def end_step(self, loss_ok: torch.Tensor | bool = True, sync: Callable | None = None,
                 skip_non_finite: bool = False) -> bool:
        """After a backward: keep the step's Fisher sums if the loss and every gradient were finite on every rank
        (one host sync). Otherwise drop them and raise; with `skip_non_finite` (fp16 loss scaling, whose scaled
        gradients can overflow) a finite loss with non-finite gradients returns False instead."""
        finite = torch.stack([part.finite.all() for part in self.parts if part.finite is not None]).all()
        flags = torch.stack([~torch.as_tensor(loss_ok, device=self.device), ~finite]).float()
        ranks = sync(flags.clone()) if sync is not None else flags  # [ranks with a bad loss, with a bad gradient]
        if not bool((ranks > 0).any()):
            self._end_step(commit=True)
            return True
        bad_module = next((bad for part in self.parts if (bad := part.bad_module()) is not None), None)
        self._end_step(commit=False)
        if skip_non_finite and ranks[0] == 0:
            return False
        if flags[0] > 0:
            cause = f"non-finite calibration loss while scoring with {self.criterion!r}"
        elif bad_module is not None:
            cause = f"non-finite gradient in {bad_module}"
        else:
            cause = f"non-finite loss or gradient on {int(ranks.max())} other rank(s)"
        raise FloatingPointError(f"{cause}: Fisher scores would be poisoned (under fp16, use bf16 or fp32)")

    def _end_step(self, commit: bool) -> None:
        for part in self.parts:
            part.end_step(commit)

    def count(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def state(self) -> dict[str, torch.Tensor]:
        """Every accumulated tensor (sums over samples), e.g. to SUM-reduce across ranks or checkpoint."""
        if len(self.accs) == 1:  # a single criterion's keys as they always were (checkpoints resume)
            state = dict(next(iter(self.accs.values())).state())
        else:
            state = {f"{c}/{k}": t for c, acc in self.accs.items() for k, t in acc.state().items()}
        if self.structure is not None:
            state.update({f"structure/{k}": t for k, t in self.structure.state().items()})
        if self.grams is not None:
            state.update({f"gram/{k}": t for k, t in self.grams.state().items()})
        return state

    def load_state(self, state: dict[str, torch.Tensor], samples: int, tokens: int) -> None:
        """Replace the accumulated state (resume, or the SUM over ranks); updates tensors in place."""
        own = self.state()
        if own.keys() != state.keys():
            raise ValueError(f"scorer state does not match: expected {sorted(own)[:3]}..., got {sorted(state)[:3]}...")
        for key, tensor in own.items():
            tensor.copy_(state[key])
        self.samples, self.tokens = int(samples), int(tokens)

    def result(self) -> Scores:
        if self.samples == 0:
            raise ValueError("no calibration sample with a supervised token: nothing to score")
        meta = {"model_type": getattr(self.model.config, "model_type", None)}
        parts = [Scores(self._tensors(c), c, self.fingerprint, self.samples, self.tokens,
                        {**meta, "seed": self.seed} if c == "random" else dict(meta)) for c in self.criteria]
        return combine(self.combiner, parts)

    def _tensors(self, criterion: str) -> dict[str, torch.Tensor]:
        """{module name: [E, I] float32 on the CPU} of one criterion of the pass."""
        if criterion in self.accs:
            return {n: t.float().cpu() for n, t in self.accs[criterion].result().items()}
        if criterion != "random" and any(p.is_meta for m in self.weights.values() for p in m.parameters()):
            raise ValueError(f"{criterion!r} scores read the experts' weights, which this empty (meta) model lacks")
        if criterion == "compensated":
            tensors = compensated(self.grams.result(self.weights))
        elif criterion == "magnitude":
            tensors = magnitude_scores(self.weights)
        else:
            tensors = random_scores(self.weights, self.seed)
        return masked_zero(self.weights, tensors)

    def statistics(self) -> Statistics:
        """The expert- and layer-level statistics of the pass (a Scorer made with `structure=True`)."""
        if self.structure is None:
            raise ValueError("this scorer measures no statistics: make it with structure=True")
        if self.samples == 0:
            raise ValueError("no calibration sample with a supervised token: no statistics")
        meta = {"model_type": getattr(self.model.config, "model_type", None), "method": self.criterion}
        return self.structure.result(self.fingerprint, self.samples, self.tokens, meta)

    def gram(self) -> GramStatistics:
        """The Gram sums of the pass, with the down projections of the scored model (a Scorer made with
        `gram=True`; read before pruning the model)."""
        if not self.gathers_gram:
            raise ValueError("this scorer gathers no Gram sums: make it with gram=True")
        if self.samples == 0:
            raise ValueError("no calibration sample with a supervised token: no Gram sums")
        return self.grams.result(self.modules)


@_aliases.renamed(method="criterion")
def score(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
    criterion: str = "fisher",
    *,
    seed: int = 0,
    progress: bool | None = None,
) -> Scores:
    """Score every intermediate dim of every routed expert of `model` (see the module docstring for criteria).

    `batches` yields dicts with `input_ids` [B, T] and optionally `attention_mask` and `labels` (-100 ignored;
    default: the non-padding tokens). Model weights are left untouched and their requires_grad restored.
    `criterion` may combine criteria ("rank_mean(compensated, router)"): their scores come from one pass (a Scorer)
    and are combined (fmoe.calibration.scores.COMBINERS); a combination with grad_abs scores each criterion on a
    pass of its own. The Scores' `criterion` records the spec.
    """
    combiner, criteria = parse_criterion(criterion, CRITERIA)
    if combiner is not None:
        passes = [c for c in criteria if c not in ("magnitude", "random")]
        if passes and "grad_abs" not in criteria:  # one pass for every criterion
            return _score_pass(model, batches, criterion_name(combiner, criteria), seed, progress)
        if len(passes) > 1 and batches is not None and iter(batches) is batches:
            raise ValueError(f"{criterion!r} scores grad_abs on a pass of its own: pass a list of batches (or "
                             "another re-iterable), not an iterator")
        return combine(combiner, [score(model, batches, c, seed=seed, progress=progress) for c in criteria])
    modules = find_experts(model)
    check_scorable(modules)
    meta = {"model_type": getattr(model.config, "model_type", None)}
    fp = fingerprint(model)
    if criterion == "magnitude":
        return Scores(masked_zero(modules, magnitude_scores(modules)), criterion, fp, meta=meta)
    if criterion == "random":
        return Scores(masked_zero(modules, random_scores(modules, seed)), criterion, fp, meta={**meta, "seed": seed})
    if criterion != "grad_abs":  # the data criteria, compensated included: one Scorer pass
        return _score_pass(model, batches, criterion, seed, progress)
    with frozen(model):
        tensors, samples, tokens = grad_abs_scores(model, modules, _needed(batches, criterion), _shows(progress))
    return Scores({n: t.float().cpu() for n, t in tensors.items()}, criterion, fp, samples, tokens, meta)


def _needed(batches, criterion: str):
    if batches is None:
        raise ValueError(f"criterion {criterion!r} needs calibration batches")
    return batches


def _shows(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _score_pass(model: nn.Module, batches, criterion: str, seed: int, progress: bool | None) -> Scores:
    """`criterion` (a Scorer's) over one pass of `batches`."""
    scorer = Scorer(model, criterion, seed=seed)
    with scorer.attached():
        for batch in tqdm(_needed(batches, criterion), disable=not _shows(progress), desc=f"scoring ({criterion})"):
            scorer.step(batch)
    return scorer.result()
