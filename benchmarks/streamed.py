"""Layer-streamed calibration (`fmoe.calibrate(directory, ..., streamed=True)`) of real MoE shapes: peak memory,
time per layer, streamed vs in-memory, and estimates for models far bigger than the machine.

    # CPU, the default (docs/quality/streamed): 2 of Qwen3-30B-A3B's 48 layers (3.5 GB of bf16 weights), 4 x 256
    # tokens, the fastest of 2 runs each; ~2 min on 2 idle cores (5x that on a machine busy with other work)
    python benchmarks/streamed.py
    # CPU, quick (the toy shape, ~1 min)
    python benchmarks/streamed.py --preset toy --layers 4 --sequences 2 --seq 128 --repeats 1 --out /tmp/streamed
    # GPU machine (64 GB disk): 4 layers of Qwen3-30B-A3B; DeepSeek-V3's 3 dense layers and its first MoE layer
    # (27 GB of bf16 weights, 22.5 GB of them in the MoE layer)
    python benchmarks/streamed.py --device cuda --layers 4 --sequences 8 --seq 2048 --repeats 2 \\
        --out /tmp/streamed-qwen3
    python benchmarks/streamed.py --device cuda --preset deepseek-v3 --layers 4 --sequences 8 --seq 2048 \\
        --out /tmp/streamed-dsv3

1. A random-weight checkpoint of the preset (benchmarks/presets.py) cut to `--layers` decoder layers, written
   tensor by tensor without holding the model: names, shapes and dtypes are what `save_pretrained` writes for the
   model built on the meta device (transformers' reverted conversion: per-expert keys for these families), values
   normal with std `--std` (routers too, so routing is non-trivial; norms 1, biases 0), one safetensors shard for
   the embeddings, one per decoder layer, one for the final norm and output head, model.safetensors.index.json and
   config.json: `fmoe.from_pretrained` loads it. A small twin (one routed layer, 16 experts, vocabulary 512) is
   written too, to warm processes up on.
2. Each measurement runs in a fresh process (glibc's mmap threshold pinned to 64 KiB, so freed tensors go back to
   the OS and the resident set is what is in use), after a warm-up on 1 x 8 tokens: the forward-only sweep
   (criterion "activation") and the Fisher sweep, streamed, one process each; then, when its weights fit, the
   checkpoint loaded in memory once (`fmoe.from_pretrained`, not timed) and `fmoe.calibrate` with each criterion.
   Peak host memory is the resident set's high-water mark (VmHWM after a reset through /proc/self/clear_refs)
   above the resident set before the call; on a GPU also torch.cuda.max_memory_allocated above the start (the
   boundaries stay on the host: the ratio below then uses host + GPU). Streamed reads go through the page cache,
   which the checkpoint just written fills; a cold disk adds layer bytes / its bandwidth per layer and sweep.
   Times are the fastest of `--repeats` runs; the 1-minute load average before and after is reported (other work
   on a shared machine slows every figure).
3. Figures: layer bytes (the largest decoder layer's weights), the weights outside the layers (embeddings, final
   norm, head: resident for the capture pass and Fisher's head), boundary bytes held ((layers + 1) x tokens x
   hidden x dtype bytes, + two gradient slots for Fisher: the backward sweep reads one while it writes the other);
   peak ÷ (layer + boundary bytes) (goal <= 1.5) and which resident block the peak was reached in; time per layer
   (read + run + free: the time the layer is resident, summed over the sweeps, timed inside the run by wrapping
   `Streamed.resident`) per 1M calibration tokens, and the share spent reading it; streamed ÷ in-memory time
   (goals: forward-only <= 1.3, Fisher <= 2.5); the agreement of streamed and in-memory scores.
4. Estimates for whole models (DeepSeek-V3, Kimi-K2, Qwen3-235B-A22B, Qwen3-30B-A3B) on this device, per 1M
   tokens at the measured sequence length: c x (sum over the target's layers of active FLOPs per token) + F x (the
   target's head FLOPs / the measured one's), c = the measured layers' resident time minus their reads, per active
   FLOP, F = the measured time outside the layers; plus, per chunk of sequences (every chunk reads every layer,
   Fisher twice), the target's weight bytes at the measured read rate. Active FLOPs per token: 2 x (attention,
   router, shared and dense-MLP parameters + routed parameters x top-k / experts) + attention scores and values.
   An estimate: time is taken as proportional to active FLOPs across shapes (matmul efficiency differs between
   architectures), the page cache as warm.

Writes results.json and results.md to `out`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli
from transformers import PretrainedConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from presets import PRESETS  # noqa: E402
from speed_memory import Peak, device_name, preset_config, status_bytes, write_results  # noqa: E402

import fmoe  # noqa: E402
from fmoe.io import atomic_directory  # noqa: E402
from fmoe.model.checkpoint import INDEX_FILE, empty_model  # noqa: E402

MB = 2**20
GOALS = {"peak_ratio": 1.5, "activation": 1.3, "fisher": 2.5}  # peak / (layer + boundary); streamed / in-memory
TARGETS = ("deepseek-v3", "kimi-k2", "qwen3-235b-a22b", "qwen3-30b-a3b")  # the whole models estimated
CRITERIA = ("activation", "fisher")  # forward-only sweep, forward + backward sweep
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the checkpoint

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def saved_tensors(config: PretrainedConfig, dtype: torch.dtype) -> dict[str, tuple[list[int], torch.dtype]]:
    """{key: (shape, dtype)} that `save_pretrained` writes for the model of `config`, from the model built on the
    meta device (tied aliases dropped, the family's saved layout: per-expert keys where transformers un-fuses)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model = empty_model(config, dtype)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {k: (list(v.shape), v.dtype) for k, v in revert_weight_conversion(model, state).items()}


def shard_names(keys) -> dict[str, list[str]]:
    """{shard file: its keys}: the embeddings, each decoder layer, then everything else (final norm, head)."""
    groups: dict[object, list[str]] = {}
    for key in keys:
        found = _LAYER.match(key)
        group = int(found.group(1)) if found else ("embed" if "embed_tokens" in key else "head")
        groups.setdefault(group, []).append(key)
    order = (["embed"] if "embed" in groups else []) + sorted(g for g in groups if isinstance(g, int)) + ["head"]
    order = [g for g in order if g in groups]
    return {f"model-{i + 1:05d}-of-{len(order):05d}.safetensors": groups[g] for i, g in enumerate(order)}


def random_tensor(key: str, shape: list[int], dtype: torch.dtype, gen: torch.Generator, std: float) -> torch.Tensor:
    if key.endswith("bias"):  # e_score_correction_bias, projection biases
        return torch.zeros(shape, dtype=dtype)
    if "norm" in key and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=gen)


def write_safetensors(path: Path, entries: dict[str, tuple[list[int], torch.dtype]], fill) -> int:
    """A safetensors file of `entries` {key: (shape, dtype)}, each tensor made by `fill(key, shape, dtype)` and
    written before the next is made (one tensor in memory). Returns the data bytes."""
    header, offset = {}, 0
    for key, (shape, dtype) in entries.items():
        n = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, (shape, dtype) in entries.items():
            tensor = fill(key, shape, dtype).contiguous()
            if tensor.numel():
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            del tensor
    return offset


def write_checkpoint(config: PretrainedConfig, directory: str | Path, dtype: torch.dtype, seed: int = 0,
                     std: float = 0.02) -> dict:
    """Write a random-weight checkpoint of `config` to `directory` shard by shard (see the module docstring);
    returns {"bytes": weight bytes, "shards": count}."""
    tensors = saved_tensors(config, dtype)
    shards = shard_names(tensors)
    gen = torch.Generator().manual_seed(seed)
    fill = lambda key, shape, dt: random_tensor(key, shape, dt, gen, std)  # noqa: E731
    total, weight_map = 0, {}
    with atomic_directory(directory) as tmp:
        for file, keys in shards.items():
            total += write_safetensors(tmp / file, {k: tensors[k] for k in keys}, fill)
            weight_map.update(dict.fromkeys(keys, file))
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2))
        saved = copy.deepcopy(config)
        saved.dtype, saved.architectures = dtype, [type(empty_model(config, dtype)).__name__]
        saved.save_pretrained(tmp)
    return {"bytes": total, "shards": len(shards)}


def warm_config(config: PretrainedConfig) -> PretrainedConfig:
    """A small twin of `config` (one routed decoder layer, 16 experts, vocabulary 512) whose checkpoint warms a process
    up (lazy imports, first kernels) in seconds."""
    fields = {"num_hidden_layers": 1, "vocab_size": 512}
    if getattr(config, "first_k_dense_replace", None):
        fields["first_k_dense_replace"] = 0  # its one layer routed
    for name in ("num_experts", "n_routed_experts", "num_local_experts"):
        if getattr(config, name, None):
            fields[name] = 16
    return _with(config, **fields)


# ---------------------------------------------------------------------------------------------- sizes and FLOPs


def _prefix_model(config: PretrainedConfig, dtype: torch.dtype):
    """The meta-device model of `config` with its dense prefix and one MoE layer (what every later layer repeats)."""
    built = min(config.num_hidden_layers, (getattr(config, "first_k_dense_replace", 0) or 0) + 1)
    return empty_model(_with(config, num_hidden_layers=built), dtype)


def weight_bytes(config: PretrainedConfig, dtype: torch.dtype) -> tuple[list[int], int]:
    """(weight bytes of each decoder layer, bytes outside the decoder layers: embeddings, final norm, head),
    parameters and persistent buffers, from a meta-device model."""
    model = _prefix_model(config, dtype)
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    sizes = [sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in model.model.layers]
    return sizes + [sizes[-1]] * (config.num_hidden_layers - len(sizes)), total - sum(sizes)


def _attention_dims(config) -> tuple[int, int]:
    """(query-key dim, value dim) per head."""
    if getattr(config, "qk_nope_head_dim", None):  # MLA
        return config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head, head


def layer_flops(config: PretrainedConfig, context: float) -> list[float]:
    """Active matmul FLOPs per token of each decoder layer at `context` attended positions: 2 x (parameters outside
    the routed experts + routed parameters x top-k / experts) + attention scores and values."""
    model = _prefix_model(config, torch.bfloat16)
    experts = fmoe.find_experts(model)
    qk, v = _attention_dims(config)
    out = []
    for i, layer in enumerate(model.model.layers):
        total = sum(p.numel() for p in layer.parameters())
        routed = [m for n, m in experts.items() if n.startswith(f"model.layers.{i}.")]
        routed_params = sum(p.numel() for m in routed for p in m.parameters())
        active = total - routed_params + sum(
            sum(p.numel() for p in m.parameters()) * config.num_experts_per_tok / m.down_proj.shape[0] for m in routed)
        out.append(2 * active + 2 * context * config.num_attention_heads * (qk + v))
    return out + [out[-1]] * (config.num_hidden_layers - len(out))


def head_flops(config: PretrainedConfig) -> float:
    return 2 * config.vocab_size * config.hidden_size


def _with(config: PretrainedConfig, **fields) -> PretrainedConfig:
    data = config.to_dict()
    data.update(fields)
    return type(config).from_dict(data)


# ---------------------------------------------------------------------------------------------- one measurement


def make_batches(vocab: int, sequences: int, seq: int, seed: int, per_batch: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (sequences, seq), generator=gen)
    return [{"input_ids": ids[i:i + per_batch]} for i in range(0, sequences, per_batch)]


class Peaks:
    """Host peak (resident high-water mark above the start) and, on a GPU, allocated-memory peak above the start:
    speed_memory's Peak on each."""

    def __init__(self, device: torch.device):
        self.parts = {"host": Peak(torch.device("cpu")), **({"gpu": Peak(device)} if device.type == "cuda" else {})}

    def start(self) -> None:
        for part in self.parts.values():
            part.start()

    def stop(self) -> dict:
        return {name: part.stop() for name, part in self.parts.items()}


def _streamed(src, batches, criterion, spec):
    return fmoe.calibrate(src, batches, criterion, streamed=True, progress=False, chunk=spec["chunk"],
                          offload_dir=spec["offload_dir"], device=spec["device"])


def _timed_residency() -> list[tuple[str | None, float, float, int]]:
    """Record, for every block in which the streamed model has a part resident (a decoder layer; None: the tensors
    outside the layers), (its name, seconds to read it, seconds until it was freed, the host high-water mark then):
    the sweep's time per layer, read and run, measured inside the one run, and which block set the peak."""
    from contextlib import contextmanager

    from fmoe.calibration import streamed as module

    periods, original = [], module.Streamed.resident

    def resident(self, prefix):
        block = original(self, prefix)

        @contextmanager
        def timed():
            start = time.perf_counter()
            with block as value:
                read = time.perf_counter() - start
                yield value
            periods.append((prefix, read, time.perf_counter() - start, status_bytes("VmHWM")))

        return timed()

    module.Streamed.resident = resident
    return periods


def child() -> None:
    """Measurements in this fresh process (spec: JSON in argv[1]), printed as a JSON line: streamed, one criterion;
    in memory, the checkpoint loaded once and each criterion in turn (each peak above the loaded model)."""
    spec = json.loads(sys.argv[1])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    batches = make_batches(spec["vocab"], spec["sequences"], spec["seq"], spec["seed"], spec["per_batch"])
    peak, out = Peaks(device), {}
    if spec["mode"] == "memory":
        peak.start()
        t0 = time.perf_counter()
        model = fmoe.from_pretrained(spec["src"]).to(device)
        out["load_s"], out["loaded"] = time.perf_counter() - t0, peak.stop()
        warm = make_batches(spec["vocab"], 1, 8, spec["seed"] + 1)
        for criterion in spec["criteria"]:
            fmoe.calibrate(model, warm, criterion, progress=False)  # warm-up: lazy imports, first kernels
            out[criterion] = _timed(lambda: fmoe.calibrate(model, batches, criterion, progress=False),  # noqa: B023
                                    spec, peak, device, spec["scores"].format(criterion=criterion))
    else:
        (criterion,) = spec["criteria"]
        warm = make_batches(spec["warm_vocab"], 1, 8, spec["seed"] + 1)
        _streamed(spec["warm_src"], warm, criterion, spec)  # warm-up on a small twin checkpoint
        periods = _timed_residency()
        out[criterion] = _timed(lambda: _streamed(spec["src"], batches, criterion, spec), spec, peak, device,
                                spec["scores"].format(criterion=criterion), periods)
    print(json.dumps(out), flush=True)


def _timed(run, spec: dict, peak: Peak, device: torch.device, scores: str, periods: list | None = None) -> dict:
    """{seconds: the fastest of `repeats` runs, all_seconds, peak: the highest} (+ per-layer times of the fastest
    run and the block that set the host peak, from `periods`); the scores of the last run saved to `scores`."""
    times, peaks, layers, where = [], [], [], []
    for _ in range(spec["repeats"]):
        calibration = None
        if periods is not None:
            periods.clear()
        peak.start()
        t0 = time.perf_counter()
        calibration = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        peaks.append(peak.stop())
        if periods is not None:  # {layer: [read seconds, resident seconds]} summed over the sweeps
            per_layer: dict[int, list[float]] = {}
            for prefix, read, held, _ in periods:
                if prefix not in ("input", "output"):
                    sums = per_layer.setdefault(int(prefix.rsplit(".", 1)[1]), [0.0, 0.0])
                    sums[0], sums[1] = sums[0] + read, sums[1] + held
            layers.append([per_layer[i] for i in sorted(per_layer)])
            top = max((p for p in periods), key=lambda p: p[3], default=None)  # the first block reaching the peak
            first = next((p for p in periods if top is not None and p[3] == top[3]), None)
            where.append("-" if first is None else {"input": "embeddings", "output": "final norm, head"}.get(
                first[0], f"layer {first[0].rsplit('.', 1)[-1]}"))
    best = min(range(len(times)), key=times.__getitem__)
    out = {"seconds": times[best], "all_seconds": times, "peak": {k: max(p[k] for p in peaks) for k in peaks[0]}}
    if layers:
        worst = max(range(len(peaks)), key=lambda i: peaks[i]["host"])
        out.update(layer_read_seconds=[r for r, _ in layers[best]], layer_seconds=[h for _, h in layers[best]],
                   peak_block=where[worst])
    if calibration.scores is not None:
        from safetensors.torch import save_file

        save_file({k: v.float().cpu().contiguous() for k, v in calibration.scores.tensors.items()}, scores)
    return out


def measure(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import streamed; streamed.child()"
    run = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"{spec['mode']} {spec['criteria']} on {spec['src']} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def relative_difference(a: str, b: str) -> float:
    """max over experts modules of ||a - b|| / ||b|| of two saved score files."""
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if set(x) != set(y):
        raise ValueError(f"streamed and in-memory scores name different modules: {sorted(set(x) ^ set(y))[:3]}")
    return max(float((x[k] - y[k]).norm() / y[k].norm().clamp(min=1e-30)) for k in x)


# ---------------------------------------------------------------------------------------------- the run


def main(preset: str = "qwen3-30b-a3b", layers: int = 2, dtype: str = "bfloat16", sequences: int = 4, seq: int = 256,
         per_batch: int = 2, device: str = "cpu", chunk: int | None = None, offload_dir: str | None = None,
         in_memory: bool = True, repeats: int = 2, checkpoint: str | None = None, threads: int | None = None,
         std: float = 0.02, seed: int = 0, timeout: float = 3600, out: str = "docs/quality/streamed") -> dict:
    """Write the checkpoint, measure, report (see the module docstring).

    preset: architecture (benchmarks/presets.py); layers: decoder layers written (the preset's full depth is used
    for the estimates); sequences x seq: calibration tokens, `per_batch` sequences per batch; chunk, offload_dir:
    passed to the streamed calibration; in_memory: also calibrate the checkpoint loaded in memory (skipped when
    its weights do not fit); repeats: timed runs per measurement (the fastest counts, the highest peak);
    checkpoint: where to write the checkpoint (kept; default: a temporary directory, removed)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(sorted(PRESETS))}")
    torch_dtype = getattr(torch, dtype)
    full = preset_config(preset)
    layers = min(layers, full.num_hidden_layers)
    config = preset_config(preset, num_hidden_layers=layers)
    load_before = Path("/proc/loadavg").read_text().split()[0]  # other work on the machine slows every figure
    tmp = tempfile.mkdtemp(prefix="fmoe-streamed-")
    try:
        src = Path(checkpoint) if checkpoint else Path(tmp) / "checkpoint"
        t0 = time.perf_counter()
        log(f"writing {layers} of {full.num_hidden_layers} layers of {preset} ({dtype}) to {src}")
        written = write_checkpoint(config, src, torch_dtype, seed, std)
        written["seconds"] = time.perf_counter() - t0
        log(f"wrote {written['bytes'] / 2**30:.2f} GB in {written['shards']} shards in {written['seconds']:.0f} s")
        write_checkpoint(warm_config(config), Path(tmp) / "warm", torch_dtype, seed, std)
        base = {"vocab": config.vocab_size, "sequences": sequences, "seq": seq, "per_batch": per_batch, "seed": seed,
                "repeats": repeats, "device": device, "chunk": chunk, "offload_dir": offload_dir, "threads": threads,
                "warm_src": str(Path(tmp) / "warm"), "warm_vocab": warm_config(config).vocab_size, "src": str(src),
                "scores": str(Path(tmp) / "{mode}-{criterion}.safetensors")}
        fits, why = _fits(written["bytes"], device)
        runs = {}
        for criterion in CRITERIA:
            log(f"streamed/{criterion} ...")
            scores = base["scores"].replace("{mode}", "streamed")
            result = measure({**base, "mode": "streamed", "criteria": [criterion], "scores": scores}, timeout)
            runs[f"streamed/{criterion}"] = {**result[criterion], "scores_file": scores.format(criterion=criterion)}
            _logged(f"streamed/{criterion}", result[criterion])
        if in_memory and fits:
            log(f"in memory: {', '.join(CRITERIA)} ...")
            scores = base["scores"].replace("{mode}", "memory")
            result = measure({**base, "mode": "memory", "criteria": list(CRITERIA), "scores": scores}, timeout)
            for criterion in CRITERIA:
                runs[f"memory/{criterion}"] = {**result[criterion], "load_s": result["load_s"],
                                               "scores_file": scores.format(criterion=criterion)}
                _logged(f"memory/{criterion}", result[criterion])
        settings = {"preset": preset, "layers": layers, "full_layers": full.num_hidden_layers, "dtype": dtype,
                    "sequences": sequences, "seq": seq, "per_batch": per_batch, "chunk": chunk,
                    "offload_dir": offload_dir, "repeats": repeats,
                    "load_average": f"{load_before} -> {Path('/proc/loadavg').read_text().split()[0]}",
                    "in_memory": "measured" if in_memory and fits else (why or "not asked (--in_memory false)")}
        result = figures(settings, config, torch_dtype, runs, written, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(out, result, markdown(result))
    return result


def _logged(name: str, result: dict) -> None:
    runs = ", ".join(f"{v:.1f}" for v in result["all_seconds"])
    log(f"{name}: {result['seconds']:.1f} s (runs: {runs}), peak {result['peak']['host'] / MB:,.0f} MB")


def _fits(weight_bytes: int, device: str) -> tuple[bool, str]:
    """Whether the checkpoint loaded in memory (weights x 1.5 for the calibration's working memory) fits."""
    if device == "cuda":
        room = torch.cuda.get_device_properties(0).total_memory
    else:
        room = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    ok = 1.5 * weight_bytes < room
    return ok, "" if ok else f"skipped: weights {weight_bytes / 2**30:.1f} GB x 1.5 > {room / 2**30:.1f} GB available"


def figures(settings: dict, config, dtype: torch.dtype, runs: dict, written: dict, device: str) -> dict:
    layers, seq = settings["layers"], settings["seq"]
    tokens = settings["sequences"] * seq
    context = (seq + 1) / 2  # mean attended positions of a causal sequence
    flops = layer_flops(config, context)
    sizes, outside = weight_bytes(config, dtype)
    # boundaries held in memory: one chunk's (layers + 1) states, + two gradient slots for Fisher (the backward
    # sweep reads one while it writes the other); none with offload_dir (one batch's state at a time)
    chunk_tokens = min(settings["chunk"] or settings["sequences"], settings["sequences"]) * seq
    state = chunk_tokens * config.hidden_size * dtype.itemsize
    per_million = 1e6 / tokens
    rows = {}
    for criterion in CRITERIA:
        run = runs[f"streamed/{criterion}"]
        boundary = 0 if settings["offload_dir"] else state * (layers + 1 + (2 if criterion == "fisher" else 0))
        peak = run["peak"]["host"] + run["peak"].get("gpu", 0)  # on a GPU the boundaries stay on the host
        held, read = sum(run["layer_seconds"]), sum(run["layer_read_seconds"])
        row = {"seconds": run["seconds"], "all_seconds": run["all_seconds"], "peak_host": run["peak"]["host"],
               "peak_gpu": run["peak"].get("gpu"), "peak_block": run["peak_block"], "layer_bytes": max(sizes),
               "outside_bytes": outside,
               "boundary_bytes": boundary, "peak_ratio": peak / (max(sizes) + boundary),
               "peak_ratio_outside": peak / (max(sizes + [outside]) + boundary),
               "layer_seconds": run["layer_seconds"], "layer_read_seconds": run["layer_read_seconds"],
               "seconds_per_layer_per_1M_tokens": held / layers * per_million,
               "read_share": read / held, "outside_seconds": run["seconds"] - held,
               # estimate: the layers' time without their reads, per active FLOP; reads per byte (page cache)
               "seconds_per_active_flop": (held - read) / sum(flops), "read_seconds_per_byte": read / (sum(sizes) * (2 if criterion == "fisher" else 1))}  # both sweeps read
        memory = runs.get(f"memory/{criterion}")
        if memory is not None:
            row.update(memory_seconds=memory["seconds"], memory_all_seconds=memory["all_seconds"],
                       memory_load_seconds=memory["load_s"], memory_peak_host=memory["peak"]["host"],
                       memory_peak_gpu=memory["peak"].get("gpu"),
                       streamed_over_memory=run["seconds"] / memory["seconds"],
                       scores_relative_difference=relative_difference(run["scores_file"], memory["scores_file"]))
        rows[criterion] = row
    estimates = {}
    for target in TARGETS:
        target_config = preset_config(target)
        target_flops = layer_flops(target_config, context)
        target_sizes, target_outside = weight_bytes(target_config, dtype)
        estimate = {"layers": target_config.num_hidden_layers,
                    "active_gflop_per_token": (sum(target_flops) + head_flops(target_config)) / 1e9,
                    "weight_gb": (sum(target_sizes) + target_outside) / 2**30}
        for c, row in rows.items():
            compute = (row["seconds_per_active_flop"] * sum(target_flops)
                       + row["outside_seconds"] * head_flops(target_config) / head_flops(config))
            sweeps = 2 if c == "fisher" else 1  # Fisher reads every layer in both sweeps
            estimate[f"{c}_hours_per_1M_tokens"] = compute * per_million / 3600
            estimate[f"{c}_read_hours_per_chunk"] = (row["read_seconds_per_byte"] * sweeps
                                                     * (sum(target_sizes) + target_outside) / 3600)
        estimates[target] = estimate
    return {**settings, "tokens": tokens, "device": device_name(torch.device(device)),
            "checkpoint_bytes": written["bytes"], "shards": written["shards"], "write_seconds": written["seconds"],
            "layer_bytes": sizes, "outside_bytes": outside, "measured_gflop_per_token": [f / 1e9 for f in flops],
            "rows": rows, "estimates": estimates, "torch": torch.__version__,
            "seconds": round(time.perf_counter() - START)}


def markdown(r: dict) -> str:
    mb = lambda b: f"{b / MB:,.0f} MB"  # noqa: E731
    a, f = r["rows"]["activation"], r["rows"]["fisher"]
    lines = [f"Streamed calibration, preset `{r['preset']}` ({r['layers']} of {r['full_layers']} layers, random "
             f"weights, {r['dtype']}, {r['checkpoint_bytes'] / 2**30:.2f} GB in {r['shards']} shards, written in "
             f"{r['write_seconds']:.0f} s), {r['device']}; {r['tokens']} calibration tokens ({r['sequences']} x "
             f"{r['seq']}, {r['per_batch']} per batch); chunk {r['chunk']}, offload_dir {r['offload_dir']}; in "
             f"memory: {r['in_memory']}; fastest of {r['repeats']} run(s), each in a fresh process after a warm-up; "
             f"1-minute load average {r['load_average']}; torch {r['torch']}.", "",
             "| measure | forward-only (activation) | Fisher | goal |", "|---|---:|---:|---|"]

    def row(label, key, spec=None, goal="", conv=None):
        cells = []
        for values in (a, f):
            v = values.get(key)
            cells.append("-" if v is None else conv(v) if conv else format(v, spec))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {goal} |")

    row("streamed seconds", "seconds", ".1f")
    row("peak host memory (streamed)", "peak_host", conv=mb)
    if a.get("peak_gpu") is not None:
        row("peak GPU memory (streamed)", "peak_gpu", conv=mb)
    row("largest decoder layer's weights", "layer_bytes", conv=mb)
    row("weights outside the layers (embeddings, head)", "outside_bytes", conv=mb)
    row("layer boundaries held (Fisher: + 2 gradient slots)", "boundary_bytes", conv=mb)
    row("host peak reached while resident", "peak_block", "s")  # the first block the high-water mark reached
    row("**peak ÷ (layer + boundaries)**" + (" (host + GPU)" if a.get("peak_gpu") is not None else ""),
        "peak_ratio", ".2f", f"<= {GOALS['peak_ratio']}")
    row("peak ÷ (larger of layer and outside weights + boundaries)", "peak_ratio_outside", ".2f")
    row("**seconds per layer per 1M tokens** (read + run)", "seconds_per_layer_per_1M_tokens", ",.0f")
    row("share of a layer's time spent reading it", "read_share", ".0%")
    row("seconds outside the layers (embeddings, head, loss, similarity)", "outside_seconds", ".1f")
    row("in-memory seconds (load not counted)", "memory_seconds", ".1f")
    row("in-memory load seconds", "memory_load_seconds", ".1f")
    row("in-memory peak host memory (above the loaded weights)", "memory_peak_host", conv=mb)
    if a.get("streamed_over_memory") is not None:
        lines.append(f"| **streamed ÷ in-memory time** | {a['streamed_over_memory']:.2f} | "
                     f"{f['streamed_over_memory']:.2f} | <= {GOALS['activation']} / <= {GOALS['fisher']} |")
    row("scores: streamed vs in-memory (max relative difference)", "scores_relative_difference", ".1e")
    lines += ["", f"Estimates for whole models on this device, at {r['seq']}-token sequences: compute hours per 1M "
              "calibration tokens = (a layer's measured run time, its read excluded, per active FLOP) x the target's "
              "active layer FLOPs + (the measured time outside the layers) x the target's head FLOPs ÷ the measured "
              "head's; read hours per chunk = the target's weight bytes (twice for Fisher) at the measured read "
              "rate (page cache), once per chunk of sequences whose boundaries fit the memory. Time is taken as "
              "proportional to active FLOPs across shapes: an estimate, not a measurement.",
              "", "| model | layers | weights GB | active GFLOP/token | forward-only h / 1M tokens | + read h / chunk "
              "| Fisher h / 1M tokens | + read h / chunk |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in r["estimates"].items():
        lines.append(f"| {name} | {e['layers']} | {e['weight_gb']:,.0f} | {e['active_gflop_per_token']:.1f} | "
                     f"{e['activation_hours_per_1M_tokens']:,.1f} | {e['activation_read_hours_per_chunk']:.2f} | "
                     f"{e['fisher_hours_per_1M_tokens']:,.1f} | {e['fisher_read_hours_per_chunk']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    auto_cli(main)
