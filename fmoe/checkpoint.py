"""Checkpoints of pruned models: safetensors only, written atomically.

A model whose routed widths the stock config can describe (uniform plan, family whose width field is the routed
width only) is written with `save_pretrained` and loads with stock `AutoModelForCausalLM.from_pretrained`.
Anything else (ragged widths, or DeepSeek/GLM-4-MoE/ERNIE whose shared experts are sized from the routed width
field) records its widths in `config.fmoe_expert_widths` and its fused state dict in `model.safetensors`;
`fmoe.from_pretrained` builds the stock model, cuts it to those widths and loads the weights (no remote code).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .compat import ensure_aligned_implementation, is_stock_loadable
from .experts import expert_widths, find_experts
from .io import atomic_directory
from .prune import WIDTHS_FIELD, apply_widths

FORMAT_FIELD = "fmoe_format"  # "stock" | "fused"
_WEIGHTS = "model.safetensors"


def save_pretrained(model: PreTrainedModel, directory: str | Path, tokenizer=None) -> Path:
    """Write `model` (and optionally its tokenizer) to `directory`, replacing it only once complete."""
    directory = Path(directory)
    stock = is_stock_loadable(model)
    written = {FORMAT_FIELD: "stock" if stock else "fused", "dtype": next(model.parameters()).dtype}
    with atomic_directory(directory) as tmp, _config_fields(model.config, written):
        if stock:
            model.save_pretrained(tmp)
        else:
            model.config.save_pretrained(tmp)
            save_model(model, str(tmp / _WEIGHTS), metadata={"format": "pt", FORMAT_FIELD: "fused"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if any(tmp.glob("*.bin")) or any(tmp.glob("*.pt")):
            raise RuntimeError("refusing to write pickle weights")
    return directory


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
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a model directory")
    info = json.loads((directory / "config.json").read_text())
    if info.get(FORMAT_FIELD) != "fused":
        single = directory / _WEIGHTS
        with _reading(single if single.is_file() else directory):  # a sharded checkpoint: its directory
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
        if info.get(FORMAT_FIELD) == "stock":
            ensure_aligned_implementation(model)  # a uniform width grouped_mm cannot run gets batched_mm
        return model
    config = AutoConfig.from_pretrained(directory)
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    widths = info.get(WIDTHS_FIELD) or {}  # absent for an unpruned model saved in this format
    if widths:
        modules = find_experts(model)
        unknown = sorted(set(widths) - set(modules))
        wrong = [n for n, ws in widths.items() if n in modules and (len(ws) != len(expert_widths(modules[n]))
                 or not all(0 < w <= full for w, full in zip(ws, expert_widths(modules[n]))))]
        if unknown or wrong:
            raise ValueError(f"{directory / 'config.json'}: {WIDTHS_FIELD} names experts modules the model does not "
                             f"have {unknown[:3]}, or widths that do not fit {wrong[:3]}; the model's modules are "
                             f"{sorted(modules)[:3]}...")
        apply_widths(model, {name: [torch.arange(w) for w in ws] for name, ws in widths.items()})
    with _reading(directory / _WEIGHTS):
        missing, unexpected = load_model(model, str(directory / _WEIGHTS), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"{directory / _WEIGHTS} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()
