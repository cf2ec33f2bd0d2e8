"""FSDP2 for every stage: each fit runs a sharded twin of the model, while the model itself stays a plain module.

Under `ModelParallelStrategy` a module's `configure_model` calls `shard(self, "model")`: `self.model` becomes a
copy whose parameters start as views of the original's (no copy is made) and are then sharded by `fully_shard`,
one unit per decoder layer (`_no_split_modules`) plus the root; peft's adapters sit inside the decoder layers, so
they never get units of their own. The original keeps its class, its CPU storage and its identity, so the next
stage can prune it, evaluate it, wrap it in peft or export it as if no sharding had happened. `unshard(self,
trainer)` at the end of a fit copies what the fit's optimizers trained (gathered full tensors) into the original
and puts it back; after validation nothing is copied. Buffers are never copied back.

    def configure_model(self):          # a user's LightningModule
        shard(self, "model")
    def teardown(self, stage):
        unshard(self, self.trainer)

Cost under DDP: every process holds the model in host memory (each needs a full replica). Under FSDP2 only rank 0
holds the plain model's weights: only rank 0 reads the checkpoint (`load_model` gives the other ranks an empty,
meta model), and `shard` fills each rank's twin with its shards straight from rank 0's plain model
(`fill_from_rank0`), so a non-zero rank's plain model stays on meta for the whole run: `unshard` gathers what a fit
trained into rank 0's plain model only, IntermediatePruning slices an empty model's shapes, peft wraps it on meta,
and exports are written by rank 0. Under DDP `materialize` (called by the fmoe modules' `configure_model`, once the
process group is up) fills empty models by broadcast from rank 0.
"""

from __future__ import annotations

import copy
import gc
import os
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn

from ..model.checkpoint import broadcast_weights, empty_model, from_pretrained
from ..model.experts import on_meta

_ORIGINAL = "_fmoe_unsharded"  # {attr: original} in the owner's __dict__: not submodules, never moved to the GPU


def launched_rank() -> int:
    """This process's rank in a multi-process launch whose process group is not initialised yet (Lightning's
    launchers start it inside the first fit; torchrun and Lightning set RANK or LOCAL_RANK with WORLD_SIZE); 0
    when there is none or it cannot be told (then the process loads the checkpoint itself, which is correct)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def process_rank() -> int:
    """This process's rank: in the process group when it is up, else in the launch (`launched_rank`)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else launched_rank()


def load_model(directory: str | Path, dtype: torch.dtype | str = "auto", **kwargs) -> nn.Module:
    """The model of a checkpoint for a Lightning run, read once per run rather than once per process: rank 0 (of
    the process group, or of the launch when it is not up yet) loads it; every other rank gets the empty (meta)
    model, which the fmoe modules' `configure_model` fill from rank 0 (DDP: `materialize`; FSDP2: `shard` gives
    each rank its shards only, so the plain model stays empty)."""
    if process_rank() != 0:
        return empty_model(directory, dtype, **kwargs)
    return from_pretrained(directory, dtype, **kwargs)


def materialize(model: nn.Module, strategy=None) -> nn.Module:
    """Fill models left empty by `load_model` from rank 0 (`fmoe.model.checkpoint.broadcast_weights`); every rank calls
    it in `configure_model`, where the process group is up. A collective only when some rank's model is empty.
    Under ModelParallelStrategy (FSDP2) nothing is filled: `shard` gives each rank only its shards of rank 0's
    weights, so an empty model stays empty."""
    import torch.distributed as dist

    empty = on_meta(model)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if empty:
            raise RuntimeError(f"the model is empty (meta): it was built for rank {launched_rank()} of a "
                               "multi-process run, which gets its weights from rank 0 once the process group is up, "
                               "but this run has none; load it with fmoe.from_pretrained")
        return model
    if data_parallel_mesh(strategy) is not None:
        return model
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, empty)
    if any(flags):
        broadcast_weights(model)
    return model


def data_parallel_mesh(strategy):
    """The data-parallel device mesh of a ModelParallelStrategy (tensor-parallel ranks share data), else None."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if not isinstance(strategy, ModelParallelStrategy):
        return None
    mesh = strategy.device_mesh
    return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh


def mesh_of(owner: L.LightningModule):
    """The data-parallel device mesh when `owner` runs under ModelParallelStrategy, else None."""
    trainer = owner._trainer  # None outside a Trainer run
    # a mesh left on the module by an earlier FSDP2 run does not count
    return None if trainer is None else data_parallel_mesh(trainer.strategy)


def is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def sharded_copy(model: nn.Module, mesh) -> nn.Module:
    """A copy of `model` with `fully_shard` applied to each decoder layer and to the root; `model` is untouched."""
    from torch.distributed.fsdp import fully_shard

    # the copy's parameters are new Parameter objects over the original storage; fully_shard then replaces them
    # by freshly allocated local shards, so no full second copy ever exists
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    base = twin.get_base_model() if callable(getattr(twin, "get_base_model", None)) else twin  # inside peft
    layer_classes = set(getattr(base, "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for module in twin.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    # a frozen model (a distillation teacher) runs no backward that would reshard the root's parameters (embedding,
    # head) after its forward: reshard them at once, or every rank would keep them whole
    frozen = not any(p.requires_grad for p in twin.parameters())
    fully_shard(twin, mesh=mesh, reshard_after_forward=True if frozen else None)
    return twin


def fill_from_rank0(twin: nn.Module, original: nn.Module) -> None:
    """When some rank's `original` is empty (meta), give every rank's sharded `twin` its shards of rank 0's
    `original`: each tensor is broadcast once and each rank keeps only its slice (`set_model_state_dict` with
    `broadcast_from_rank0`), so no rank but 0 holds the full weights. A collective: every rank calls it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, on_meta(original))
    if not any(flags):
        return
    if flags[0]:
        raise ValueError("sharding sends rank 0's weights to the other ranks, but rank 0's model is empty (meta): "
                         "load the model on rank 0 (fmoe.lightning.sharding.load_model does)")
    state = original.state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(twin, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    left = [n for n, t in (*twin.named_parameters(), *twin.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"rank {dist.get_rank()}: rank 0's state dict did not fill {left[:5]}")


@torch.no_grad()
def copy_back(original: nn.Module, twin: nn.Module, params: set[int]) -> None:
    """Gather the twin's parameters whose ids are in `params` and write them into the original (same names); an
    empty (meta) original gets nothing. A collective: every rank must call it with the same set."""
    target = dict(original.named_parameters())
    for name, p in twin.named_parameters():
        if id(p) in params:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if not target[name].is_meta:
                target[name].copy_(full.to(target[name].device, target[name].dtype))
            del full


def shard(owner: nn.Module, attr: str = "model") -> None:
    """Replace `owner.<attr>` by its sharded twin when the Trainer runs ModelParallelStrategy; else nothing. The
    twin of an empty (meta) model receives its shards from rank 0's (a collective then). Several attributes may
    be sharded (a student and its teacher); `unshard` puts all of them back."""
    saved = owner.__dict__.get(_ORIGINAL, {})
    if attr in saved:  # a twin left by an interrupted run: start again from the original
        setattr(owner, attr, saved.pop(attr))
    mesh = mesh_of(owner)
    if mesh is None:
        return
    gc.collect()  # an earlier stage's twin is a reference cycle (FSDP2's hooks): free its shards before new ones
    original = getattr(owner, attr)
    twin = sharded_copy(original, mesh)
    fill_from_rank0(twin, original)  # ranks whose model is empty (meta) get their shards of rank 0's
    setattr(owner, attr, twin)
    owner.__dict__.setdefault(_ORIGINAL, {})[attr] = original


def plain(owner: nn.Module, attr: str = "model") -> nn.Module:
    """`owner.<attr>` as the plain model: the original behind a sharded twin during an FSDP2 fit, else itself."""
    return owner.__dict__.get(_ORIGINAL, {}).get(attr, getattr(owner, attr))


def unshard(owner: nn.Module, trainer: L.Trainer | None = None) -> None:
    """Undo `shard`: put the originals back. With the `trainer` of a fit, first copy the parameters its optimizers
    trained into the originals (a collective); without one (validation, an exception) nothing is copied."""
    saved = owner.__dict__.pop(_ORIGINAL, None) or {}
    fit = trainer is not None and trainer.state.fn == "fit"
    trained = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups
               for p in group["params"]} if fit else set()
    for attr, original in saved.items():
        if fit:
            copy_back(original, getattr(owner, attr), trained)
        setattr(owner, attr, original)


class RestoreOnException(L.Callback):
    """LightningModules get no `on_exception` hook: this callback (from their `configure_callbacks`) puts the
    plain model back, detaches a scorer and restores the model's flags when a run fails."""

    def on_exception(self, trainer, pl_module, exception):
        scorer = getattr(pl_module, "scorer", None)
        if scorer is not None:
            scorer.detach()
        unshard(pl_module)
        restore = getattr(pl_module, "restore_model", None)
        if restore is not None:  # CalibrationModule: the user's requires_grad flags
            restore()
