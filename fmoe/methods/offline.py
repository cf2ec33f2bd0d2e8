"""Out-of-core pruning and data-free scoring, straight from a safetensors checkpoint directory.

`prune_checkpoint(src, plan, dst)` writes what `fmoe.prune(model, plan)` + `fmoe.save_pretrained(model, dst)` would
write (same tensor names and values, bit for bit; the config and, for the stock format, the generation config) but
never holds the model: the model is built on the meta device (no storage) for its names, shapes and layout flags,
and tensors are read one at a time with plain reads (fmoe.model.view.Source), sliced expert by expert and streamed into output
shards whose headers are computed up front. `score_checkpoint(src, "magnitude" | "random")` gives the scores
`fmoe.score` gives on the loaded model, with the same fingerprint, so the plans made from them pass `fmoe.prune`.

`edit_checkpoint(src, plan, dst)` applies any fmoe plan out of core and writes what `fmoe.apply_plan` +
`fmoe.save_pretrained` would (a dims plan goes to `prune_checkpoint`). The plan's registered edit runs on a copy of
the empty model (`fmoe.model.checkpoint.empty_model`, every tensor on meta): that gives the output's names,
shapes, layout and config. Values come group by group (`Edited`): a decoder layer, or the tensors outside the
layers, is made resident in a fresh copy (`fmoe.model.view.resident`), the edit runs again, and the output tensors
that group owns (known beforehand from the module holding them) are now real; block drops renumber layers with no
extra code. Peak resident growth is at most about twice the largest group (its source tensors and their edited
copies while the edit runs) plus a few MiB of small tensors kept for later. Output tensors go in the edited state
dict's order (by item size inside a shard, for alignment), so each group is read once, across shard boundaries
too; a group holding two item sizes (float32 router biases in a bf16 model) first has just the module of the
odd tensors read. An edit that needs tensors of other layers to produce a layer's values is refused with an error.

Checkpoint layouts. A source may hold experts fused (`experts.gate_up_proj` [E, 2I, H], as the model stores them,
gpt-oss and granitemoe on the hub, fmoe's fused format) or one tensor per expert (`experts.0.gate_proj.weight`,
Mixtral's `w1/w2/w3`: what transformers' own `save_pretrained` writes for most families). transformers' conversion
mapping of the family says which checkpoint key feeds which model parameter; fmoe reads it through one small table
of conversion operations it knows (`_PER_EXPERT_OPS`) and refuses any other with an error naming it.

Memory. Tensors are read with plain reads into fresh memory (no file is mapped, so the checkpoint's pages never
count as the process's memory); a renamed tensor is copied once, an expert's slices are read one expert at a time,
and output bytes go to the file as they are produced (page cache, not process memory). Peak resident growth is
therefore at most the largest single tensor (the one being copied) plus one expert's parameters; with fused
sources a whole [E, ...] expert tensor is never read at once, and no output shard is ever held. (glibc keeps freed
blocks under its adaptive mmap threshold, at most 32 MiB, in its heap: RSS may show that retention on top;
tests/test_offline.py measures the bound with the threshold pinned.)
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from .. import _aliases
from ..calibration.criteria import magnitude_scores, random_scores
from ..calibration.scores import Scores
from ..io import atomic_directory
from ..model.checkpoint import (FORMAT_FIELD, INDEX_FILE, SAFETENSORS_DTYPES, SERVED_PREFIX, WEIGHTS_FILE,
                                empty_model, is_stock_loadable, tied_head)
from ..model.experts import RaggedExperts, expert_widths, find_experts, slice_expert, width_buckets
from ..model.layers import decoder_layers
from ..model.structure import apply_widths
from ..model.view import (_SAFETENSORS_NAME, ModelView, Naming, Source, checkpoint_fingerprint, meta_model,
                          open_checkpoint, resident, tie_groups)
from .dims.plan import PruningPlan, check_plan_fits

# files of a model directory worth carrying over (tokenizer and chat template); weights and configs are rewritten
_CARRIED = ("tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt", "chat_template*", "*.model",
            "added_tokens.json")


# --------------------------------------------------------------------------------------------- fingerprint, scores


@_aliases.renamed(method="criterion")
def score_checkpoint(src: str | Path, criterion: str = "magnitude", seed: int = 0) -> Scores:
    """`fmoe.score(model, criterion=...)` for the data-free criteria, from the checkpoint's tensors (no model, no
    data)."""
    if criterion not in ("magnitude", "random"):
        raise ValueError(f"score_checkpoint computes the data-free criteria 'magnitude' and 'random', not "
                         f"{criterion!r}; the others need the model and calibration data (fmoe.score)")
    source, config, model, view = open_checkpoint(src)
    modules = find_experts(model)
    meta = {"model_type": config.model_type}
    if criterion == "random":
        tensors = random_scores(modules, seed)  # shapes only
        meta["seed"] = seed
    else:  # one expert at a time: each expert's norms depend on its own weights only
        tensors = {name: torch.cat([magnitude_scores({name: view.expert_params(name, m, e)})[name]
                                    for e in range(len(expert_widths(m)))]) for name, m in modules.items()}
    return Scores(tensors, criterion, checkpoint_fingerprint(view, model), meta=meta)


# ------------------------------------------------------------------------------------------------------ pruning


@dataclass
class Out:
    """One output tensor: its bytes are the concatenation of what `pieces()` yields (row-major, in order)."""
    name: str
    dtype: str
    shape: list[int]
    pieces: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        if self.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.name}: dtype {self.dtype} is not supported (quantized checkpoints are not read)")
        return SAFETENSORS_DTYPES[self.dtype].itemsize * int(torch.Size(self.shape).numel())


class Pruned:
    """The pruned model's tensors, produced on demand from the source: model key -> pieces, plus one expert's cut
    kept at a time (its gate, up and down parts are written one after another)."""
    def __init__(self, view: ModelView, source_model, keep: dict[str, list[torch.Tensor]]):
        self.view, self.keep = view, keep
        self.modules = find_experts(source_model)
        self._cut: tuple[tuple[str, int], dict[str, torch.Tensor]] | None = None

    def cut(self, module_name: str, e: int) -> dict[str, torch.Tensor]:
        """Expert e of `module_name` restricted to its kept dims: exactly `slice_expert` of the loaded module."""
        if self._cut is None or self._cut[0] != (module_name, e):
            stand_in = self.view.expert_params(module_name, self.modules[module_name], e)
            self._cut = ((module_name, e), slice_expert(stand_in, 0, self.keep[module_name][e]))
        return self._cut[1]

    def owner(self, key: str) -> tuple[str, str, list[int]] | None:
        """(experts module, parameter, experts stacked in this tensor) for a pruned routed-experts tensor."""
        module_name, _, param = key.rpartition(".")
        if module_name in self.keep:  # a uniform module keeps the stock class: [E, ...]
            return module_name, param, list(range(len(self.keep[module_name])))
        found = re.fullmatch(r"(.+)\.buckets\.(\d+)\.([^.]+)", key)
        if found and found.group(1) in self.keep:
            widths = [int(k.numel()) for k in self.keep[found.group(1)]]
            return found.group(1), found.group(3), width_buckets(widths)[int(found.group(2))][1]
        return None

    def pieces(self, key: str, expert: int | None = None, part: int = 0, parts: int = 1) -> Callable:
        """Pieces of pruned model tensor `key` (or of one expert's part of it, as a per-expert checkpoint holds)."""
        owner = self.owner(key)
        if owner is None:
            return lambda: iter([self.view.tensor(key)])
        module_name, param, experts = owner
        chosen = experts if expert is None else [expert]

        def gen():
            for e in chosen:
                t = self.cut(module_name, e)[param]
                yield t if parts == 1 else t.chunk(parts, dim=0)[part].contiguous()
        return gen

    def dtype(self, key: str) -> str:
        owner = self.owner(key)
        return self.view.dtype_of(f"{owner[0]}.{owner[1]}" if owner else key)


def bucket_shapes(module, keep: list[torch.Tensor]) -> dict[str, list[int]]:
    """{`buckets.{b}.{param}`: shape} of a ragged cut of (meta) experts module `module`: bucket b stacks the
    experts of the b-th smallest kept width (`width_buckets`), each param in the stock fused layout."""
    out = {}
    for b, (_, experts) in enumerate(width_buckets([int(k.numel()) for k in keep])):
        for param, t in slice_expert(module, experts[0], keep[experts[0]]).items():  # meta: shapes only
            out[f"buckets.{b}.{param}"] = [len(experts), *t.shape]
    return out


def _outputs(model, tensors, stock: bool, keep=None) -> tuple[list[Out], dict[str, str]]:
    """The output tensors (names, dtypes, shapes, pieces) of `model` (on meta: the output structure) and the
    safetensors metadata of the chosen format; `tensors` (`Pruned`, `Edited`) produces the values of its model
    keys. `keep`: a dims plan's kept dims, whose ragged experts are written as width buckets."""
    state = model.state_dict()
    outs, metadata = [], {"format": "pt"}
    if stock:  # what transformers' save_pretrained writes: its own layout, tied aliases dropped
        naming = Naming(model)
        saved = naming.saved_keys(model)
        saved.update({n: list(w.shape) for n, w in tied_head(model).items() if n not in saved})  # both names
        for key, shape in saved.items():
            target, place = naming.locate(key)
            if target not in state:
                raise ValueError(f"cannot place saved key {key} (model key {target}) in the edited model")
            outs.append(Out(key, tensors.dtype(target), shape, tensors.pieces(target, place.expert, place.part,
                                                                              place.parts)))
    else:  # fmoe's fused format: safetensors.save_model of the model (tied aliases: the first name kept)
        dropped, both = {}, tied_head(model)  # tied embeddings/head: both names written
        for names in tie_groups(model):
            kept = sorted(names)[0]
            dropped.update({n: kept for n in names if n != kept})
        skipped = {n for n in dropped if n not in both}
        ragged = [n for n, m in find_experts(model).items() if isinstance(m, RaggedExperts)] if keep else []
        for key, t in state.items():
            if key not in skipped and not any(key.startswith(f"{n}.") for n in ragged):
                outs.append(Out(key, tensors.dtype(key), list(t.shape), tensors.pieces(key)))
        for n in ragged:  # written as width buckets, whatever the layout of this RaggedExperts
            for key, shape in bucket_shapes(tensors.modules[n], keep[n]).items():
                outs.append(Out(f"{n}.{key}", tensors.dtype(f"{n}.{key}"), shape, tensors.pieces(f"{n}.{key}")))
        metadata = {**dropped, "format": "pt", FORMAT_FIELD: "fused"}
    return outs, metadata


def _write_safetensors(path: Path, outs: list[Out], metadata: dict[str, str]) -> None:
    """A safetensors file written as its tensors are produced: the header (offsets from the known shapes) first,
    then each tensor's bytes; largest item size first, as safetensors orders them, so every tensor is aligned."""
    header, offset = {"__metadata__": metadata}, 0
    for out in outs:
        header[out.name] = {"dtype": out.dtype, "shape": out.shape, "data_offsets": [offset, offset + out.nbytes]}
        offset += out.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for out in outs:
            written = 0
            for piece in out.pieces():
                data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()  # [bytes], no copy
                f.write(data)
                written += data.nbytes
            if written != out.nbytes:
                raise RuntimeError(f"{out.name}: produced {written} bytes, its header says {out.nbytes}")


def _write_shards(directory: Path, outs: list[Out], metadata: dict[str, str], max_shard_size: int,
                  total_parameters: int, by_name: bool = True) -> list[str]:
    """Shards of at most `max_shard_size` bytes (a larger tensor gets its own), an index when there are several.
    Inside a shard, tensors go largest item size first (so each is aligned), then by name (`by_name`) or in the
    order of `outs`."""
    shards: list[list[Out]] = [[]]
    for out in outs:
        if shards[-1] and sum(o.nbytes for o in shards[-1]) + out.nbytes > max_shard_size:
            shards.append([])
        shards[-1].append(out)
    names = [WEIGHTS_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for name, shard in zip(names, shards):
        position = {id(o): i for i, o in enumerate(shard)}
        shard.sort(key=lambda o: (-SAFETENSORS_DTYPES[o.dtype].itemsize, o.name if by_name else position[id(o)]))
        _write_safetensors(directory / name, shard, metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": sum(o.nbytes for o in outs)},
                 "weight_map": {o.name: name for name, shard in zip(names, shards) for o in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _is_within(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _check_destination(src: Path, dst: Path) -> None:
    if _is_within(dst, src) or _is_within(src, dst):
        raise ValueError(f"the output {dst} must lie outside the checkpoint {src} (and not contain it)")


def _shard_limit(source: Source, max_shard_size: int | str | None) -> int:
    """`max_shard_size` in bytes (default: the largest source shard)."""
    from transformers.utils.hub import convert_file_size_to_int

    if max_shard_size is not None:
        return convert_file_size_to_int(max_shard_size)
    return max((source.directory / f).stat().st_size for f in source.files)


def _write_checkpoint(source: Source, dst: Path, model, outs: list[Out], metadata: dict[str, str], stock: bool,
                      dtype: torch.dtype, limit: int, by_name: bool = True) -> Path:
    """Write the shards of `outs`, the config of (meta) `model` and the source's tokenizer files to `dst`,
    replacing it only once complete."""
    unique = sum(p.numel() for p in model.parameters())
    with atomic_directory(dst) as tmp:
        _write_shards(tmp, outs, metadata, limit, unique, by_name)
        source._close()
        _write_config(model, source.directory, tmp, stock, dtype)
        for pattern in _CARRIED:
            for path in source.directory.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
    return dst


def prune_checkpoint(src: str | Path, plan: PruningPlan, dst: str | Path,
                     max_shard_size: int | str | None = None) -> Path:
    """Write `plan` applied to the checkpoint in `src` to `dst`, as `fmoe.prune` + `fmoe.save_pretrained` would,
    without loading the model (see the module docstring for the memory bound). Shards hold at most
    `max_shard_size` bytes (default: the largest source shard); tokenizer files are copied along. `dst` is
    replaced only once complete; on any error it is left as it was."""
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    source, config, model, view = open_checkpoint(src)
    widths = {name: expert_widths(m) for name, m in find_experts(model).items()}
    check_plan_fits(plan, widths, checkpoint_fingerprint(view, model))
    pruned_model = meta_model(copy.deepcopy(config))
    apply_widths(pruned_model, plan.keep)  # the pruned model: shapes, layout, config fields (widths, width field)
    stock = is_stock_loadable(pruned_model)
    pruned = Pruned(view, model, plan.keep)
    outs, metadata = _outputs(pruned_model, pruned, stock, plan.keep)
    first = next(n for n, _ in pruned_model.named_parameters())  # save_pretrained records the first one's dtype
    return _write_checkpoint(source, dst, pruned_model, outs, metadata, stock, _TORCH_DTYPE[pruned.dtype(first)],
                             _shard_limit(source, max_shard_size))


# ---------------------------------------------------------------------------------------------- any plan


class Edited:
    """The edited model's tensors, produced one group of source tensors at a time: a decoder layer, or everything
    outside the decoder layers. The group is made resident in a fresh copy of the empty source model, the plan's
    edit runs on the copy, and the output tensors the group owns are now real (the rest stays on meta). Which
    group owns an output tensor is known before any value is read: the source module holding it (for a module the
    edit built, the nearest module above it that existed before) lies in that group. Output shards order tensors
    by item size, then as the edited state dict does, so a group's tensors come one after another; where a group
    also has tensors of another item size (written apart), only the requested tensor's module (its unit) is made
    resident, or the group if the edit needs more. One group's (or unit's) edited tensors are held at a time, and
    small ones still to be written when the next comes in (at most `SMALL` bytes each, `KEPT` in all); anything
    else is made resident again if needed."""
    SMALL, KEPT = 2**20, 4 * 2**20

    def __init__(self, view: ModelView, model, plan, edit: Callable, edited, origin: dict[int, str]):
        self.view, self.model, self.plan, self.edit = view, model, plan, edit
        prefix, layers = decoder_layers(model)
        self.layers = tuple(f"{prefix}.{i}" for i in range(len(layers)))
        self.state = {k: (t.dtype, t.shape) for k, t in edited.state_dict().items()}
        self.unit_of, self.group_of = {}, {}
        for key in self.state:
            path = key.rpartition(".")[0]
            while path and id(edited.get_submodule(path)) not in origin:
                path = path.rpartition(".")[0]
            unit = origin.get(id(edited.get_submodule(path)), "")
            self.unit_of[key] = unit
            self.group_of[key] = next((g for g in self.layers if unit == g or unit.startswith(g + ".")), "")
        self.uses: dict[str, int] = {}  # outputs still to write, per model key
        self.kept: dict[str, torch.Tensor] = {}
        self.current: dict[str, torch.Tensor] = {}
        self.loads = 0  # groups or units made resident
        self.error: Exception | None = None

    def dtype(self, key: str) -> str:
        return _SAFETENSORS_NAME[self.state[key][0]]

    def _run(self, prefix: str, exclude: tuple[str, ...], wanted: list[str]) -> dict[str, torch.Tensor] | None:
        """The `wanted` edited tensors, from the edit of a copy with the tensors under `prefix` resident (None: the
        edit failed, or did not give them all)."""
        work = copy.deepcopy(self.model)
        try:
            with resident(work, self.view, prefix, exclude=exclude):
                self.edit(work, self.plan)
                state = work.state_dict()
                if any(k not in state or state[k].is_meta or (state[k].dtype, state[k].shape) != self.state[k]
                       for k in wanted):
                    return None
                return {k: state[k].detach() for k in wanted}
        except (RuntimeError, ValueError, NotImplementedError, TypeError, IndexError) as err:
            self.error = err  # values read from the meta part (a unit: tried again with the whole group)
            return None
        finally:
            del work
            self.loads += 1

    def _load(self, key: str) -> dict[str, torch.Tensor]:
        unit, group = self.unit_of[key], self.group_of[key]
        size = self.state[key][0].itemsize
        if unit and any(g == group and self.uses.get(k) and self.state[k][0].itemsize != size
                        for k, g in self.group_of.items()):  # the group's other item sizes are written apart
            got = self._run(unit, (), [k for k, u in self.unit_of.items() if u == unit and self.uses.get(k)])
            if got is not None:
                return got
        wanted = [k for k, g in self.group_of.items() if g == group and self.uses.get(k)]
        self.error = None
        got = self._run(group, () if group else self.layers, wanted)
        if got is None:
            where = f"decoder layer {group}" if group else "the tensors outside the decoder layers"
            what = f"fails ({self.error})" if self.error else f"leaves {wanted[:2]}... without values"
            raise RuntimeError(f"{type(self.plan).__name__}: with only {where} resident, its edit {what}: it reads "
                               "tensors of other layers and cannot be applied out of core") from self.error
        return got

    def tensor(self, key: str) -> torch.Tensor:
        if key in self.kept:
            return self.kept[key]
        if key not in self.current:
            room = self.KEPT - sum(t.nbytes for t in self.kept.values())
            for k, t in self.current.items():  # small tensors still to write: kept rather than read again
                if t.nbytes <= min(self.SMALL, room):
                    self.kept[k] = t.clone()
                    room -= t.nbytes
            self.current = {}  # freed before the next unit comes in
            self.current = self._load(key)
        return self.current[key]

    def _done(self, key: str) -> None:
        self.uses[key] -= 1
        if not self.uses[key]:
            self.kept.pop(key, None)
            self.current.pop(key, None)

    def pieces(self, key: str, expert: int | None = None, part: int = 0, parts: int = 1) -> Callable:
        """Pieces of edited model tensor `key` (or of one expert's part of it, as a per-expert checkpoint holds)."""
        self.uses[key] = self.uses.get(key, 0) + 1

        def gen():
            t = self.tensor(key)
            if expert is not None:
                t = t[expert]
            yield t if parts == 1 else t.chunk(parts, dim=0)[part]
            self._done(key)
        return gen


def _edit_of(plan) -> Callable:
    from .registry import METHODS

    for entry in METHODS.values():
        if isinstance(plan, entry.plan_type):
            return entry.edit
    raise TypeError(f"not an fmoe plan: {type(plan).__name__}")


def edit_checkpoint(src: str | Path, plan, dst: str | Path, max_shard_size: int | str | None = None) -> Path:
    """Write any fmoe plan applied to the checkpoint in `src` to `dst`, as `fmoe.apply_plan` +
    `fmoe.save_pretrained` would (same tensors bit for bit, same config), without loading the model. A dims plan
    (`PruningPlan`) goes to `prune_checkpoint`; any other plan's edit runs once on the empty (meta) model for the
    output's structure and config, then once per group of source tensors (a decoder layer, or the rest) made
    resident, for that group's values (`Edited`): peak memory stays near twice the largest group. Shards hold at
    most `max_shard_size` bytes (default: the largest source shard); tokenizer files are copied along. `dst` is
    replaced only once complete; on any error it is left as it was."""
    if isinstance(plan, PruningPlan):
        return prune_checkpoint(src, plan, dst, max_shard_size)
    edit = _edit_of(plan)
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst)
    source = Source(src)
    model = empty_model(src)
    view = ModelView(source, model)  # refuses a checkpoint missing tensors its config implies
    expected = getattr(plan, "fingerprint", None)
    if expected is not None and expected != (found := checkpoint_fingerprint(view, model)):
        raise ValueError(f"{type(plan).__name__} was made for another model (fingerprint {expected} != {found} of "
                         f"{src}): a plan applies to the checkpoint of the model it was planned on")
    edited = copy.deepcopy(model)
    before = list(edited.modules())  # kept alive while ids are compared
    origin = {id(m): name for name, m in edited.named_modules()}
    edit(edited, plan)  # on meta: the output's structure and config; a plan that does not fit is refused here
    stock = is_stock_loadable(edited)
    tensors = Edited(view, model, plan, edit, edited, origin)
    del before
    outs, metadata = _outputs(edited, tensors, stock)
    dtype = next(edited.parameters()).dtype  # what save_pretrained records
    return _write_checkpoint(source, dst, edited, outs, metadata, stock, dtype, _shard_limit(source, max_shard_size),
                             by_name=False)  # a group's tensors together


_TORCH_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _write_config(model, src: Path, directory: Path, stock: bool, dtype: torch.dtype) -> None:
    """config.json as `fmoe.save_pretrained` writes it (and generation_config.json, as transformers does)."""
    config = model.config
    config.dtype = dtype
    setattr(config, FORMAT_FIELD, "stock" if stock else "fused")
    config.architectures = [("" if stock else SERVED_PREFIX) + type(model).__name__]
    config.save_pretrained(directory)
    if stock and model.can_generate():
        generation = GenerationConfig.from_pretrained(src) if (src / "generation_config.json").is_file() \
            else GenerationConfig.from_model_config(config)
        generation.save_pretrained(directory)


