"""Checkpoints of pruned models: safetensors only, written atomically, read one copy deep.

A model whose routed widths the stock config can describe (uniform plan, family whose width field is the routed
width only) is written with `save_pretrained` and loads with stock `AutoModelForCausalLM.from_pretrained`.
Anything else (ragged widths, or DeepSeek/GLM-4-MoE/ERNIE whose shared experts are sized from the routed width
field) records its widths in `config.fmoe_expert_widths` and its fused state dict in `model.safetensors` (or in
shards listed by `model.safetensors.index.json`). `fmoe.from_pretrained` builds that model on the meta device,
already cut to those widths (`empty_model`), and reads each tensor from disk straight into its final place: host
memory peaks near the weight bytes, not at a random-initialised dense model plus the file. `load_distributed`
reads a checkpoint once per process group: rank 0 loads it, the other ranks build the empty model and receive the
weights by broadcast.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..io import atomic_directory
from .compat import width_field
from .experts import RaggedExperts, expert_widths, find_experts, on_meta
from .hooks import ensure_aligned_implementation
from .structure import (COMPRESSED_FIELD, DROPPED_MOE_FIELD, EXPERT_COUNTS_FIELD, WIDTHS_FIELD, apply_widths,
                        rebuild_compressed, rebuild_dropped_moe, rebuild_expert_counts)

FORMAT_FIELD = "fmoe_format"  # "stock" | "fused"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # {"weight_map": {tensor name: shard file}} of a sharded checkpoint
TIED_FILE = "model-tied.safetensors"  # tied embeddings/head a sharded save left out, for engines that do not tie
SERVED_PREFIX = "Fmoe"  # architecture name prefix of fused exports (served by plugins/vllm/fmoe_vllm.py)


# config fields of structures no stock class builds (fmoe.from_pretrained rebuilds them in `empty_model`)
STRUCTURE_FIELDS = (DROPPED_MOE_FIELD, EXPERT_COUNTS_FIELD, COMPRESSED_FIELD)


def is_stock_loadable(model: nn.Module) -> bool:
    """True when the stock config describes the model: uniform widths in a rewritable field, the same expert count
    in every layer, every MoE sublayer present, no compressed experts."""
    field = width_field(model.config.model_type)
    if field is None or any(getattr(model.config, f, None) for f in STRUCTURE_FIELDS):
        return False
    for module in find_experts(model).values():
        if isinstance(module, RaggedExperts) or set(expert_widths(module)) != {getattr(model.config, field)}:
            return False
    return True


def save_pretrained(model: PreTrainedModel, directory: str | Path, tokenizer=None) -> Path:
    """Write `model` (and optionally its tokenizer) to `directory`, replacing it only once complete.

    A stock-loadable model is written by transformers. Any other
    model is written in fmoe's fused layout under the architecture name "Fmoe" + the stock one, which stock
    engines refuse by name and fmoe's vLLM plugin (plugins/vllm) serves. Tied embeddings and output head are
    written under both names (vLLM's OLMoE ignores `tie_word_embeddings` and would serve an empty head)."""
    directory = Path(directory)
    stock = is_stock_loadable(model)
    written = {FORMAT_FIELD: "stock" if stock else "fused", "dtype": next(model.parameters()).dtype}
    if not stock:
        written["architectures"] = [SERVED_PREFIX + type(model).__name__]
    with atomic_directory(directory) as tmp, _config_fields(model.config, written):
        if stock:
            model.save_pretrained(tmp)
        else:
            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", FORMAT_FIELD: "fused"})
        _write_tied(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if any(tmp.glob("*.bin")) or any(tmp.glob("*.pt")):
            raise RuntimeError("refusing to write pickle weights")
    return directory


def tied_head(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: weight} of the input embeddings and the output head when they are tied (else empty): fmoe writes both
    names, because savers keep one name of a shared tensor and engines such as vLLM's OLMoE ignore
    `tie_word_embeddings`, which would leave the other uninitialised."""
    get_head, get_embed = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    if get_head is None or get_embed is None or not getattr(model.config, "tie_word_embeddings", False):
        return {}
    head, embed = get_head(), get_embed()
    if head is None or embed is None or head.weight is not embed.weight:
        return {}
    return {next(n for n, m in model.named_modules() if m is module) + ".weight": module.weight
            for module in (embed, head)}


def _write_tied(model: PreTrainedModel, directory: Path) -> None:
    """Add to a written checkpoint whichever name of the tied embeddings/head the saver left out."""
    names = tied_head(model)
    if not names:
        return
    single = directory / WEIGHTS_FILE
    if single.is_file():
        tensors = load_file(single)
        with safe_open(single, "pt") as f:
            metadata = f.metadata()
        missing = {n: w.detach().contiguous() for n, w in names.items() if n not in tensors}
        if missing:
            save_file({**tensors, **missing}, single, metadata=metadata)
        return
    index = json.loads((directory / INDEX_FILE).read_text())
    missing = {n: w.detach().contiguous() for n, w in names.items() if n not in index["weight_map"]}
    if missing:
        save_file(missing, directory / TIED_FILE, metadata={"format": "pt"})
        index["weight_map"].update({n: TIED_FILE for n in missing})
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


@contextmanager
def _config_fields(config, fields: dict) -> Iterator[None]:
    """Set config fields for the length of a save; the caller's config object comes back as it was (transformers'
    own save_pretrained writes fields such as `architectures` into it too)."""
    before = dict(config.__dict__)  # transformers assigns fields when saving; it does not mutate their values
    for k, v in fields.items():
        setattr(config, k, v)
    try:
        yield
    finally:
        config.__dict__.clear()
        config.__dict__.update(before)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Errors while reading a weights file name the file and the cause."""
    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"cannot read {path}: {err} (the file is truncated or corrupt; save it again)") from err




def from_pretrained(directory: str | Path, dtype: torch.dtype | str = "auto", **kwargs) -> PreTrainedModel:
    """Load any fmoe checkpoint (stock or fused layout) or any stock HF MoE checkpoint."""
    directory = Path(directory)
    info = _config_json(directory)
    if info.get(FORMAT_FIELD) != "fused":
        single = directory / WEIGHTS_FILE
        with _reading(single if single.is_file() else directory):  # a sharded checkpoint: its directory
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
        if info.get(FORMAT_FIELD) == "stock":
            ensure_aligned_implementation(model)  # a uniform width grouped_mm cannot run gets batched_mm
        return model
    model = empty_model(directory, dtype, **kwargs)
    load_weights(model, directory)
    return model.eval()


def _config_json(directory: Path) -> dict:
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a model directory")
    return json.loads((directory / "config.json").read_text())


def _resolve_dtype(config: PretrainedConfig, dtype: torch.dtype | str) -> torch.dtype:
    """"auto" is the dtype the config records (float32 when it records none), as stock loading does."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def empty_model(source: str | Path | PretrainedConfig, dtype: torch.dtype | str = "auto", **kwargs) -> PreTrainedModel:
    """The model a checkpoint directory (or config) describes, cut to its recorded expert widths, with every
    parameter and persistent buffer on the meta device (no memory, no initialisation) and non-persistent buffers
    (rotary `inv_freq`) computed on the CPU. Fill it with `load_weights` or `broadcast_weights`."""
    if isinstance(source, PretrainedConfig):
        config, where = source, "config"
    else:
        _config_json(Path(source))
        config, where = AutoConfig.from_pretrained(source), Path(source) / "config.json"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(config, dtype), **kwargs)
    _init_non_persistent_buffers(model)
    return rebuild(model, config, where)


def rebuild(model: nn.Module, config: PretrainedConfig, where: str = "config") -> nn.Module:
    """Cut a model built from `config` (on meta, by the stock class) to the structure fmoe's config fields record:
    MoE sublayers removed, experts dropped, widths, compressed experts, in the order they were applied."""
    rebuild_dropped_moe(model, config)  # MoE sublayers a layer drop removed (before widths: their experts are gone)
    rebuild_expert_counts(model, config)  # experts dropped unevenly: before the widths, which list kept experts
    widths = getattr(config, WIDTHS_FIELD, None) or {}  # absent for an unpruned model
    if widths:
        modules = find_experts(model)
        unknown = sorted(set(widths) - set(modules))
        wrong = [n for n, ws in widths.items() if n in modules and (len(ws) != len(expert_widths(modules[n]))
                 or not all(0 < w <= full for w, full in zip(ws, expert_widths(modules[n]))))]
        if unknown or wrong:
            raise ValueError(f"{where}: {WIDTHS_FIELD} names experts modules the model does not "
                             f"have {unknown[:3]}, or widths that do not fit {wrong[:3]}; the model's modules are "
                             f"{sorted(modules)[:3]}...")
        apply_widths(model, {name: [torch.arange(w) for w in ws] for name, ws in widths.items()})
    else:
        ensure_aligned_implementation(model)
    rebuild_compressed(model, config)
    return model


def _init_non_persistent_buffers(model: PreTrainedModel) -> None:
    """Meta construction leaves non-persistent buffers (rotary `inv_freq`, never saved) without values; recompute
    them on the CPU with the model's own `_init_weights`, as transformers' loader does. They start as NaN, so one
    that `_init_weights` does not fill is an error, not a silently wrong buffer."""
    for name, module in model.named_modules():
        owned = [b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None]
        if not owned:
            continue
        for b in owned:
            meta = module._buffers[b]
            module._buffers[b] = (torch.full_like(meta, float("nan"), device="cpu") if meta.is_floating_point()
                                  else torch.zeros_like(meta, device="cpu"))
        model._init_weights(module)
        unset = [b for b in owned if module._buffers[b].is_floating_point() and module._buffers[b].isnan().any()]
        if unset:
            raise RuntimeError(f"{type(model).__name__}._init_weights does not compute the buffers {unset} of "
                               f"{name or 'the model'} ({type(module).__name__}): cannot build it empty")


# safetensors' header: u64 little-endian length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then data
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _corrupt(path: Path, cause: str) -> ValueError:
    return ValueError(f"cannot read {path}: {cause} (the file is truncated or corrupt; save it again)")


def read_header(path: Path) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """({name: (dtype, shape, start, end)}, offset of the data) of a safetensors file, checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, "no header")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            raise _corrupt(path, f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path, f"unreadable header ({err})") from err
    base, tensors, end = 8 + length, {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as err:
            raise _corrupt(path, f"tensor {name!r} has a malformed entry {entry!r}") from err
        numel = 1
        for n in shape:
            numel *= n
        if not 0 <= start <= stop or stop - start != numel * dtype.itemsize:
            raise _corrupt(path, f"tensor {name!r} has offsets {start}..{stop} for {shape} {entry['dtype']}")
        tensors[name] = (dtype, shape, start, stop)
        end = max(end, stop)
    if base + end != size:
        raise _corrupt(path, f"its header describes {base + end} bytes, the file has {size}")
    return tensors, base


def read_tensor(f, path: Path, base: int, entry, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor read into fresh CPU memory (or into `out`, a contiguous CPU tensor of its dtype and size) with
    plain reads: unlike a memory map, the file's pages never count in the process's resident memory, so the
    tensor is the only copy."""
    dtype, shape, start, stop = entry
    tensor = torch.empty(shape, dtype=dtype) if out is None else out
    if tensor.dtype != dtype or tensor.numel() * dtype.itemsize != stop - start or not tensor.is_contiguous():
        raise ValueError(f"cannot read {path} ({list(shape)} {dtype}) into a {list(tensor.shape)} {tensor.dtype} tensor")
    if stop == start:
        return tensor
    view, got = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), 0
    f.seek(base + start)
    while got < stop - start:
        n = f.readinto(view[got:])
        if not n:
            raise _corrupt(path, "it ended inside a tensor")
        got += n
    return tensor


def weight_files(directory: Path) -> dict[Path, set[str] | None]:
    """{weights file: the tensor names the index assigns to it (None: a single file, all of its tensors)}."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map (a sharded checkpoint lists {{tensor name: file}} there)")
        files: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(directory / file, set()).add(name)
        absent = sorted(f.name for f in files if not f.is_file())
        if absent:
            raise FileNotFoundError(f"{index} names weight files that are not in {directory} (it lists shards that "
                                    f"are missing): {absent[:3]}")
        return files
    if not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors "
                                "checkpoints are read; pickle .bin weights are not)")
    return {directory / WEIGHTS_FILE: None}


def slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """{state-dict name: every (module, attribute, is_parameter) holding that same tensor}: tied weights (an
    lm_head sharing the embeddings) are one entry under each of their names, so loading either fills both."""
    sites: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    names: dict[str, int] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        tensors = [(a, t, True) for a, t in module._parameters.items()]
        tensors += [(a, t, False) for a, t in module._buffers.items() if a not in module._non_persistent_buffers_set]
        for attr, tensor, is_param in tensors:
            if tensor is None:
                continue
            group = sites.setdefault(id(tensor), [])
            if not any(m is module and a == attr for m, a, _ in group):
                group.append((module, attr, is_param))
            names[f"{prefix}.{attr}" if prefix else attr] = id(tensor)
    return {name: sites[i] for name, i in names.items()}


@torch.no_grad()
def load_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Read a checkpoint's tensors (single file or shards) one by one into `model`, replacing its meta (or
    existing) parameters and persistent buffers in place: the model's dtype and shapes are kept, tied weights stay
    tied. Every file tensor must fill a model tensor of its shape and every model tensor must be filled."""
    directory = Path(directory)
    sites_of, filled, unexpected = slots(model), set(), []
    for path, expected in weight_files(directory).items():
        tensors, base = read_header(path)
        if expected is not None and not expected <= set(tensors):
            raise _corrupt(path, f"{INDEX_FILE} places {sorted(expected - set(tensors))[:3]} in it, it does not hold them")
        with open(path, "rb", buffering=0) as f:
            for name in sorted(tensors, key=lambda n: tensors[n][2]):  # file order: sequential reads
                if expected is not None and name not in expected:
                    continue  # the index is the checkpoint's table of contents
                sites = sites_of.get(name)
                if sites is None:
                    unexpected.append(name)
                    continue
                module, attr, is_param = sites[0]
                old = getattr(module, attr)
                if list(old.shape) != tensors[name][1]:
                    raise ValueError(f"{path}: {name} has shape {tensors[name][1]}, the model expects "
                                     f"{list(old.shape)}; the file does not match the model")
                value = read_tensor(f, path, base, tensors[name]).to(old.dtype)
                if is_param:
                    value = nn.Parameter(value, requires_grad=old.requires_grad)
                for module, attr, is_param in sites:
                    (module._parameters if is_param else module._buffers)[attr] = value
                filled.add(id(sites))  # tied names share one list of sites
    missing = [name for name, sites in sites_of.items() if id(sites) not in filled]
    if missing or unexpected:
        where = directory / (INDEX_FILE if (directory / INDEX_FILE).is_file() else WEIGHTS_FILE)
        raise ValueError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def broadcast_weights(model: nn.Module) -> nn.Module:
    """Give every rank of the default process group rank 0's weights (a collective: every rank calls it).

    Rank 0 holds the loaded model; a rank whose model is on meta (`empty_model`) receives each tensor into fresh
    host memory that becomes its parameter (`set_model_state_dict(..., broadcast_from_rank0=True)` assigns them;
    `cpu_offload` brings what NCCL receives on the GPU back to the host tensor by tensor), so no rank but 0 ever
    reads the checkpoint or holds a second copy. A rank with real weights has them overwritten in place."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    rank = dist.get_rank()
    if rank == 0 and on_meta(model):
        raise ValueError("broadcast_weights sends rank 0's weights, but rank 0's model is empty (meta)")
    state = model.state_dict() if rank == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                cpu_offload=True))
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # assigned one by one, tied names got separate tensors: share them again
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"rank {rank}: rank 0's state dict did not fill {left[:5]}")
    return model


def load_distributed(directory: str | Path, dtype: torch.dtype | str = "auto", **kwargs) -> PreTrainedModel:
    """`from_pretrained` read once for the whole default process group: rank 0 reads the checkpoint, every other
    rank builds `empty_model` and receives the weights (`broadcast_weights`). A collective when a process group
    with more than one rank is initialised; a plain `from_pretrained` otherwise."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return from_pretrained(directory, dtype, **kwargs)
    model = from_pretrained(directory, dtype, **kwargs) if dist.get_rank() == 0 else empty_model(directory, dtype, **kwargs)
    return broadcast_weights(model).eval()
