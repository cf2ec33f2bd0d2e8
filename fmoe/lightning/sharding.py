"""FSDP2 for every stage: each fit runs a sharded twin of the model, while the model itself stays a plain module.

Under `ModelParallelStrategy` a module's `configure_model` calls `shard(self, "model")`: `self.model` becomes a
copy whose parameters start as views of the original's (no copy is made) and are then sharded by `fully_shard`,
one unit per decoder layer (`_no_split_modules`) plus the root; peft's adapters sit inside the decoder layers, so
they never get units of their own. The original keeps its class, its CPU storage and its identity, so the next
stage can prune it, evaluate it, wrap it in peft or export it as if no sharding had happened. `unshard(self,
"model")` at the end of the fit copies back what the fit trained (gathered full tensors of trainable parameters)
and puts the original back.

Cost: every process holds the model in host memory for the whole run (it loaded it there to shard it), so host
RAM must fit world size x model bytes; GPU memory holds only the shards.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_ORIGINAL = "_fmoe_unsharded"  # stored in the owner's __dict__: not a submodule, so never moved to the GPU


def mesh_of(owner: nn.Module):
    """The data-parallel device mesh Lightning's ModelParallelStrategy gives a LightningModule, or None."""
    try:
        mesh = getattr(owner, "device_mesh", None)
    except RuntimeError:  # no trainer attached
        return None
    if mesh is None:
        return None
    return mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def sharded_copy(model: nn.Module, mesh) -> nn.Module:
    """A copy of `model` with `fully_shard` applied to each decoder layer and to the root; `model` is untouched."""
    from torch.distributed.fsdp import fully_shard

    # the copy's parameters are new Parameter objects over the original storage; fully_shard then replaces them
    # by freshly allocated local shards, so no full second copy ever exists
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    layer_classes = set(getattr(_hf_model(twin), "_no_split_modules", None) or [])
    if not layer_classes:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules) to shard by")
    for module in twin.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(twin, mesh=mesh)
    return twin


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@torch.no_grad()
def copy_back(original: nn.Module, twin: nn.Module) -> None:
    """Gather every trainable parameter of the sharded twin and write it into the original (same names)."""
    from torch.distributed.tensor import DTensor

    target = dict(original.named_parameters())
    for name, p in twin.named_parameters():
        if not p.requires_grad:
            continue  # frozen: the twin's shards still hold the original's values
        full = p.full_tensor() if isinstance(p, DTensor) else p  # a collective: every rank takes the same path
        target[name].copy_(full.to(target[name].device, target[name].dtype))


def shard(owner: nn.Module, attr: str = "model") -> None:
    """Replace `owner.<attr>` by its sharded twin when a device mesh is set (ModelParallelStrategy); else nothing."""
    mesh = mesh_of(owner)
    if mesh is None or _ORIGINAL in owner.__dict__:
        return
    original = getattr(owner, attr)
    setattr(owner, attr, sharded_copy(original, mesh))
    owner.__dict__[_ORIGINAL] = (attr, original)


def unshard(owner: nn.Module, gather: bool = True) -> None:
    """Undo `shard`: copy trained parameters back into the original (a collective, unless `gather=False`, as after
    an exception) and put the original back in place."""
    saved = owner.__dict__.pop(_ORIGINAL, None)
    if saved is None:
        return
    attr, original = saved
    if gather:
        copy_back(original, getattr(owner, attr))
    setattr(owner, attr, original)
