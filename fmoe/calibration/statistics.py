"""Expert-level and layer-level statistics, measured in the same calibration pass as the dim scores.

What whole-expert and whole-layer compression plans from (higher = more used / more important, except the
similarities, where higher = more redundant):
- router:      mean routing probability of each expert over real tokens (the router's own softmax over all
               experts; for the sigmoid routers of DeepSeek-V3/GLM-4-MoE the applied top-k weights, zeros elsewhere);
- frequency:   share of real tokens routed to each expert (top-k slots: the shares of a layer sum to top_k);
- reap:        mean over an expert's routed real (token, slot) pairs of routing weight x ||o||_2, o the expert's
               output before the routing weight (REAP);
- fisher:      sum_n (dL_n/dg_e)^2 for a mask g_e = 1 on expert e's output, L_n the mean NLL of sequence n (as the
               dim Fisher of fmoe.calibration.scorer; only when the pass runs a backward);
- moe_similarity[l]: token mean of cos(x', x' + m block(norm(x'))), x' the input of layer l's post-attention norm,
               m the layer's residual scale (GraniteMoE's residual_multiplier, else 1); NaN for layers without MoE;
- block_similarity[i, j]: token mean of cos(h_i, h_j), h_i the input of decoder layer i, h_L the output of the
               last one (before the final norm). A forward holds its L+1 unit-norm states of the real tokens in
               float32 ((L+1) x tokens x hidden) until its last layer has run.
Sums accumulate in float64 (float32 on MPS: compat.accumulation_dtype) over real tokens only; `state()` holds every
sum, so runs add up and ranks SUM-reduce.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_directory
from ..model.compat import accumulation_dtype, residual_scale, router_probabilities
from ..model.experts import num_experts
from ..model.hooks import experts_hooks
from ..model.layers import decoder_layers, moe_layers
from .context import Accumulator, settle

_TENSORS, _META, _FORMAT = "statistics.safetensors", "statistics.json", "fmoe.Statistics/1"
CRITERIA = ("router", "frequency", "reap", "fisher")


@dataclass
class Statistics:
    """experts[criterion][experts module name] = Tensor[E] float32; moe_similarity [L]; block_similarity [L+1, L+1]
    (L decoder layers). meta["layers"] maps each experts module name to its decoder layer index."""

    experts: dict[str, dict[str, torch.Tensor]]
    moe_similarity: torch.Tensor
    block_similarity: torch.Tensor
    fingerprint: str | None
    samples: int = 0
    tokens: int = 0
    meta: dict = field(default_factory=dict)

    def save(self, directory: str | Path) -> None:
        tensors = {f"experts/{c}/{n}": t.contiguous() for c, by_name in self.experts.items()
                   for n, t in by_name.items()}
        tensors["moe_similarity"] = self.moe_similarity.contiguous()
        tensors["block_similarity"] = self.block_similarity.contiguous()
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / _TENSORS))
            info = dict(format=_FORMAT, criteria=list(self.experts), fingerprint=self.fingerprint,
                        samples=self.samples, tokens=self.tokens, meta=self.meta)
            (tmp / _META).write_text(json.dumps(info, indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> Statistics:
        directory = Path(directory)
        if not (directory / _META).is_file() or not (directory / _TENSORS).is_file():
            raise FileNotFoundError(f"{directory} holds no fmoe statistics ({_META} + {_TENSORS})")
        info = json.loads((directory / _META).read_text())
        if info.get("format") != _FORMAT:
            raise ValueError(f"{directory / _META} is not an fmoe statistics file (format={info.get('format')!r})")
        tensors = load_file(str(directory / _TENSORS))
        experts = {c: {} for c in info["criteria"]}
        for key, t in tensors.items():
            if key.startswith("experts/"):
                criterion, _, name = key[len("experts/"):].partition("/")
                experts[criterion][name] = t
        return cls(experts, tensors["moe_similarity"], tensors["block_similarity"], info["fingerprint"],
                   info["samples"], info["tokens"], info.get("meta", {}))


def _rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The real-token rows [N, H] of hidden states [B, T, H] or [B*T, H] (row-major), detached, float32."""
    x = x.detach().reshape(-1, x.shape[-1])
    if x.shape[0] != valid.shape[0]:
        raise ValueError(f"hidden states hold {x.shape[0]} tokens, the batch {valid.shape[0]}")
    return x[valid].float()


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class _ExpertsHook:
    """An experts hook that leaves h alone and reads each expert's output o (REAP, expert Fisher)."""

    def __init__(self, stats: StructureStatistics, name: str, ctx):
        self.stats, self.name, self.ctx = stats, name, ctx

    def __call__(self, routing, h):
        return h

    def on_output(self, routing, o):  # o [S, H], rows sorted by expert
        stats, ctx, name = self.stats, self.ctx, self.name
        keep = ctx.real_rows(routing)  # [S]
        reap, pairs = stats.live[f"reap/{name}"], stats.live[f"pairs/{name}"]
        norms = o.detach().float().norm(dim=-1) * routing.weights.detach().float()  # [S] weight x ||o||
        reap.index_add_(0, routing.experts, torch.where(keep, norms, 0.0).to(reap.dtype))
        pairs.index_add_(0, routing.experts, keep.to(pairs.dtype))
        if stats.fisher and o.requires_grad and torch.is_grad_enabled():
            saved, pending, index = o.detach(), stats.pending[name], stats.names.index(name)
            pair = routing.experts * ctx.batch_size + ctx.sample_of_token[routing.tokens]  # [S] (expert, sequence)
            batch_size = ctx.batch_size

            def on_grad(g):  # g = dL/do [S, H]
                prod = torch.where(keep, (saved.float() * g.float()).sum(-1), 0.0)  # [S]
                per_pair = torch.zeros(pending.shape[0] * batch_size, device=prod.device)
                per_pair.index_add_(0, pair, prod)  # dL_n/dg_e  [E*B]
                increment = (per_pair * stats.gradient_scale()).square().view(pending.shape[0], batch_size).sum(1)
                pending.add_(increment)
                stats.finite[index] &= torch.isfinite(increment).all()

            o.register_hook(on_grad)
        return o


class StructureStatistics(Accumulator):
    """Sums and counts (accumulation dtype) of the expert- and layer-level statistics; `attached(model, ctx)` installs
    the experts hooks and the forward hooks (routers, norms, MoE blocks, decoder layers) and removes them all on exit.
    With `fisher` (a pass with a backward), a step's sums wait (expert Fisher in `pending`, the rest in `step`) until
    `end_step` commits or drops them, as the dim Fisher's do."""

    def __init__(self, model: nn.Module, device, fisher: bool = False,
                 gradient_scale: Callable[[], float] = lambda: 1.0):
        self.layers = moe_layers(model)  # {experts name: MoELayer}
        self.names = list(self.layers)
        self.num_layers = len(decoder_layers(model)[1])
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.residual_scale = residual_scale(getattr(model, "config", None))  # the layer adds m x the block's output
        self.fisher, self.gradient_scale = fisher, gradient_scale
        self.block_hooks = True  # decoder layer hooks measure block similarity (a streamed pass adds it itself)
        dtype = accumulation_dtype(device)
        experts = {n: num_experts(m) for n, m in _experts_of(model, self.names).items()}
        self.sums: dict[str, torch.Tensor] = {}
        for name, count in experts.items():
            for kind in ("router", "frequency", "reap", "pairs") + (("fisher",) if fisher else ()):
                self.sums[f"{kind}/{name}"] = torch.zeros(count, device=device, dtype=dtype)
            self.sums[f"tokens/{name}"] = torch.zeros(1, device=device, dtype=dtype)
        layers = self.num_layers
        self.sums["moe_similarity"] = torch.zeros(layers, device=device, dtype=dtype)
        self.sums["moe_tokens"] = torch.zeros(layers, device=device, dtype=dtype)
        self.sums["block_similarity"] = torch.zeros(layers + 1, layers + 1, device=device, dtype=dtype)
        self.sums["block_tokens"] = torch.zeros(1, device=device, dtype=dtype)
        self.pending = {n: torch.zeros(c, device=device) for n, c in experts.items()} if fisher else {}
        # with a backward, a step's forward sums wait too: a step dropped at end_step (overflowed fp16 gradients,
        # run again at a lower loss scale) adds nothing
        self.step = {k: torch.zeros_like(t) for k, t in self.sums.items() if not k.startswith("fisher/")
                     } if fisher else {}
        self.live = self.step if fisher else self.sums  # where the hooks add
        self.finite = torch.ones(len(experts), dtype=torch.bool, device=device)
        # this forward's unit-norm decoder layer inputs: [L+1, N, H] float32 (N real tokens), rows filled so far
        self._normed: torch.Tensor | None = None
        self._filled = 0
        self._norm_input: dict[int, torch.Tensor] = {}

    # -- forward hooks --------------------------------------------------------------------------------------------
    def _router_hook(self, name: str, ctx):
        def hook(module, args, output):
            logits, weights, ids = output  # [T, E], [T, K], [T, K]
            valid = ctx.valid
            probs = router_probabilities(self.model_type, logits.detach().reshape(valid.shape[0], -1),
                                         weights.detach(), ids.detach())  # [T, E]
            router = self.live[f"router/{name}"]
            router += probs[valid].sum(0).to(router.dtype)
            ids = ids.detach().reshape(valid.shape[0], -1)[valid].reshape(-1)  # [N*K]
            ids = ids[ids < router.shape[0]]  # expert-parallel sentinels route nowhere
            self.live[f"frequency/{name}"].index_add_(0, ids, torch.ones_like(ids, dtype=router.dtype))
            self.live[f"tokens/{name}"] += valid.sum()
        return hook

    def _norm_hook(self, index: int, ctx):
        def hook(module, args):
            self._norm_input[index] = _rows(args[0], ctx.valid)
        return hook

    def _block_hook(self, index: int, ctx):
        def hook(module, args, output):
            x = self._norm_input.pop(index, None)
            if x is None:
                return
            y = x + self.residual_scale * _rows(_first(output), ctx.valid)  # the decoder layer's output
            total = self.live["moe_similarity"]
            total[index] += F.cosine_similarity(x, y, dim=-1).sum().to(total.dtype)
            self.live["moe_tokens"][index] += x.shape[0]
        return hook

    def _add_block_state(self, h: torch.Tensor, ctx) -> None:
        """Add cos(h, h_j) for every earlier state h_j of this forward to row i = len(earlier) of the sums."""
        u = F.normalize(_rows(h, ctx.valid), dim=-1)  # [N, H]
        i = self._filled
        if i == 0:
            self._normed = u.new_empty(self.num_layers + 1, *u.shape)
        if i:
            dots = self._normed[:i].reshape(i, -1) @ u.reshape(-1)  # [i] sum over tokens of cos(h_j, h_i)
            self.live["block_similarity"][i, :i] += dots.to(self.live["block_similarity"].dtype)
        self._normed[i] = u
        self._filled = i + 1

    def add_block_states(self, states: list[torch.Tensor], ctx) -> None:
        """One batch's decoder layer inputs and last output ([B, T, H] each, in order), given at once (a streamed
        pass, whose layers run one at a time, adds block similarity this way instead of by layer hooks)."""
        for h in states:
            self._add_block_state(h, ctx)
        self.live["block_tokens"] += self._normed.shape[1]
        self._forget()

    def _layer_pre_hook(self, index: int, ctx):
        def hook(module, args, kwargs):
            if index == 0:
                self._filled = 0
            if self._filled == index:  # each layer's input once per forward
                self._add_block_state(args[0] if args else kwargs["hidden_states"], ctx)
        return hook

    def _last_layer_hook(self, ctx):
        def hook(module, args, kwargs, output):
            if self._filled == self.num_layers:
                self._add_block_state(_first(output), ctx)
                self.live["block_tokens"] += self._normed.shape[1]
            self._forget()
        return hook

    @contextmanager
    def attached(self, model: nn.Module, ctx):
        """Every hook on `model` (the scored model, or its sharded twin: found by name), removed on exit."""
        modules = dict(model.named_modules())
        _, layers = decoder_layers(model)
        handles = []
        with ExitStack() as stack:
            stack.callback(lambda: [h.remove() for h in handles])
            stack.callback(self._forget)
            for name, layer in self.layers.items():
                handles.append(modules[layer.router].register_forward_hook(self._router_hook(name, ctx)))
                handles.append(modules[layer.norm].register_forward_pre_hook(self._norm_hook(layer.index, ctx)))
                handles.append(modules[layer.block].register_forward_hook(self._block_hook(layer.index, ctx)))
            for index, layer in enumerate(layers if self.block_hooks else []):
                handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index, ctx), with_kwargs=True))
            if self.block_hooks:
                handles.append(layers[-1].register_forward_hook(self._last_layer_hook(ctx), with_kwargs=True))
            stack.enter_context(experts_hooks(model, {n: _ExpertsHook(self, n, ctx) for n in self.names}))
            yield self

    def _forget(self) -> None:
        self._normed, self._filled, self._norm_input = None, 0, {}

    # -- accumulation ---------------------------------------------------------------------------------------------
    def end_step(self, commit: bool) -> None:
        """Add this step's sums to the totals (or drop them), and start the next step."""
        settle(self.pending, self.sums, commit, key=lambda name: f"fisher/{name}")
        settle(self.step, self.sums, commit)
        self.finite.fill_(True)

    def state(self) -> dict[str, torch.Tensor]:
        return self.sums

    def to(self, device) -> None:
        self.sums = {k: t.to(device) for k, t in self.sums.items()}
        self.pending = {k: t.to(device) for k, t in self.pending.items()}
        self.step = {k: t.to(device) for k, t in self.step.items()}
        self.live = self.step if self.fisher else self.sums
        self.finite = self.finite.to(device)

    def result(self, fingerprint: str | None, samples: int, tokens: int, meta: dict) -> Statistics:
        s = {k: t.detach().cpu() for k, t in self.sums.items()}  # ratios in the sums' own dtype
        experts: dict[str, dict[str, torch.Tensor]] = {c: {} for c in CRITERIA if c != "fisher" or self.fisher}
        for name in self.names:
            seen = s[f"tokens/{name}"].clamp(min=1)
            experts["router"][name] = s[f"router/{name}"] / seen
            experts["frequency"][name] = s[f"frequency/{name}"] / seen
            experts["reap"][name] = s[f"reap/{name}"] / s[f"pairs/{name}"].clamp(min=1)
            if self.fisher:
                experts["fisher"][name] = s[f"fisher/{name}"]
        experts = {c: {n: t.float() for n, t in by_name.items()} for c, by_name in experts.items()}
        moe = s["moe_similarity"] / s["moe_tokens"]
        has_moe = torch.zeros(self.num_layers, dtype=torch.bool)
        has_moe[[layer.index for layer in self.layers.values()]] = True
        moe = moe.where(has_moe, float("nan"))
        lower = s["block_similarity"].tril(-1) / s["block_tokens"]
        block = lower + lower.T + torch.eye(self.num_layers + 1, dtype=lower.dtype)
        meta = {**meta, "layers": {n: layer.index for n, layer in self.layers.items()}}
        return Statistics(experts, moe.float(), block.float(), fingerprint, samples, tokens, meta)


def _experts_of(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    return {n: modules[n] for n in names}
