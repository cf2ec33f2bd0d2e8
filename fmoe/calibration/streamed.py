"""Calibration one decoder layer at a time, from a checkpoint directory: models bigger than the machine.

    scorer = streamed_scorer("ckpt/", batches, "fisher", structure=True)             # one layer resident at a time
    scorer = streamed_scorer("ckpt/", batches, "fisher", chunk=64, offload_dir="/scratch/sweep")  # resumable
    scorer.result(), scorer.statistics()                                             # as a Scorer's

(`fmoe.calibrate(src, batches, criterion, streamed=True, ...)` and `fmoe.score(..., streamed=True)` call it.)

The model is built empty (meta parameters, no memory). A capture pass runs the model's own forward with every
decoder layer replaced by a stand-in that records the arguments the model gives it (attention masks, rotary
embeddings, position ids: whatever the family computes) and the hidden state entering layer 0; only the tensors
outside the decoder layers (embeddings, final norm, head) are resident then. Each decoder layer is then made
resident in turn (read from the safetensors files: `fmoe.model.view.resident`), run on every batch of the chunk,
and freed.

- Forward-only criteria (activation, router, compensated's Gram sums, the expert and layer statistics): one forward
  sweep with the scorer's hooks on the resident layer.
- Fisher (dims and expert level): the forward sweep runs without hooks and keeps every layer boundary; the head
  gives dL/dh at the top (L_n per sequence, as `fmoe.score`); a backward sweep in reverse layer order makes each
  layer resident again, recomputes its forward from the stored input with the hooks attached, and back-propagates
  the boundary gradient. The hooks see the activations and gradients of the in-memory pass, so the scores equal
  `fmoe.score`'s up to float summation order.
- Block similarity (cos between every pair of layer boundaries) is computed from the stored boundaries.

Memory: one decoder layer's weights (or the tensors outside the layers) + the boundary states of one chunk,
(layers + 1) x positions x hidden x dtype bytes (positions = the padded batch x length of the chunk's batches; kept
only when Fisher or the statistics need them, else two boundaries), + two boundaries of gradients for Fisher
(the one read and the one written), + the arguments each layer is handed (docs/streamed.md has the whole bound).
`chunk` (sequences per sweep) trades weight reads (every chunk reads every layer once, twice for Fisher) for that
memory. `offload_dir` keeps the boundaries in files instead (plain writes and reads: one batch's state in memory)
and makes the sweep resumable: after each layer the accumulated sums and the position reached are saved there, and
a run with the same checkpoint, criterion and batches continues from the last finished layer.

Under torch.distributed each rank streams every layer over its share of the batches (`batches[rank::world]`, of
the same full list on every rank), with `offload_dir` in a folder of its own, and the sums are SUM-reduced once at
the end: the compute divides by the ranks (each still reads every layer) and the result is one process's.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _aliases
from ..model.experts import fingerprint
from ..model.hooks import experts_hooks
from ..model.layers import decoder_layers
from ..model.view import checkpoint_fingerprint, open_checkpoint, resident
from .boundaries import Boundaries, forget, resume, run_key, save_position
from .context import frozen
from .criteria import magnitude_scores, sequence_losses
from .gram import compensated
from .loss import Batch, forward, prepare_batch, targets
from .scorer import Scorer, score as score_in_memory
from .scores import Scores

WEIGHT_CRITERIA = ("magnitude", "compensated")  # read expert weights after the sweep, one experts module at a time


class _Stop(Exception):
    """Raised by the last stand-in of a capture pass: nothing after the decoder layers is needed."""


class _Stand(nn.Module):
    """A decoder layer's stand-in during a whole-model forward: hands (index, hidden state, arguments) to `call`."""

    def __init__(self, layer: nn.Module, index: int, call):
        super().__init__()
        self.index, self.call = index, call
        for key, value in vars(layer).items():  # plain attributes a model's forward may read (attention_type)
            if not key.startswith("_") and key not in vars(self) and isinstance(value, (str, int, float, bool)):
                setattr(self, key, value)

    def forward(self, hidden_states, *args, **kwargs):
        return self.call(self.index, hidden_states, args, kwargs)


@contextmanager
def _stand_ins(layers: nn.ModuleList, call):
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Stand(layer, i, call)
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class Streamed:
    """A model whose decoder layers are made resident one at a time: from a checkpoint directory (an empty model
    filled by `resident`), or an in-memory model (nothing to load; the same sweeps, e.g. to compare)."""

    def __init__(self, source: str | Path | nn.Module, device=None, dtype: torch.dtype | str = "auto"):
        if isinstance(source, nn.Module):  # runs where its weights are (`device` applies to checkpoints)
            self.model, self.view = source, None
            self.device = next(source.parameters()).device
        else:
            # refuses ragged experts and a checkpoint missing tensors, before any sweep
            _, _, self.model, self.view = open_checkpoint(source, dtype)
            self.device = torch.device(device or "cpu")
            for module in self.model.modules():  # rotary inv_freq and the like: computed on the CPU by empty_model
                for b in module._non_persistent_buffers_set:
                    if module._buffers.get(b) is not None:
                        module._buffers[b] = module._buffers[b].to(self.device)
        self.prefix, self.layers = decoder_layers(self.model)
        self.dtype = next(t for t in self.model.parameters()).dtype

    def resident(self, part: str):
        """A block with `part` resident: a decoder layer (by module name), "input" (what runs before the decoder
        layers: the embeddings) or "output" (what runs after: final norm, head). Tied embeddings are one tensor."""
        if self.view is None:
            return nullcontext()
        if part in ("input", "output"):
            other = self.model.get_output_embeddings() if part == "input" else self.model.get_input_embeddings()
            names = {m: n for n, m in self.model.named_modules()}
            excluded = (self.prefix, *((names[other],) if other in names else ()))
            return resident(self.model, self.view, "", self.device, exclude=excluded)
        return resident(self.model, self.view, part, self.device)

    def close(self) -> None:
        if self.view is not None:
            self.view.source._close()

    def fingerprint(self) -> str:
        return fingerprint(self.model) if self.view is None else checkpoint_fingerprint(self.view, self.model)

    def capture(self, batch: Batch) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """(hidden state entering layer 0 [B, T, H], the arguments the model's forward gives each layer)."""
        record: dict = {}
        last = len(self.layers) - 1

        def call(i, h, args, kwargs):
            if i == 0:
                record["h"] = h
            record[i] = (args, kwargs)
            if i == last:
                raise _Stop
            return h

        with _stand_ins(self.layers, call), torch.no_grad():
            try:
                forward(self.model, batch)
            except _Stop:
                pass
        return record["h"], [record[i] for i in range(len(self.layers))]

    def head_losses(self, batch: Batch, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_n [B], supervised tokens [B]) of the model whose last decoder layer outputs `top` [B, T, H]: the
        model's own forward after the layers (the embeddings are not run: `top` stands in for their output)."""
        config = self.model.config
        had, router_logits = "output_router_logits" in vars(config), getattr(config, "output_router_logits", None)
        config.output_router_logits = False  # no router ran: no load-balancing loss to add
        try:
            with _stand_ins(self.layers, lambda i, h, args, kwargs: top if i == 0 else h):
                logits = self.model(inputs_embeds=top.detach(), attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids, use_cache=False).logits
            return sequence_losses(self.model, batch, logits)
        finally:
            if had:
                config.output_router_logits = router_logits
            else:
                del config.output_router_logits

    def run_layer(self, i: int, h: torch.Tensor, arguments: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = arguments
        return _first(self.layers[i](h, *args, **kwargs))


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _chunks(batches: list[Batch], chunk: int | None) -> list[list[int]]:
    """Batch indices per sweep: whole batches, at most `chunk` sequences each (at least one batch)."""
    if chunk is None:
        return [list(range(len(batches)))]
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk is a number of sequences per sweep (>= 1), got {chunk!r}")
    groups: list[list[int]] = [[]]
    held = 0  # sequences in the last group
    for b, batch in enumerate(batches):
        size = batch.input_ids.shape[0]
        if groups[-1] and held + size > chunk:
            groups.append([])
            held = 0
        groups[-1].append(b)
        held += size
    return groups


class StreamedScorer(Scorer):
    """A Scorer whose model is streamed (`Streamed`): the weight criteria read each experts module's weights after
    the sweep, one module at a time."""

    def __init__(self, streamed: Streamed, criterion: str, structure: bool, seed: int = 0):
        super().__init__(streamed.model, criterion, structure=structure, seed=seed)
        self.streamed = streamed
        self.fingerprint = streamed.fingerprint()
        self.to(streamed.device)
        if self.structure is not None:
            self.structure.block_hooks = False  # block similarity comes from the stored boundaries

    def _tensors(self, criterion: str) -> dict[str, torch.Tensor]:
        if criterion not in WEIGHT_CRITERIA or self.streamed.view is None:
            return super()._tensors(criterion)
        out = {}
        for name, module in self.modules.items():
            with self.streamed.resident(name):
                if criterion == "magnitude":
                    out.update(magnitude_scores({name: module}))
                else:
                    out.update(compensated(self.grams.result({name: module}, [name])))
        return out


def streamed_scorer(source: str | Path | nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                    criterion: str = "fisher", *, structure: bool = False, chunk: int | None = None,
                    offload_dir: str | Path | None = None, device=None, dtype: torch.dtype | str = "auto",
                    seed: int = 0, progress: bool | None = None) -> StreamedScorer:
    """The finished Scorer of `criterion` (+ the expert and layer statistics with `structure`) over `batches`,
    computed one decoder layer at a time from checkpoint directory `source` (see the module docstring)."""
    streamed = Streamed(source, device, dtype)
    scorer = StreamedScorer(streamed, criterion, structure, seed)
    rank, world = _world()
    prepared = [prepare_batch(b, torch.device("cpu")) for b in _listed(batches)]
    fisher = scorer.needs_grad
    if not prepared:
        raise ValueError(f"criterion {criterion!r} needs calibration batches; got none")
    if fisher and not any(bool((targets(b) != -100).any()) for b in prepared):
        raise ValueError("no calibration sample with a supervised token: nothing to score (Fisher needs labels)")
    prepared = prepared[rank::world]  # this rank's share
    groups = _chunks(prepared, chunk)
    groups += [[]] * (_max_over_ranks(len(groups), world, streamed.device) - len(groups))  # as many sweeps per rank
    sync = _sum_over_ranks if world > 1 else None
    shows = sys.stderr.isatty() if progress is None else progress
    keep_all = fisher or structure
    directory, position, key = None, {"chunk": 0, "phase": "forward", "layer": 0}, None
    if offload_dir is not None:
        directory = Path(offload_dir) / (f"rank{rank}-of-{world}" if world > 1 else "")
        key = run_key([scorer.fingerprint, scorer.criterion, structure, chunk, world, str(streamed.dtype)], prepared)
        directory.mkdir(parents=True, exist_ok=True)
        position = resume(directory, key, scorer) or position
        _check_space(directory, _store(streamed, prepared, max(groups, key=len), None).nbytes,
                     (len(streamed.layers) + 1 if keep_all else 2) + (2 if fisher else 0))
    with frozen(streamed.model), torch.no_grad():
        for c in range(position["chunk"], len(groups)):
            start = position if c == position["chunk"] else {"phase": "forward", "layer": 0}
            store = _store(streamed, prepared, groups[c], directory)
            _sweep(streamed, scorer, [prepared[b] for b in groups[c]], store, start, keep_all, fisher,
                   (c, len(groups)), shows, directory and (directory, key), sync)
        _reduce(scorer, world)
    streamed.close()
    if directory is not None:
        forget(directory)
    return scorer


def _store(streamed: Streamed, batches: list[Batch], group: list[int], directory: Path | None) -> Boundaries:
    """The boundary states of one sweep: a [B, T, H] state per batch of `group`, in the model's dtype."""
    hidden = streamed.model.config.hidden_size
    return Boundaries([batches[b].input_ids.shape + (hidden,) for b in group], streamed.dtype, directory)


def _check_space(directory: Path, boundary: int, slots: int) -> None:
    """Refuse, before the sweep, an offload directory without room for `slots` boundaries of `boundary` bytes
    (files of an interrupted sweep already there count as room)."""
    have = sum(p.stat().st_size for p in directory.glob("*.bin"))
    free = shutil.disk_usage(directory).free
    if boundary * slots > free + have:
        raise OSError(f"offload_dir {directory} has {free / 2**30:.1f} GiB free; the sweep stores {slots} "
                      f"boundaries of {boundary / 2**30:.2f} GiB: use a smaller chunk or another directory")


def _max_over_ranks(value: int, world: int, device) -> int:
    if world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _sum_over_ranks(flags: torch.Tensor) -> torch.Tensor:
    """A step's [bad loss, bad gradient] flags summed over the ranks, so that every rank raises together."""
    import torch.distributed as dist

    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return flags


@_aliases.renamed(method="criterion")
def score(model: nn.Module | str | Path, batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
          criterion: str = "fisher", *, seed: int = 0, progress: bool | None = None, streamed: bool = False,
          **stream_options) -> Scores:
    """`fmoe.score`: fmoe.calibration.scorer.score on an in-memory model; on a checkpoint directory (or with
    `streamed=True`) the same pass streamed one decoder layer at a time (`stream_options`: chunk, offload_dir,
    device, dtype), with the same scores. grad_abs (weight gradients, one sequence at a time) is not streamed."""
    if streamed or not isinstance(model, nn.Module):
        return streamed_scorer(model, batches, criterion, seed=seed, progress=progress, **stream_options).result()
    if stream_options:
        raise TypeError(f"{sorted(stream_options)} apply to a streamed pass (streamed=True or a checkpoint directory)")
    return score_in_memory(model, batches, criterion, seed=seed, progress=progress)


def _listed(batches) -> list:
    if batches is None:
        raise ValueError("streamed calibration needs calibration batches")
    return list(batches)


def _sweep(streamed: Streamed, scorer: StreamedScorer, batches: list[Batch], store: Boundaries, start: dict,
           keep_all: bool, fisher: bool, chunk: tuple[int, int], shows: bool, saving, sync) -> None:
    """One chunk: capture, forward sweep, (Fisher) head and backward sweep; from `start` when resuming. A rank
    with no batch in this chunk reads nothing but joins every step's check (`sync`)."""
    device, layers = streamed.device, len(streamed.layers)
    reading = streamed.resident if batches else (lambda part: nullcontext())
    arguments = []
    with reading("input"):
        for b, batch in enumerate(batches):
            h, args = streamed.capture(_on(batch, device))
            if start["phase"] == "forward" and start["layer"] == 0:
                store.put("h0", b, h)
            arguments.append(args)
            del h
    label = f" (chunk {chunk[0] + 1}/{chunk[1]})" if chunk[1] > 1 else ""

    def save(phase: str, layer: int) -> None:
        if saving:
            save_position(saving[0], saving[1], scorer, {"chunk": chunk[0], "phase": phase, "layer": layer})

    def forget_states() -> None:
        for slot in [f"h{i}" for i in range(layers + 1)] + ["g0", "g1"]:
            store.drop(slot)

    if start["phase"] == "forward":
        # Fisher's forward sweep only stores boundaries; the hooks run in the backward sweep's recomputation
        hooks = experts_hooks(streamed.model, {}) if fisher else _attached(scorer)
        with hooks:
            for i in tqdm(range(start["layer"], layers), disable=not shows, desc=f"forward sweep{label}",
                          unit="layer"):
                with reading(f"{streamed.prefix}.{i}"):
                    for b, batch in enumerate(batches):
                        scorer.observe(_raw(batch))
                        h = streamed.run_layer(i, store.get(f"h{i}", b, device), arguments[b][i])
                        store.put(f"h{i + 1}", b, h)
                save("forward", i + 1)
                if not keep_all:
                    store.drop(f"h{i}")
        if scorer.structure is not None:  # cos between every pair of boundaries, batch by batch
            for b, batch in enumerate(batches):
                scorer.observe(_raw(batch))
                scorer.structure.add_block_states([store.get(f"h{i}", b, device) for i in range(layers + 1)],
                                                  scorer.ctx)
        if not fisher:
            for batch in batches:
                scorer.count(batch.input_ids.shape[0], int(batch.attention_mask.sum()))
            save("done", layers)
            forget_states()
            return
        loss_ok = True
        with reading("output"), torch.enable_grad():
            for b, batch in enumerate(batches):
                top = store.get(f"h{layers}", b, device).detach().requires_grad_(True)
                losses, counts = streamed.head_losses(_on(batch, device), top)
                loss_ok = loss_ok and bool(torch.isfinite(losses).all())
                (grad,) = torch.autograd.grad(losses.sum(), top)
                store.put(f"g{layers % 2}", b, grad)
                scorer.count(int((counts > 0).sum()), int(counts.sum()))
        scorer.end_step(loss_ok, sync)  # the block similarities and counts join the sums (raises on a bad loss)
        save("backward", layers - 1)
        start = {"phase": "backward", "layer": layers - 1}
    if start["phase"] == "backward":
        with _attached(scorer):
            for i in tqdm(range(start["layer"], -1, -1), disable=not shows, desc=f"backward sweep{label}",
                          unit="layer"):
                with reading(f"{streamed.prefix}.{i}"), torch.enable_grad():
                    for b, batch in enumerate(batches):
                        scorer.observe(_raw(batch))
                        x = store.get(f"h{i}", b, device).detach().requires_grad_(True)
                        y = streamed.run_layer(i, x, arguments[b][i])
                        (grad,) = torch.autograd.grad(y, x, store.get(f"g{(i + 1) % 2}", b, device))
                        store.put(f"g{i % 2}", b, grad)
                scorer.end_step(True, sync)  # this layer's Fisher sums (raises on a non-finite gradient)
                save("backward", i - 1)
        save("done", 0)
        forget_states()


def _on(batch: Batch, device) -> Batch:
    return Batch(*(t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids)))


def _raw(batch: Batch) -> dict:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


@contextmanager
def _attached(scorer: Scorer):
    with ExitStack() as stack:
        scorer.attach(freeze=False)
        stack.callback(scorer.detach)
        yield


def _reduce(scorer: Scorer, world: int) -> None:
    """SUM every accumulated tensor and the counts over the ranks (once, after the sweeps)."""
    if world == 1:
        return
    import torch.distributed as dist

    state = scorer.state()
    for t in state.values():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    counts = torch.tensor([scorer.samples, scorer.tokens], dtype=torch.float64, device=scorer.device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    scorer.samples, scorer.tokens = int(counts[0]), int(counts[1])
