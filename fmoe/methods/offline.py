"""Out-of-core pruning and data-free scoring, straight from a safetensors checkpoint directory.

`prune_checkpoint(src, plan, dst)` writes what `fmoe.prune(model, plan)` + `fmoe.save_pretrained(model, dst)` would
write (same tensor names and values, bit for bit; the config and, for the stock format, the generation config) but
never holds the model: the model is built on the meta device (no storage) for its names, shapes and layout flags,
and tensors are read one at a time with plain reads (fmoe.model.view.Source), sliced expert by expert and streamed into output
shards whose headers are computed up front. `score_checkpoint(src, "magnitude" | "random")` gives the scores
`fmoe.score` gives on the loaded model, with the same fingerprint, so the plans made from them pass `fmoe.prune`.

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

import argparse
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
                                is_stock_loadable, tied_head)
from ..model.experts import RaggedExperts, expert_widths, find_experts, slice_expert, width_buckets
from ..model.structure import apply_widths
from ..model.view import ModelView, Naming, checkpoint_fingerprint, meta_model, open_checkpoint, tie_groups
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


def _outputs(view: ModelView, source_model, pruned_model, keep, stock: bool) -> tuple[list[Out], dict[str, str]]:
    """The output tensors (names, dtypes, shapes, pieces) and the safetensors metadata of the chosen format."""
    pruned = Pruned(view, source_model, keep)
    state = pruned_model.state_dict()
    outs, metadata = [], {"format": "pt"}
    if stock:  # what transformers' save_pretrained writes: its own layout, tied aliases dropped
        naming = Naming(pruned_model)
        saved = naming.saved_keys(pruned_model)
        saved.update({n: list(w.shape) for n, w in tied_head(pruned_model).items() if n not in saved})  # both names
        for key, shape in saved.items():
            target, place = naming.locate(key)
            if target not in state:
                raise ValueError(f"cannot place saved key {key} (model key {target}) in the pruned model")
            outs.append(Out(key, pruned.dtype(target), shape, pruned.pieces(target, place.expert, place.part,
                                                                             place.parts)))
    else:  # fmoe's fused format: safetensors.save_model of the model (tied aliases: the first name kept)
        dropped, both = {}, tied_head(pruned_model)  # tied embeddings/head: both names written
        for names in tie_groups(pruned_model):
            kept = sorted(names)[0]
            dropped.update({n: kept for n in names if n != kept})
        skipped = {n for n in dropped if n not in both}
        ragged = [n for n, m in find_experts(pruned_model).items() if isinstance(m, RaggedExperts)]
        for key, t in state.items():
            if key not in skipped and not any(key.startswith(f"{n}.") for n in ragged):
                outs.append(Out(key, pruned.dtype(key), list(t.shape), pruned.pieces(key)))
        for n in ragged:  # written as width buckets, whatever the layout of this RaggedExperts
            for key, shape in bucket_shapes(pruned.modules[n], keep[n]).items():
                outs.append(Out(f"{n}.{key}", pruned.dtype(f"{n}.{key}"), shape, pruned.pieces(f"{n}.{key}")))
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
                  total_parameters: int) -> list[str]:
    """Shards of at most `max_shard_size` bytes (a larger tensor gets its own), an index when there are several."""
    shards: list[list[Out]] = [[]]
    for out in outs:
        if shards[-1] and sum(o.nbytes for o in shards[-1]) + out.nbytes > max_shard_size:
            shards.append([])
        shards[-1].append(out)
    names = [WEIGHTS_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for name, shard in zip(names, shards):
        shard.sort(key=lambda o: (-SAFETENSORS_DTYPES[o.dtype].itemsize, o.name))
        _write_safetensors(directory / name, shard, metadata)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": sum(o.nbytes for o in outs)},
                 "weight_map": {o.name: name for name, shard in zip(names, shards) for o in shard}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def _is_within(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def prune_checkpoint(src: str | Path, plan: PruningPlan, dst: str | Path,
                     max_shard_size: int | str | None = None) -> Path:
    """Write `plan` applied to the checkpoint in `src` to `dst`, as `fmoe.prune` + `fmoe.save_pretrained` would,
    without loading the model (see the module docstring for the memory bound). Shards hold at most
    `max_shard_size` bytes (default: the largest source shard); tokenizer files are copied along. `dst` is
    replaced only once complete; on any error it is left as it was."""
    from transformers.utils.hub import convert_file_size_to_int

    src, dst = Path(src), Path(dst)
    if _is_within(dst, src) or _is_within(src, dst):
        raise ValueError(f"the output {dst} must lie outside the checkpoint {src} (and not contain it)")
    source, config, model, view = open_checkpoint(src)
    widths = {name: expert_widths(m) for name, m in find_experts(model).items()}
    check_plan_fits(plan, widths, checkpoint_fingerprint(view, model))
    pruned_model = meta_model(copy.deepcopy(config))
    apply_widths(pruned_model, plan.keep)  # the pruned model: shapes, layout, config fields (widths, width field)
    stock = is_stock_loadable(pruned_model)
    outs, metadata = _outputs(view, model, pruned_model, plan.keep, stock)
    limit = convert_file_size_to_int(max_shard_size) if max_shard_size is not None else \
        max((source.directory / f).stat().st_size for f in source.files)
    first = next(n for n, _ in pruned_model.named_parameters())  # save_pretrained records the first one's dtype
    dtype = _TORCH_DTYPE[Pruned(view, model, plan.keep).dtype(first)]
    unique = sum(p.numel() for p in pruned_model.parameters())
    with atomic_directory(dst) as tmp:
        _write_shards(tmp, outs, metadata, limit, unique)
        source._close()
        _write_config(pruned_model, source.directory, tmp, stock, dtype)
        for pattern in _CARRIED:
            for path in source.directory.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
    return dst


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


# ---------------------------------------------------------------------------------------------------------- CLI


def cli(argv: list[str] | None = None) -> None:
    """fmoe prune-checkpoint SRC --plan PLAN --out DST [--max-shard-size 5GB]"""
    parser = argparse.ArgumentParser(prog="fmoe prune-checkpoint",
                                     description="apply a pruning plan to a safetensors checkpoint without loading it")
    parser.add_argument("src", help="model directory (config.json + model.safetensors or a sharded index)")
    parser.add_argument("--plan", required=True, help="plan JSON (PruningPlan.save)")
    parser.add_argument("--out", required=True, help="output directory (replaced once complete)")
    parser.add_argument("--max-shard-size", default=None, help="e.g. 5GB (default: the largest source shard)")
    args = parser.parse_args(argv)
    out = prune_checkpoint(args.src, PruningPlan.load(args.plan), args.out, args.max_shard_size)
    print(f"wrote {out}")
