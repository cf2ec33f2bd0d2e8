"""Per-expert Gram sums of the intermediate activation (G = sum_t h_t h_t^T, s = sum_t h_t, n), gathered on the
unpruned model: what least-squares reconstruction (fmoe.methods.dims.refit) solves with, and what the `compensated`
criterion scores dims by (the output error of removing each dim alone, after the refit of the others)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..model.compat import accumulation_dtype
from ..model.experts import RaggedExperts, expert_widths, find_experts, num_experts
from .context import Accumulator, Context, frozen
from .loss import prepare_batch


@dataclasses.dataclass
class GramStatistics:
    """Per experts module (unpruned): products [E, I, I] = sum h h^T, sums [E, I] = sum h, counts [E] tokens, and
    the down projections they were measured through: down [E, H, I] or [E, I, H] (the module's layout; references
    to the tensors, which pruning replaces rather than edits) and down_bias [E, H] or None."""
    products: dict[str, torch.Tensor]
    sums: dict[str, torch.Tensor]
    counts: dict[str, torch.Tensor]
    down: dict[str, torch.Tensor]
    down_bias: dict[str, torch.Tensor | None]
    transposed: dict[str, bool]
    samples: int = 0  # sequences and real tokens seen (set by `gather`)
    tokens: int = 0

    def __add__(self, other: GramStatistics) -> GramStatistics:
        """The statistics of both calibration sets together (sums add; the down projections are self's)."""
        return dataclasses.replace(self, **{f: {n: t + getattr(other, f)[n] for n, t in getattr(self, f).items()}
                                            for f in ("products", "sums", "counts")},
                                   samples=self.samples + other.samples, tokens=self.tokens + other.tokens)


class Gram(Accumulator):
    """Accumulator of G, s and n per routed expert (`modules`: the experts modules to gather, all of a model's or a
    subset, layer by layer, to bound memory)."""
    needs_grad = False

    def __init__(self, modules: Mapping[str, nn.Module], device):
        ragged = [name for name, m in modules.items() if isinstance(m, RaggedExperts)]
        if ragged:
            raise ValueError(f"gather Gram statistics before pruning: {ragged[0]} has ragged experts")
        dtype = accumulation_dtype(device)
        self.products = {n: torch.zeros(num_experts(m), expert_widths(m)[0], expert_widths(m)[0], device=device,
                                        dtype=dtype) for n, m in modules.items()}  # [E, I, I]
        self.sums = {n: torch.zeros(t.shape[:2], device=device, dtype=dtype) for n, t in self.products.items()}
        self.counts = {n: torch.zeros(t.shape[0], device=device, dtype=dtype) for n, t in self.products.items()}
        self.names = list(modules)
        self.repeat = False  # the next forward reruns a dropped step's batch, already counted (see end_step)

    def hook(self, name: str, ctx):
        products, sums, counts = self.products[name], self.sums[name], self.counts[name]

        def on_intermediate(routing, h):  # h [S, I], rows sorted by expert
            if self.repeat:
                return h
            keep = ctx.real_rows(routing)  # [S] real tokens, real experts
            x = h.detach().where(keep[:, None], 0.0)  # [S, I]
            start = 0
            ids, ends = torch.stack([routing.ids, routing.offsets.to(routing.ids.dtype)]).tolist()  # one host read
            for e, stop in zip(ids, ends):
                if stop > start:
                    rows = x[start:stop].to(products.dtype)  # [S_e, I]
                    products[e].addmm_(rows.T, rows)
                start = stop
            sums.index_add_(0, routing.experts, x.to(sums.dtype))
            counts.index_add_(0, routing.experts, keep.to(counts.dtype))
            return h

        return on_intermediate

    def end_step(self, commit: bool) -> None:
        """After a step with a backward. Its forward's sums are already added; a step dropped for overflowing fp16
        gradients runs again on the same batch (CalibrationModule), whose forward then adds nothing."""
        self.repeat = not commit

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"products/{n}": t for n, t in self.products.items()},
                **{f"sums/{n}": t for n, t in self.sums.items()}, **{f"counts/{n}": t for n, t in self.counts.items()}}

    def to(self, device) -> None:
        self.products = {n: t.to(device) for n, t in self.products.items()}
        self.sums = {n: t.to(device) for n, t in self.sums.items()}
        self.counts = {n: t.to(device) for n, t in self.counts.items()}

    def result(self, modules: Mapping[str, nn.Module], names: Iterable[str] | None = None) -> GramStatistics:
        """The sums (of `names`, default all), with the down projections of `modules` (the unpruned model's, by
        name) they refit."""
        modules = {n: modules[n] for n in (self.products if names is None else names)}
        return GramStatistics(
            *({n: part[n] for n in modules} for part in (self.products, self.sums, self.counts)),
            {n: m.down_proj.detach() for n, m in modules.items()},
            {n: m.down_proj_bias.detach() if m.has_bias else None for n, m in modules.items()},
            {n: bool(m.is_transposed) for n, m in modules.items()})


def gather(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
           names: Iterable[str] | None = None) -> GramStatistics:
    """G, s, n of the routed experts `names` (default: all) over `batches` (dicts with input_ids and optionally
    attention_mask), from one forward pass per batch: weights frozen, eval mode, no grad."""
    modules = find_experts(model)
    names = list(modules) if names is None else list(names)
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"no routed experts module {unknown[0]!r}; valid: {', '.join(modules)}")
    device = next(model.parameters()).device
    subset = {n: modules[n] for n in names}
    gram, ctx = Gram(subset, device), Context()
    samples = tokens = 0
    with frozen(model), gram.attached(model, ctx), torch.no_grad():
        for raw in batches:
            batch = prepare_batch(raw, device)
            ctx.set(batch)
            samples += batch.input_ids.shape[0]
            tokens = tokens + batch.attention_mask.sum()  # read once at the end, not per batch
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    if not any(bool(c.any()) for c in gram.counts.values()):
        raise ValueError("no calibration token reached the experts: the batches were empty (an iterator already "
                         "used up?); pass a list of batches")
    stats = gram.result(subset)
    stats.samples, stats.tokens = samples, int(tokens)
    return stats


def compensated(stats: GramStatistics, lam: float = 1e-3) -> dict[str, torch.Tensor]:
    """{module name: [E, I]} the output error removing dim j alone costs once the other dims (and, where the family
    has a down bias, the intercept) are refit by least squares: the optimal-brain-surgeon saliency of a down
    column, ||W[:, j]||^2 / [A^-1]_jj with A = G + lam_e I (augmented by [s; n] for the intercept), summed over the
    calibration tokens routed to the expert, lam_e = lam x mean(diag G). Higher = keep."""
    out = {}
    for name, products in stats.products.items():
        dtype = accumulation_dtype(products.device)
        g = products.to(dtype)  # [E, I, I]
        width = g.shape[-1]
        scale = g.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=torch.finfo(dtype).tiny)  # [E]
        a = g + lam * scale[:, None, None] * torch.eye(width, dtype=dtype, device=g.device)
        if stats.down_bias[name] is not None:  # the refit's unregularised intercept: A = [[G, s], [s^T, n]]
            s, n = stats.sums[name].to(dtype), stats.counts[name].to(dtype)
            a = torch.cat([torch.cat([a, s[:, :, None]], 2),
                           torch.cat([s, n[:, None]], 1)[:, None, :]], 1)  # [E, I+1, I+1]
        inverse, info = torch.linalg.inv_ex(a)
        if bool((info != 0).any()):  # an expert no token reached: its A is singular
            inverse = torch.where((info != 0)[:, None, None], torch.linalg.pinv(a, hermitian=True), inverse)
        inverse_diag = inverse.diagonal(dim1=1, dim2=2)[:, :width]  # [E, I]
        down = stats.down[name].detach().to(g.device, dtype)
        column_norms = down.square().sum(-1 if stats.transposed[name] else -2)  # [E, I]
        out[name] = (column_norms / inverse_diag.clamp(min=torch.finfo(dtype).tiny)).float().cpu()
    return out
