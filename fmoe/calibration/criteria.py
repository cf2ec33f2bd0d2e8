"""The dim criteria: per routed expert and intermediate dim, how much the dim matters.

Fisher (per-sequence mask gradients squared, the DESIGN definition), activation (mean |h|), router (routing weight
x |h|, summed), magnitude and random (from weights alone), and grad_abs (|weight x weight gradient|, one sequence at
a time). The accumulators (Fisher, Activation) run as hooks in a Scorer's pass (scorer.py); compensated comes from
the Gram sums (gram.py).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.compat import accumulation_dtype
from ..model.experts import RaggedExperts, expert_widths, num_experts, up_name
from ..model.hooks import active_mask
from .context import Accumulator, Context, settle
from .loss import Batch, logits_nll, prepare_batch, sequence_nll
from .scores import parse_criterion


def sequence_losses(model: nn.Module, batch: Batch, logits: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_n [B], supervised token count [B]): L_n is what the HF model returns as `.loss` for sequence n alone
    (0, still in the graph, for a sequence with nothing supervised); from `logits` [B, T, V] when given."""
    nll, counts = sequence_nll(model, batch) if logits is None else logits_nll(logits, batch)
    return nll / counts.clamp(min=1), counts


def check_scorable(modules: dict[str, nn.Module]) -> None:
    ragged = [name for name, m in modules.items() if isinstance(m, RaggedExperts)]
    if ragged:
        raise ValueError(f"cannot score ragged (non-uniformly pruned) experts {ragged[:3]}: score before pruning")


def _zeros(modules: dict[str, nn.Module], device, dtype=None) -> dict[str, torch.Tensor]:
    """Zero sums [E, I] per module: totals in the device's accumulation dtype by default (compat)."""
    if dtype is None:
        dtype = accumulation_dtype(device)
    return {n: torch.zeros(num_experts(m), expert_widths(m)[0], device=device, dtype=dtype) for n, m in modules.items()}


class Fisher(Accumulator):
    """Per-sequence mask gradients squared and summed. A step's sums are held apart until `end_step` has seen that
    every one is finite (a flag on the device, read once per step), then added to the float64 totals."""

    needs_grad = True

    def __init__(self, modules, device):
        self.sums = _zeros(modules, device)
        self.pending = _zeros(modules, device, torch.float32)
        self.finite = torch.ones(len(modules), dtype=torch.bool, device=device)  # per module, this step
        self.names = list(modules)
        # dL_n/dm is the hooks' gradient times this: undoes a loss that is not the plain sum of sequence losses
        # (a user's mean over the batch, gradient accumulation) and a GradScaler's loss scaling
        self.gradient_scale = 1.0
        # h + 0 leaves the forward unchanged; a Parameter so that the graph reaches h with every weight frozen and
        # DDP sees a trainable parameter the forward uses (a scalar: its own gradient is one cheap sum)
        self.anchors = {n: nn.Parameter(torch.zeros((), device=device)) for n in self.sums}

    def hook(self, name: str, ctx: Context):
        anchor, index, pending = self.anchors[name], self.names.index(name), self.pending[name]

        def on_intermediate(routing, h):  # h [S, I], rows sorted by expert
            h_out = h + anchor.to(h.dtype)
            saved = h.detach()
            keep = ctx.real_rows(routing)[:, None]  # [S, 1] real tokens, real experts
            pair = routing.experts * ctx.batch_size + ctx.sample_of_token[routing.tokens]  # [S] (expert, sequence)

            def on_grad(g):  # g = dL/dh [S, I]
                prod = torch.where(keep, saved.float() * g.float(), 0.0)  # [S, I]
                per_pair = torch.zeros(pending.shape[0] * ctx.batch_size, prod.shape[1], device=prod.device)
                per_pair.index_add_(0, pair, prod)  # dL_n/dm[e, j]  [E*B, I]
                increment = (per_pair * self.gradient_scale).square().view(pending.shape[0], ctx.batch_size, -1)
                increment = increment.sum(1)  # [E, I]
                pending.add_(increment)
                self.finite[index] &= torch.isfinite(increment).all()  # a device flag, read once per step

            h_out.register_hook(on_grad)
            return h_out

        return on_intermediate

    def end_step(self, commit: bool) -> None:
        """Add this step's sums to the totals (or drop them), and start the next step."""
        settle(self.pending, self.sums, commit)
        self.finite.fill_(True)
        for anchor in self.anchors.values():
            anchor.grad = None

    def state(self):
        return self.sums

    def to(self, device):
        self.sums = {n: t.to(device) for n, t in self.sums.items()}
        self.pending = {n: t.to(device) for n, t in self.pending.items()}
        self.finite = self.finite.to(device)
        for anchor in self.anchors.values():  # the same Parameters (a LightningModule registers them), moved
            anchor.data = anchor.data.to(device)

    def result(self):
        return self.sums


class Activation(Accumulator):
    needs_grad = False

    def __init__(self, modules, device, weighted=False):
        self.sums = _zeros(modules, device)
        self.counts = {n: torch.zeros(t.shape[0], 1, device=device, dtype=t.dtype) for n, t in self.sums.items()}
        self.weighted = weighted
        self.names = list(modules)
        self.repeat = False  # the next forward reruns a dropped step's batch, already counted (see end_step)

    def hook(self, name, ctx):
        def on_intermediate(routing, h):  # h [S, I], rows sorted by expert
            if self.repeat:
                return h
            keep = ctx.real_rows(routing)[:, None]  # [S, 1]
            a = h.detach().abs().to(self.sums[name].dtype)
            if self.weighted:
                a = a * routing.weights.detach().to(a.dtype)[:, None]
            self.sums[name].index_add_(0, routing.experts, torch.where(keep, a, 0.0))
            self.counts[name].index_add_(0, routing.experts, keep.to(self.counts[name].dtype))
            return h

        return on_intermediate

    def end_step(self, commit: bool) -> None:
        """After a step with a backward (beside Fisher): a dropped step's batch runs again and adds nothing then."""
        self.repeat = not commit

    def state(self):
        return {**{f"sum/{n}": t for n, t in self.sums.items()}, **{f"count/{n}": t for n, t in self.counts.items()}}

    def to(self, device):
        self.sums = {n: t.to(device) for n, t in self.sums.items()}
        self.counts = {n: t.to(device) for n, t in self.counts.items()}

    def result(self):
        if self.weighted:
            return self.sums
        return {n: s / self.counts[n].clamp(min=1) for n, s in self.sums.items()}


def _gate_up_index(width: int, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    j = torch.arange(width)
    if not module.has_gate:
        return j, None
    return (j, j + width) if module.is_concatenated else (2 * j, 2 * j + 1)


def _per_dim(module: nn.Module, up: torch.Tensor, down: torch.Tensor, reduce) -> torch.Tensor:
    """Reduce a weight-shaped pair (up [E,2I,H]-like, down [E,H,I]-like) to [E, I, parts] along H."""
    width = expert_widths(module)[0]
    up_h = reduce(up, 1 if module.is_transposed else 2)  # [E, 2I] or [E, I]
    down_h = reduce(down, 2 if module.is_transposed else 1)  # [E, I]
    gate_idx, up_idx = _gate_up_index(width, module)
    parts = [up_h[:, gate_idx]] + ([up_h[:, up_idx]] if up_idx is not None else []) + [down_h]
    return torch.stack(parts, dim=-1)


def masked_zero(modules, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Data-free scores of the model as `fmoe.masked` blocks open on it run it: masked dims score 0."""
    out = {}
    for name, t in tensors.items():
        mask = active_mask(modules[name])
        out[name] = t if mask is None else t * mask.to(t.device, t.dtype)
    return out


def magnitude_scores(modules) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        norms = _per_dim(m, getattr(m, up_name(m)).detach().float(), m.down_proj.detach().float(),
                         lambda w, dim: w.norm(dim=dim))
        out[name] = norms.prod(-1)
    return out


def random_scores(modules, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(num_experts(m), expert_widths(m)[0], generator=gen) for n, m in sorted(modules.items())}


def grad_abs_scores(model, modules, batches, progress) -> tuple[dict, int, int]:
    sums = {n: None for n in modules}
    params = [getattr(m, p) for m in modules.values() for p in (up_name(m), "down_proj")]
    for p in params:
        p.requires_grad_(True)
    samples = tokens = 0
    device = next(model.parameters()).device
    for raw in tqdm(batches, disable=not progress, desc="grad_abs"):
        batch = prepare_batch(raw, device)
        for n in range(batch.input_ids.shape[0]):
            keep = batch.attention_mask[n].bool()  # drop padding: the sequence alone, as the release scores it
            single = prepare_batch({"input_ids": batch.input_ids[n][keep], "labels": batch.labels[n][keep]}, device)
            loss, count = sequence_losses(model, single)
            if count.item() == 0:
                continue
            _check_finite(loss, "grad_abs")
            grads = torch.autograd.grad(loss.sum(), params)
            if not all(torch.isfinite(g).all() for g in grads):
                raise FloatingPointError("non-finite weight gradient while scoring with 'grad_abs': scores would be "
                                         "poisoned")
            for i, (name, m) in enumerate(modules.items()):
                hidden = grads[2 * i + 1].shape[2 if m.is_transposed else 1]  # down: [E, H, I] or [E, I, H]
                per_dim = _per_dim(m, grads[2 * i].abs().float(), grads[2 * i + 1].abs().float(),
                                   lambda w, dim: w.sum(dim=dim))
                score = per_dim.sum(-1) / (per_dim.shape[-1] * hidden)  # mean |grad| over the dim's slices
                sums[name] = score if sums[name] is None else sums[name] + score
            samples += 1
            tokens += int(count.item())
    if samples == 0:
        raise ValueError("no calibration sample with a supervised token: nothing to score")
    return {n: s / samples for n, s in sums.items()}, samples, tokens


def _check_finite(loss: torch.Tensor, criterion: str) -> None:
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite calibration loss while scoring with {criterion!r}: scores would be "
                                 "poisoned")


DATA_CRITERIA = {"fisher": Fisher, "activation": Activation, "router": lambda m, d: Activation(m, d, weighted=True)}


CRITERIA = ("fisher", "grad_abs", "activation", "router", "magnitude", "random", "compensated")  # the dim criteria
METHODS = CRITERIA  # the same tuple under its first name (fmoe.METHODS)


PASS_CRITERIA = tuple(c for c in CRITERIA if c != "grad_abs")  # what a Scorer measures, together, in one pass


def scorer_criterion(spec: str) -> tuple[str | None, tuple[str, ...]]:
    """(combiner or None, criteria) of a spec a Scorer runs: any criterion or combination but grad_abs."""
    combiner, criteria = parse_criterion(spec, CRITERIA)
    if "grad_abs" in criteria:
        raise ValueError(f"{spec!r}: grad_abs takes weight gradients one sequence at a time, which fmoe.score runs "
                         f"and a Scorer (the Lightning calibration) does not; valid here: {', '.join(PASS_CRITERIA)} "
                         "and their combinations")
    return combiner, criteria
