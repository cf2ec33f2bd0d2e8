"""A safetensors checkpoint directory seen as a model's tensors, without the model: the model built on the meta
device (no storage) gives the names, shapes and layout flags; transformers' conversion mapping of the family says
which checkpoint key feeds which parameter (per-expert layouts through the small table `_PER_EXPERT_OPS`, any
other refused with an error naming it); tensors and single experts are read one at a time with plain reads.
fmoe.methods.offline prunes and scores checkpoints through this view."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..model.checkpoint import (INDEX_FILE, SAFETENSORS_DTYPES, empty_model, read_header, read_tensor, rebuild, slots,
                                weight_files)
from ..model.experts import RaggedExperts, expert_widths, find_experts, fingerprint_of


class Source:
    """A safetensors checkpoint read tensor by tensor: {key: file}, dtypes and shapes from the headers (checked
    against the files' sizes), and each tensor (or one expert's row of a stacked tensor) read into fresh memory with
    plain reads: no file is mapped, so the checkpoint's pages never count in the process's resident memory."""
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise FileNotFoundError(f"{self.directory} has no config.json: not a model directory")
        files = weight_files(self.directory)  # {shard: the names the index places in it (None: one file)}
        self.files = sorted(str(path.relative_to(self.directory)) for path in files)
        self.file_of: dict[str, str] = {}
        self.info: dict[str, tuple[str, list[int]]] = {}  # key: (safetensors dtype, shape)
        self._entries: dict[str, tuple] = {}  # key: (dtype, shape, start, stop, data offset) in its file
        for name in self.files:
            tensors, base = read_header(self.directory / name)
            for key, (dtype, shape, start, stop) in tensors.items():
                self.file_of[key], self.info[key] = name, (_SAFETENSORS_NAME[dtype], shape)
                self._entries[key] = (dtype, shape, start, stop, base)
        wrong = [k for path, names in files.items() for k in names or ()
                 if self.file_of.get(k) != str(path.relative_to(self.directory))]
        if wrong:
            raise ValueError(f"{self.directory / INDEX_FILE} maps {wrong[:3]} to files that do not hold them")

    _handle, _handle_name = None, None

    def _open(self, name: str):
        if self._handle_name != name:
            self._close()
            self._handle = open(self.directory / name, "rb", buffering=0)
            self._handle_name = name
        return self._handle

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = self._handle_name = None

    def tensor(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key`, read into fresh memory or straight into `out` (a contiguous CPU tensor of its dtype and
        size: no intermediate copy)."""
        dtype, shape, start, stop, base = self._entries[key]
        path = self.directory / self.file_of[key]
        return read_tensor(self._open(self.file_of[key]), path, base, (dtype, shape, start, stop), out)

    def row(self, key: str, e: int) -> torch.Tensor:
        """tensor[e] of a stacked [E, ...] tensor, reading only that expert's bytes."""
        dtype, shape, start, stop, base = self._entries[key]
        if not 0 <= e < shape[0]:
            raise IndexError(f"{key} stacks {shape[0]} experts, not {e + 1}")
        size = (stop - start) // shape[0]
        path = self.directory / self.file_of[key]
        return read_tensor(self._open(self.file_of[key]), path, base, (dtype, shape[1:], start + e * size,
                                                                        start + (e + 1) * size))


_SAFETENSORS_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def meta_model(config):
    """The model of `config` on the meta device (names, shapes, layout flags; no storage), cut to the widths an
    fmoe checkpoint records, so its state dict describes that checkpoint."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return rebuild(model, config)


@dataclass(frozen=True)
class Place:
    """Where a model tensor (or part of it) lives in a checkpoint: `key` whole, or, for a per-expert layout, the
    `part`-th of `parts` equal pieces (along dim 0) of expert `expert`'s slice [2I, H] of the model tensor."""
    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1


# A WeightConverter fmoe can follow tensor by tensor: stack experts, then (gated) concatenate gate and up.
_PER_EXPERT_OPS = {1: ["MergeModulelist(dim=0)"], 2: ["MergeModulelist(dim=0)", "Concatenate(dim=1)"]}


class Naming:
    """Checkpoint key <-> model state-dict key, from transformers' conversion mapping of the model's family (the
    one `from_pretrained` and `save_pretrained` use)."""
    def __init__(self, model):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model, self.state = model, model.state_dict()
        mapping = get_model_conversion_mapping(model)
        self.renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        self.converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}

    def locate(self, key: str) -> tuple[str, Place]:
        """(model key, where `key` sits in it)."""
        from transformers.core_model_loading import apply_renamings, rename_source_key

        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.model.base_model_prefix,
                                             self.state)
        if pattern is None:  # a plain rename (or none): the whole tensor
            return renamed, Place(key)
        converter = self.by_pattern[pattern]
        ops, n = [repr(op) for op in converter.operations], len(converter.source_patterns)
        found = re.search(pattern.replace("*.", r"(\d+)\."), apply_renamings(key, self.renamings))
        if ops != _PER_EXPERT_OPS.get(n) or "*." not in pattern or found is None:
            raise NotImplementedError(
                f"{self.model.config.model_type}: checkpoint key {key} is converted by {ops} from "
                f"{converter.source_patterns}; fmoe reads per-expert layouts {list(_PER_EXPERT_OPS.values())} only")
        return renamed, Place(key, int(found.group(1)), converter.source_patterns.index(pattern), n)

    def saved_keys(self, model) -> dict[str, list[int]]:
        """{key: shape} that `model.save_pretrained` writes (tied aliases dropped, the family's own layout)."""
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(model.state_dict(), model)
        return {k: list(v.shape) for k, v in revert_weight_conversion(model, state).items()}


def tie_groups(model) -> list[list[str]]:
    """Names that share one parameter or buffer (tied embeddings), found by identity (meta tensors share no
    storage pointer to compare)."""
    groups: dict[int, list[str]] = {}
    for name in model.state_dict():
        groups.setdefault(id(model.get_parameter_or_buffer(name)), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


class ModelView:
    """The source checkpoint seen as the model's state dict: any model tensor whole, or one expert's slice in the
    model's layout, read from whichever layout the checkpoint uses."""
    def __init__(self, source: Source, model):
        self.source, self.naming = source, Naming(model)
        self.whole: dict[str, str] = {}
        self.pieces: dict[str, dict[int, list[str | None]]] = {}  # model key: {expert: [key of each part]}
        quantized = [k for k, (dtype, _) in source.info.items() if dtype.startswith("F8") or k.endswith("_scale_inv")]
        if quantized:
            raise ValueError(f"{source.directory} is quantized ({quantized[0]}: FP8 weights and their scales): fmoe "
                             "reads bf16/fp16/fp32 checkpoints; convert it first (e.g. DeepSeek's fp8_cast_bf16.py)")
        ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        unexpected = []
        for key in source.info:
            if any(p.search(key) for p in ignored):  # what the family's loader skips too (DeepSeek-V3's MTP layer)
                continue
            target, place = self.naming.locate(key)
            if target not in self.naming.state:
                unexpected.append(key)  # reported below, with everything else that does not match
                continue
            if place.expert is None:
                self.whole[target] = key
            else:
                slots = self.pieces.setdefault(target, {}).setdefault(place.expert, [None] * place.parts)
                slots[place.part] = key
        for names in tie_groups(model):  # a tied alias reads from whichever name the checkpoint kept
            held = next((self.whole[n] for n in names if n in self.whole), None)
            for n in names:
                if held is not None:
                    self.whole.setdefault(n, held)
        covered = set(self.whole) | set(self.pieces)
        missing = sorted(set(self.naming.state) - covered)
        broken = [k for k, ex in self.pieces.items()
                  if sorted(ex) != list(range(self.naming.state[k].shape[0])) or any(None in p for p in ex.values())]
        if missing or unexpected or broken:
            raise ValueError(f"{source.directory}: the checkpoint does not match its config.json: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, incomplete experts {broken[:3]}")
        for k, key in self.whole.items():
            if source.info[key][1] != list(self.naming.state[k].shape):
                raise ValueError(f"{source.directory}: {key} has shape {source.info[key][1]}, the config's model "
                                 f"expects {list(self.naming.state[k].shape)} for {k}")

    def tensor(self, key: str) -> torch.Tensor:
        return self.source.tensor(self.whole[key])

    def expert(self, key: str, e: int) -> torch.Tensor:
        """Model tensor `key`'s slice of expert e ([2I, H]-like), in the model's layout."""
        if key in self.whole:
            return self.source.row(self.whole[key], e)
        parts = [self.source.tensor(k) for k in self.pieces[key][e]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def full(self, key: str, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """Model tensor `key` whole, in the model's layout, as `dtype` on `device` (a per-expert checkpoint's
        experts copied one at a time into the stacked tensor: no second copy of it is ever held)."""
        stored = SAFETENSORS_DTYPES[self.dtype_of(key)]
        dtype, shape = dtype or stored, self.naming.state[key].shape
        direct = dtype == stored and torch.device(device or "cpu").type == "cpu"  # read straight into place
        if key in self.whole:
            read = self.source.tensor(self.whole[key], torch.empty(shape, dtype=dtype) if direct else None)
            return read.to(device=device, dtype=dtype)
        out = torch.empty(shape, dtype=dtype, device=device)
        for e, keys in sorted(self.pieces[key].items()):
            for part, k in zip(out[e].chunk(len(keys), dim=0), keys):  # contiguous rows of expert e
                if direct:
                    self.source.tensor(k, part)
                else:
                    part.copy_(self.source.tensor(k))
        return out

    def dtype_of(self, key: str) -> str:
        return self.source.info[self.whole[key] if key in self.whole else self.pieces[key][0][0]][0]

    def expert_params(self, module_name: str, module, e: int) -> SimpleNamespace:
        """A one-expert stand-in of experts module `module` (its flags, expert e's parameters as [1, ...]) that
        `slice_expert` and the scoring functions read exactly as they read the module."""
        params = {name: self.expert(f"{module_name}.{name}", e).unsqueeze(0) for name, _ in module.named_parameters()}
        flags = {k: getattr(module, k) for k in ("has_gate", "is_transposed", "is_concatenated", "has_bias")}
        return SimpleNamespace(**flags, **params)


def _head(view: ModelView, module_name: str, param: str, n: int = 64) -> torch.Tensor:
    """The first n elements of a stacked expert tensor, flattened, reading experts in turn until there are n."""
    got, e, experts = [], 0, view.naming.state[f"{module_name}.{param}"].shape[0]
    while sum(t.numel() for t in got) < n and e < experts:
        got.append(view.expert(f"{module_name}.{param}", e).reshape(-1))
        e += 1
    return torch.cat(got)[:n].clone()  # [n], not a view keeping whole experts alive


def checkpoint_fingerprint(view: ModelView, model) -> str:
    """`fmoe.fingerprint` of the checkpoint's model, from its tensors."""
    samples = []
    for name, module in find_experts(model).items():
        params = [p for p, _ in module.named_parameters()]
        samples.append((name, expert_widths(module), [_head(view, name, p) for p in (params[0], params[-1])]))
    return fingerprint_of(model.config.model_type, samples)


def open_checkpoint(src: str | Path, dtype: torch.dtype | str = "auto"):
    """(Source, config, empty model, ModelView) of an unpruned or uniformly pruned checkpoint: the model built by
    `empty_model` (meta parameters in `dtype`, rotary buffers computed), ragged experts refused."""
    source = Source(src)
    model = empty_model(source.directory, dtype)
    config = model.config
    ragged = [n for n, m in find_experts(model).items() if isinstance(m, RaggedExperts)]
    if ragged:
        raise ValueError(f"{source.directory} holds ragged (non-uniformly pruned) experts {ragged[:3]}: score and "
                         "prune the original checkpoint")
    return source, config, model, ModelView(source, model)


@contextmanager
def resident(model: nn.Module, view: ModelView, prefix: str = "", device=None, exclude: tuple[str, ...] = ()):
    """The tensors of `model`'s state dict under `prefix` (a module name; "" = all; names under `exclude` left
    out) read from `view` onto `device` in the model's dtypes, for the duration of the block; on exit they go back
    to the meta device and their memory is freed. `model` is an empty model (`fmoe.model.checkpoint.empty_model`)
    of the checkpoint; tied names share one tensor, loaded once."""
    chosen = [n for n in view.naming.state if (not prefix or n == prefix or n.startswith(prefix + "."))
              and not any(n == x or n.startswith(x + ".") for x in exclude)]
    sites, done = slots(model), set()
    try:
        for name in chosen:
            group = sites[name]
            if id(group) in done:
                continue
            module, attr, is_param = group[0]
            old = getattr(module, attr)
            value = view.full(name, old.dtype, device or "cpu")
            if is_param:
                value = nn.Parameter(value, requires_grad=old.requires_grad)
            for m, a, p in group:
                (m._parameters if p else m._buffers)[a] = value
            done.add(id(group))
        yield model
    finally:
        for name in chosen:
            group = sites[name]
            module, attr, is_param = group[0]
            old = getattr(module, attr)
            if old.is_meta:
                continue
            value = torch.empty_like(old, device="meta")
            if is_param:
                value = nn.Parameter(value, requires_grad=old.requires_grad)
            for m, a, p in group:
                (m._parameters if p else m._buffers)[a] = value
