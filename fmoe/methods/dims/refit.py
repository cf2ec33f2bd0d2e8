"""Least-squares reconstruction of the kept dims: after intermediate-dim pruning, each routed expert's kept down
projection columns (and its down bias, where the family has one: gpt_oss) are refit so that the kept dims predict
the full expert's output on calibration data, with no training.

For expert e with calibration activations h_t = act(gate) * up [I] (tokens routed to e, real tokens only, measured
on the model BEFORE pruning), G = sum_t h_t h_t^T [I, I], s = sum_t h_t [I], n = token count, and kept dims K:

    X, b' = argmin sum_t || X h_t[K] + b' - (W h_t + b) ||^2 + lam_e ||X - W[:, K]||^2,
    lam_e = lam * trace(G_KK) / n

Without a bias, X = (W G[:, K] + lam_e W[:, K]) (G_KK + lam_e I)^-1; with one, the intercept (unregularised) joins
the normal equations through s and n. The ridge pulls the fit towards the plainly pruned columns, not towards zero,
and weighs as much as lam x |K| extra tokens (of the calibration's mean kept-activation energy, spread evenly over
the kept dims) whose outputs are the plainly pruned expert's: lam is a count of pseudo-tokens per kept dim, the
same at every width, so a calibration too small to determine the fit stays near plain pruning and a large one
outweighs the prior. Chosen on the toy's validation split (benchmarks/refit_lam.py): the default `LAM` never lost
to plain pruning from 2 to 64 calibration sequences, where a ridge towards zero (lam 1e-3 x mean(diag G_KK)) lost up
to 16, and a weight fixed relative to the data (x trace(G_KK) / |K|) strong enough for 2 sequences cost the 75%
no-training benchmark most of what the refit gains. Sums and solves are float64, cast back to the weight dtype. An
expert that keeps every dim is left as is (the fit is its own weights); one no calibration token reached, or whose
kept dims never fire, keeps the plainly pruned weights. lam = 0 is plain least squares, determined only where every
expert saw more calibration tokens than it keeps dims.

    model = fmoe.reconstruct(model, plan, batches)      # gather G on the unpruned model, prune, refit

Memory: G is E x I x I float64 per MoE layer (s and n are small), held on the model's device while gathering:

    model                 layers x experts x I^2       per layer    all layers
    Qwen1.5-MoE-A2.7B     24 x 60 x 1408^2             0.95 GB      22.8 GB
    Qwen3-30B-A3B         48 x 128 x 768^2             0.60 GB      29.0 GB
    Mixtral-8x7B          32 x 8 x 14336^2             13.2 GB      421 GB
    OLMoE-1B-7B           16 x 64 x 1024^2             0.54 GB      8.6 GB
    DeepSeek-V2-Lite      26 x 64 x 1408^2 (+1 dense)  1.02 GB      26.4 GB

Compute: 2 x (routed token-expert pairs) x I^2 float64 flops per layer, at full rate only where float64 is fast
(A100, H100, H200; CPUs). `layers_at_once=k` gathers k layers per pass (ceil(L/k) passes over the batches), so
only k layers' G are held; each pass's solutions (the kept down columns, in the weight dtype) are kept until the
model is pruned. Through the Lightning calibration (`CalibrationModule(gram=True)`,
`IntermediatePruning(reconstruct=True)`) every layer is gathered in the one pass, and the SUM over ranks briefly
holds a second copy (checkpoints of that calibration hold G too).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ...calibration.gram import GramStatistics, gather
from ...model.compat import accumulation_dtype
from ...model.experts import RaggedExperts, expert_parameters, find_experts, on_meta
from .plan import PruningPlan, check_plan
from .prune import prune

LAM = 0.1  # the refit's default ridge: see the module docstring and benchmarks/refit_lam.py


def solve(products: torch.Tensor, sums: torch.Tensor, count: torch.Tensor, down: torch.Tensor,
          bias: torch.Tensor | None, keep: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One expert's refit (products [I, I], sums [I], count [], down [H, I], bias [H] or None, keep [k]): (kept
    down columns [H, k], bias [H] or None) in float64, or None where there is nothing to fit."""
    width = products.shape[0]
    if keep.numel() == width or float(count) == 0:
        return None
    dtype = accumulation_dtype(products.device)
    device = products.device if products.device.type != "mps" else torch.device("cpu")
    g = products.to(device, dtype)
    keep = keep.to(device)
    w = down.to(device, dtype)  # [H, I]
    g_kk = g[keep][:, keep]  # [k, k]
    scale = float(g_kk.diagonal().sum()) / float(count)  # mean squared norm of a token's kept activations
    if scale <= 0:
        return None  # the kept dims never fire: nothing to fit them to
    ridge = lam * scale
    g_kk = g_kk + ridge * torch.eye(keep.numel(), device=device, dtype=dtype)
    rhs = g[keep] @ w.T + ridge * w[:, keep].T  # [k, H]  sum_t h_K (W h)^T, pulled towards the pruned columns
    if bias is not None:
        s, b, n = sums.to(device, dtype), bias.to(device, dtype), float(count)
        s_k = s[keep]
        a = torch.cat([torch.cat([g_kk, s_k[:, None]], 1),
                       torch.cat([s_k, torch.tensor([n], device=device, dtype=dtype)])[None]], 0)  # [k+1, k+1]
        rhs = torch.cat([rhs + s_k[:, None] * b[None], (w @ s + n * b)[None]], 0)  # [k+1, H]
    else:
        a = g_kk
    solution, info = torch.linalg.solve_ex(a, rhs)  # [k(+1), H]
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):  # singular (lam = 0, dead kept dims)
        solution = torch.linalg.pinv(a, hermitian=True) @ rhs
    if bias is None:
        return solution.T, None
    return solution[:-1].T, solution[-1]


def solutions(stats: GramStatistics, plan: PruningPlan, lam: float = LAM) -> dict[str, list]:
    """{module name: [(down columns [H, k], bias [H] or None) or None per expert]} for the modules of `stats`
    that `plan` covers, in the weights' dtype."""
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite non-negative ridge factor, got {lam}")
    out = {}
    for name, products in stats.products.items():
        if name not in plan.keep:
            continue
        down, bias, transposed = stats.down[name], stats.down_bias[name], stats.transposed[name]
        if products.shape[1:] != (plan.widths[name][0],) * 2 or len(plan.keep[name]) != products.shape[0]:
            raise ValueError(f"Gram statistics of {name} do not fit the plan: {tuple(products.shape)} vs "
                             f"{len(plan.keep[name])} experts of width {plan.widths[name][0]}")
        fits = []
        for e, keep in enumerate(plan.keep[name]):
            w = down[e].T if transposed else down[e]  # [H, I]
            fit = solve(products[e], stats.sums[name][e], stats.counts[name][e], w,
                        None if bias is None else bias[e], keep, lam)
            fits.append(None if fit is None else (fit[0].to(down.dtype), None if fit[1] is None
                                                  else fit[1].to(bias.dtype)))
        out[name] = fits
    return out


@torch.no_grad()
def write(model: nn.Module, fits: dict[str, list], keep: dict[str, list[torch.Tensor]] | None = None) -> nn.Module:
    """Copy refit down columns (and biases) into the pruned model's experts, in place. With `keep` (a plan's kept
    dims), the model is not pruned: each fit goes into the kept columns of the full-width down projection, and the
    others stay (a mask or the plan's prune removes them)."""
    modules = find_experts(model)
    for name, per_expert in fits.items():
        module = modules[name]
        for e, fit in enumerate(per_expert):
            if fit is None:
                continue
            params = module.expert_parameters(e) if isinstance(module, RaggedExperts) else expert_parameters(module, e)
            down = params["down_proj"]  # [H, k] or [k, H]
            columns = fit[0].T if module.is_transposed else fit[0]
            if keep is not None:
                down.index_copy_(0 if module.is_transposed else 1, keep[name][e].to(down.device), columns.to(down.device))
            elif down.shape != columns.shape:
                raise ValueError(f"{name} expert {e}: pruned down projection {tuple(down.shape)} does not fit the "
                                 f"plan's {tuple(columns.shape)}: refit a model pruned with this plan")
            else:
                down.copy_(columns.to(down.device))
            if fit[1] is not None:
                params["down_proj_bias"].copy_(fit[1].to(down.device))
    return model


def refit(model: nn.Module, plan: PruningPlan, gram: GramStatistics, lam: float = LAM) -> nn.Module:
    """Refit the kept down columns (and down bias) of `model`, already pruned with `plan`, by least squares from
    `gram` (measured on the model before pruning); in place. An empty (meta) model is returned untouched."""
    if on_meta(model):
        return model
    return write(model, solutions(gram, plan, lam))


def reconstruct(model: nn.Module, plan: PruningPlan, batches: Iterable[Mapping[str, torch.Tensor]],
                lam: float = LAM, layers_at_once: int | None = None) -> nn.Module:
    """Prune `model` with `plan` (fmoe.prune) and refit the kept dims by least squares on `batches` (in place):
    G is gathered on the unpruned model, `layers_at_once` layers per pass (default: all in one pass). `plan` is
    not changed; `recorded(plan, lam)` (`from fmoe.methods.dims.refit import recorded`) is the plan to save with the model."""
    check_plan(model, plan)
    names = [n for n in find_experts(model) if n in plan.keep]
    if layers_at_once is not None and layers_at_once < 1:
        raise ValueError(f"layers_at_once must be >= 1 or None, got {layers_at_once}")
    step = len(names) if layers_at_once is None else layers_at_once
    chunks = [names[i:i + step] for i in range(0, len(names), max(step, 1))]
    if len(chunks) > 1 and iter(batches) is batches:
        raise ValueError(f"layers_at_once={layers_at_once} runs {len(chunks)} passes over the batches: pass a list "
                         "or a DataLoader, not a one-shot iterator")
    fits = {}
    for chunk in chunks:
        fits.update(solutions(gather(model, batches, chunk), plan, lam))
    prune(model, plan)
    return write(model, fits)


def recorded(plan: PruningPlan, lam: float) -> PruningPlan:
    """A copy of `plan` whose meta records the refit (ridge `lam`) applied on top of it: a saved plan then says
    what the model went through, although fmoe.apply_plan only prunes. The caller's plan is left as it was."""
    plan = copy.deepcopy(plan)
    plan.meta["reconstruct"] = {"lam": lam}
    return plan
