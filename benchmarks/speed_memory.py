"""Fisher scoring vs its floor and a training step, pruned vs dense inference, on real MoE shapes (random weights).

    # CPU, quick (toy shape, < 1 min; what a smoke test runs)
    python benchmarks/speed_memory.py --quick
    # CPU, a real architecture: as many decoder layers as fit in --max-gb (2 of Qwen1.5-MoE-A2.7B's 24 in bf16 at
    # 8 GB; one fp32 layer's training step needs ~10 GB), ~7 min each on 2 cores
    python benchmarks/speed_memory.py --preset qwen1.5-moe-a2.7b --dtype bfloat16 --max-gb 8 \\
        --batch 2 --seq 256 --decode-batch 1,32 --cache-len 128 --repeats 3
    python benchmarks/speed_memory.py --preset qwen1.5-moe-a2.7b --dtype float32 --max-gb 10 \\
        --batch 2 --seq 256 --decode-batch 1,32 --cache-len 128 --repeats 3
    # GPU (all layers that fit the device, full depth when the training step fits)
    python benchmarks/speed_memory.py --device cuda --dtype bfloat16 --preset qwen1.5-moe-a2.7b \\
        --batch 8 --seq 2048 --decode-batch 1,32 --cache-len 2048 --repeats 5
    python benchmarks/speed_memory.py --device cuda --dtype bfloat16 --preset qwen3-30b-a3b \\
        --batch 4 --seq 2048 --decode-batch 1,32 --cache-len 2048 --repeats 5
    python benchmarks/speed_memory.py --device cuda --dtype bfloat16 --preset mixtral --batch 4 --seq 2048

Everything is measured in this one process and reported as ratios. Times are medians of --repeats runs after one
warm-up (synchronised on GPU). Peak memory of a measured part is the peak above the memory in use just before it:
on CPU the resident set (VmHWM reset through /proc/self/clear_refs, minus VmRSS before), on GPU
torch.cuda.max_memory_allocated after reset_peak_memory_stats.

- Fisher step: fmoe.calibration.scorer.Scorer(criterion="fisher").step (fmoe's experts forward + hooks, weights frozen).
- Floor: the same loss and one backward with weights frozen and no fmoe hooks (stock experts forward); the
  embeddings' output requires grad so the backward runs through the whole network.
- Train: the same loss, every weight trainable, forward + backward with weight gradients (freed after each step;
  no optimizer state, so a real AdamW step costs more memory than this).
- Prefill: model(input_ids [batch, seq], logits_to_keep=1); decode: one new token per sequence on a KV cache of
  --cache-len tokens (cropped back after each step). 50% of routed dims removed: expert scope (stock experts,
  uniform widths) and layer scope (RaggedExperts) from synthetic scores (uniform noise times a per-expert lognormal
  factor, --skew), so widths spread as a data-driven plan's do without data.
- Limits: prefill by matmul FLOPs per token (attention projections and scores, router, shared and routed experts
  with top-k of E experts active), decode by bytes read per step (weights of the layers, the experts a batch is
  expected to touch under uniform routing, the output head, the KV cache); computed for the layers built.
- make_plan + prune at the Qwen3-30B-A3B expert shape (48 layers x 128 experts x 768; the toy shape with --quick):
  make_plan on 48 layers of cached score tensors, prune timed on --plan-layers real layers (vocab reduced: prune
  never touches it) and scaled to 48 layers.
- With few layers built (CPU), the output head (vocab 151936) is a large share of every figure: it is the same in
  all the variants, so it pulls ratios towards 1; the limits are given for the layers built and at full depth.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import ctypes
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

import fmoe
from fmoe.calibration.loss import prepare_batch, sequence_nll
from fmoe.calibration.scorer import Scorer
from fmoe.calibration.context import frozen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from presets import PRESETS  # noqa: E402

GB = 2**30
RATIO = 0.5  # share of routed dims removed
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- device and memory


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return "CPU"


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_results(out: str | Path, result: dict, text: str) -> None:
    """results.json (`result`) and results.md (`text`, also printed) under `out`."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(text)
    print(text)


def _release_cpu_memory() -> None:
    """Give freed heap back to the OS, so that the resident set is what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Peak:
    """Peak memory of a part above what was in use when it started (bytes)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _release_cpu_memory()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = status_bytes("VmRSS")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return status_bytes("VmHWM") - self.base


def timed(parts: dict, device: torch.device, repeats: int) -> dict[str, tuple[float, int]]:
    """{part: (median seconds, peak extra bytes)} of each `parts[name]()`: one warm-up each, then `repeats` rounds
    that run every part in turn, so that the load of a shared machine falls on all of them alike."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for fn in parts.values():
        fn()
    sync()
    peak = Peak(device)
    times, peaks = {name: [] for name in parts}, dict.fromkeys(parts, 0)
    for _ in range(repeats):
        for name, fn in parts.items():
            peak.start()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], peak.stop())
    return {name: (statistics.median(times[name]), peaks[name]) for name in parts}


# ---------------------------------------------------------------------------------------------- models


def preset_config(name: str, **overrides):
    fields = {**PRESETS[name], **overrides}
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def build(config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The architecture with random weights, in eval mode: allocated without the stock init, then filled with
    uniform noise of std 0.02 (norms 1, biases 0), a few seconds per GB."""
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)  # prune edits its config
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.uniform_(-0.02 * math.sqrt(3), 0.02 * math.sqrt(3), generator=gen)
    return model.eval()


def layer_bytes(config, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes outside the decoder layers, bytes of one decoder layer), counted on a meta-device model."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    size = torch.empty((), dtype=dtype).element_size()
    layers = model.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters()) * size
    return sum(p.numel() for p in model.parameters()) * size - len(layers) * per_layer, per_layer


def layers_that_fit(config, dtype: torch.dtype, budget: float, tokens: int) -> int:
    """Decoder layers whose training step (weights + weight gradients + activations, roughly) fits `budget` bytes."""
    fixed, per_layer = layer_bytes(config, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
    # logits and their gradient in the model dtype (the loss works on 128 MB float32 chunks); per layer and token
    # ~16 hidden-sized activations kept for the backward, and the routed and shared experts' intermediates
    head_act = tokens * config.vocab_size * 2 * size + 2**28
    act = tokens * size * (16 * config.hidden_size + 4 * config.num_experts_per_tok * width + 3 * shared)
    n = int((budget - 2 * fixed - head_act) // (2 * per_layer + act))
    if n < 1:
        log(f"warning: not even one layer's training step fits {budget / GB:g} GB; building one layer anyway")
    return max(1, min(n, config.num_hidden_layers))


def random_batch(config, batch: int, seq: int, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, config.vocab_size, (batch, seq), generator=gen).to(device)}


# ------------------------------------------------------------------------------- scoring: Fisher vs floor vs train


def scoring_parts(model, batch: dict, device, repeats: int) -> dict[str, tuple[float, int]]:
    """{part: (median seconds per step, peak extra bytes)} for fisher, floor and train on the same batch."""
    prepared = prepare_batch(batch, device)
    scorer = Scorer(model, "fisher")
    embeddings = model.get_input_embeddings()

    def fisher():
        with scorer.attached():  # fmoe experts forward + hooks, weights frozen, eval mode
            scorer.step(batch)

    def floor():
        handle = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_())
        with frozen(model):
            nll, counts = sequence_nll(model, prepared)  # stock experts forward
            (nll / counts.clamp(min=1)).sum().backward()  # the loss Scorer.step backpropagates
        handle.remove()

    def train():
        model.train()
        nll, counts = sequence_nll(model, prepared)
        (nll.sum() / counts.sum().clamp(min=1)).backward()  # HF's .loss, weight gradients everywhere
        model.zero_grad(set_to_none=True)
        model.eval()

    return timed({"fisher": fisher, "floor": floor, "train": train}, device, repeats)


# ---------------------------------------------------------------------------------------------- inference


def twin(model, config, dtype: torch.dtype):
    """A second model holding the very same tensors (no copy): pruning it gives it its own, smaller experts and
    leaves `model` as it is."""
    with torch.device("meta"):
        other = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    other.load_state_dict(model.state_dict(), assign=True)
    for name, buffer in model.named_buffers():  # non-persistent ones (rotary tables) are not in the state dict
        path, _, attr = name.rpartition(".")
        other.get_submodule(path)._buffers[attr] = buffer
    return other.eval()


def prefill_fn(model, batch: dict):
    def run():
        with torch.no_grad():
            model(input_ids=batch["input_ids"], use_cache=False, logits_to_keep=1)

    return run


def decode_fn(model, config, batch_size: int, cache_len: int, device):
    """One new token per sequence on a KV cache of `cache_len` tokens (cropped back after each step)."""
    ids = random_batch(config, batch_size, cache_len + 1, device, seed=1)["input_ids"]  # [B, cache_len + 1]
    with torch.no_grad():
        cache = model(input_ids=ids[:, :-1], use_cache=True, logits_to_keep=1).cache

    def run():
        with torch.no_grad():
            model(input_ids=ids[:, -1:], cache=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # remove the new token: every step attends to cache_len positions
        assert cache.get_seq_length() == cache_len

    return run


def inference_parts(models: dict, config, args, device) -> dict[str, dict[str, float]]:
    """{part: {model name: median seconds}} for prefill and decode at each decode batch size, models in turns."""
    batch = random_batch(config, args.batch, args.seq, device)
    out = {"prefill": timed({k: prefill_fn(m, batch) for k, m in models.items()}, device, args.repeats)}
    for b in args.decode_batch:
        out[f"decode@{b}"] = timed({k: decode_fn(m, config, b, args.cache_len, device) for k, m in models.items()},
                                   device, args.repeats)
    return {part: {k: seconds for k, (seconds, _) in r.items()} for part, r in out.items()}


def synthetic_scores(model, skew: float, seed: int = 0) -> fmoe.Scores:
    """Uniform noise times a lognormal per-expert factor: layer-scope plans then give experts different widths, as
    data-driven scores do."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in fmoe.find_experts(model).items():
        e, width = m.down_proj.shape[0], m.down_proj.shape[2 if not m.is_transposed else 1]
        tensors[name] = torch.rand(e, width, generator=gen) * torch.exp(skew * torch.randn(e, 1, generator=gen))
    return fmoe.Scores(tensors, "random", fmoe.fingerprint(model), 1, 1, {})


def plan_for(scores: fmoe.Scores, scope: str, max_widths: int) -> fmoe.PruningPlan:
    """A plan removing RATIO of routed dims, at most `max_widths` distinct widths per layer (0: unbounded)."""
    return fmoe.make_plan(scores, RATIO, scope, max_widths=max_widths or None)


def on_device(plan: fmoe.PruningPlan, device: torch.device) -> fmoe.PruningPlan:
    """The plan with its kept-dim indices on the model's device (prune slices with them)."""
    return dataclasses.replace(plan, keep={n: [k.to(device) for k in ks] for n, ks in plan.keep.items()})


# ---------------------------------------------------------------------------------------------- arithmetic limits


def work(model, config, context: float, batch: int = 1, depth: int | None = None) -> tuple[float, float]:
    """(matmul FLOPs per token at `context` attended positions, bytes read per decode step of `batch` sequences),
    for the layers built or, with `depth`, that many layers like them."""
    experts = fmoe.find_experts(model)
    layers = model.model.layers
    scale = (depth or len(layers)) / len(layers)
    size = next(model.parameters()).element_size()
    routed = sum(p.numel() for m in experts.values() for p in m.parameters()) * scale
    dense = sum(p.numel() for p in layers.parameters()) * scale - routed  # attention, router, shared expert, norms
    n_exp, top_k = next(iter(experts.values())).num_experts, config.num_experts_per_tok  # RaggedExperts keeps it
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_layers = len(layers) * scale
    flops = 2 * (dense + routed * top_k / n_exp) + n_layers * 4 * context * config.num_attention_heads * head_dim
    touched = 1 - (1 - top_k / n_exp) ** batch  # share of experts a batch hits (uniform routing)
    kv = batch * context * 2 * config.num_key_value_heads * head_dim * n_layers
    head = model.get_output_embeddings().weight.numel()
    return flops, (dense + routed * touched + head + kv) * size


# ---------------------------------------------------------------------------------------------- make_plan + prune


def plan_prune_timing(args, device, dtype) -> dict:
    """make_plan on a full model's worth of cached scores, prune on real layers, scaled to the full depth."""
    name = "toy" if args.quick else "qwen3-30b-a3b"
    full = preset_config(name)
    n_layers, n_exp = full.num_hidden_layers, full.num_experts
    width = getattr(full, "moe_intermediate_size", None) or full.intermediate_size
    gen = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.experts": torch.rand(n_exp, width, generator=gen) for i in range(n_layers)}
    cached = fmoe.Scores(tensors, "fisher", "cached", 1, 1, {})
    out = {"shape": f"{n_layers} x {n_exp} x {width} ({name})"}
    for scope in ("expert", "layer"):
        start = time.perf_counter()
        plan_for(cached, scope, args.max_widths)
        out[f"make_plan/{scope}"] = time.perf_counter() - start
        layers = min(args.plan_layers, n_layers)
        model = build(preset_config(name, num_hidden_layers=layers, vocab_size=256), device, dtype)
        plan = on_device(plan_for(synthetic_scores(model, args.skew), scope, args.max_widths), device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        fmoe.prune(model, plan)
        sync()
        out[f"prune/{scope}"] = (time.perf_counter() - start) / layers * n_layers
        out["prune_layers"] = layers
        del model, plan
        _release_cpu_memory()
    return out


# ---------------------------------------------------------------------------------------------- the run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen1.5-moe-a2.7b")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--layers", type=int, default=None, help="decoder layers to build (default: as many as fit)")
    p.add_argument("--max-gb", type=float, default=None,
                   help="memory budget for the layers built (default: 20 on CPU, 90%% of the GPU's memory on cuda)")
    p.add_argument("--batch", type=int, default=4, help="scoring and prefill batch")
    p.add_argument("--seq", type=int, default=512, help="scoring and prefill sequence length")
    p.add_argument("--decode-batch", type=lambda s: [int(v) for v in s.split(",")], default=[1, 32])
    p.add_argument("--cache-len", type=int, default=512, help="KV cache length for decode")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skew", type=float, default=0.5, help="spread of the per-expert factor of synthetic scores")
    p.add_argument("--max-widths", type=int, default=4, help="layer scope: make_plan's max_widths (0: unbounded)")
    p.add_argument("--plan-layers", type=int, default=1, help="real layers pruned to time prune")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="toy preset, small batches (< 1 min on CPU)")
    args = p.parse_args()
    if args.quick:
        args.preset, args.batch, args.seq, args.cache_len, args.repeats = "toy", 2, 64, 32, 3
        args.decode_batch = [1, 8]
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.max_gb is None:
        cuda = device.type == "cuda"
        args.max_gb = 0.9 * torch.cuda.get_device_properties(device).total_memory / GB if cuda else 20.0

    config = preset_config(args.preset)
    full_layers = config.num_hidden_layers
    layers = args.layers or layers_that_fit(config, dtype, args.max_gb * GB, args.batch * args.seq)
    config = preset_config(args.preset, num_hidden_layers=layers)
    # [full-depth dense bytes] from a meta model: what the extrapolated weight share is relative to
    fixed, per_layer = layer_bytes(preset_config(args.preset), dtype)

    t0 = time.perf_counter()
    model = build(config, device, dtype)
    build_s = time.perf_counter() - t0
    scores = synthetic_scores(model, args.skew)
    batch = random_batch(config, args.batch, args.seq, device)

    log(f"built {layers} layers in {build_s:.1f} s; scoring")
    # 1. scoring: Fisher step vs floor vs training step
    scoring = scoring_parts(model, batch, device, args.repeats)

    # 2. inference: dense, and twins sharing its weights pruned at expert scope (uniform) and layer scope (ragged)
    models = {"dense": model}
    for scope in ("expert", "layer"):
        models[scope] = fmoe.prune(twin(model, config, dtype),
                                   on_device(plan_for(scores, scope, args.max_widths), device))
    log("inference: dense, expert scope, layer scope in turns")
    results = inference_parts(models, config, args, device)
    ctx_prefill = (args.seq + 1) / 2  # mean attended positions of a causal prefill
    bytes_of, limits, widths = {}, {}, {}
    for name, m in models.items():
        bytes_of[name] = (fmoe.weight_bytes(m), fmoe.weight_bytes(m, routed_only=True))
        limits[name] = [[work(m, config, ctx_prefill, depth=d)[0]]
                        + [work(m, config, args.cache_len, b, depth=d)[1] for b in args.decode_batch]
                        for d in (None, full_layers)]  # [layers built, full depth][prefill, decode...]
        widths[name] = sorted({w for e in fmoe.find_experts(m).values() for w in _widths(e)})
    del model, models
    _release_cpu_memory()

    log("make_plan + prune")
    planning = plan_prune_timing(args, device, dtype)

    report(args, device, config, layers, full_layers, build_s, scoring, results, limits, bytes_of, widths,
           fixed, per_layer, planning)


def _widths(module) -> list[int]:
    if isinstance(module, fmoe.RaggedExperts):
        return list(module.widths)
    return [module.down_proj.shape[1] if module.is_transposed else module.down_proj.shape[2]]


def report(args, device, config, layers, full_layers, build_s, scoring, results, limits, bytes_of, widths,
           fixed, per_layer, planning):
    tokens = args.batch * args.seq
    rows = []

    def row(what, value, target="", note=""):
        rows.append(f"| {what} | {value} | {target} | {note} |")

    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    (f_s, f_mem), (fl_s, fl_mem), (t_s, t_mem) = scoring["fisher"], scoring["floor"], scoring["train"]
    row("Fisher step tokens/s", f"{tokens / f_s:.0f}", "", f"peak +{mb(f_mem)}")
    row("floor (frozen fwd+bwd, no hooks) tokens/s", f"{tokens / fl_s:.0f}", "", f"peak +{mb(fl_mem)}")
    row("train (fwd+bwd, weight grads) tokens/s", f"{tokens / t_s:.0f}", "", f"peak +{mb(t_mem)}")
    row("**Fisher / floor throughput**", f"{fl_s / f_s:.2f}x", ">= 0.9x")
    row("**Fisher / train throughput**", f"{t_s / f_s:.2f}x", ">= 1.5x")
    row("**Fisher / train peak memory**", f"{f_mem / max(t_mem, 1):.2f}x", "<= 1x")

    parts = ["prefill"] + [f"decode@{b}" for b in args.decode_batch]
    for i, part in enumerate(parts):
        unit = f"{args.batch}x{args.seq}" if part == "prefill" else f"batch {part[7:]}, cache {args.cache_len}"
        kind = "FLOPs" if part == "prefill" else "bytes"
        dense_s = results[part]["dense"]
        per_s = (tokens if part == "prefill" else int(part.split("@")[1])) / dense_s
        row(f"dense {part} ({unit}) tokens/s", f"{per_s:.1f}", "", "")
        for scope in ("expert", "layer"):
            speedup = dense_s / results[part][scope]
            limit, full = (limits["dense"][d][i] / limits[scope][d][i] for d in (0, 1))
            row(f"**{scope} scope {part} / dense**", f"{speedup:.2f}x", "",
                f"{kind} limit {limit:.2f}x, achieved/limit {speedup / limit:.2f} (limit at full depth {full:.2f}x)")
        ragged_uniform = results[part]["expert"] / results[part]["layer"]
        row(f"**ragged / uniform {part}**", f"{ragged_uniform:.2f}x", ">= 0.95x")

    for scope in ("expert", "layer"):
        dense_b, dense_r = bytes_of["dense"]
        pruned_b, pruned_r = bytes_of[scope]
        removed_per_layer = (dense_b - pruned_b) / layers
        full_dense = fixed + full_layers * per_layer
        row(f"**weight bytes {scope} scope / dense**", f"{pruned_b / dense_b:.3f}x ({layers} layers)", "",
            f"full depth {(full_dense - full_layers * removed_per_layer) / full_dense:.3f}x "
            f"({-full_layers * removed_per_layer / full_dense:+.2%}); routed {pruned_r / dense_r:.3f}x; "
            f"widths {widths[scope][0]}..{widths[scope][-1]} ({len(widths[scope])} distinct)")

    for scope in ("expert", "layer"):
        total = planning[f"make_plan/{scope}"] + planning[f"prune/{scope}"]
        row(f"**make_plan + prune, {scope} scope** ({planning['shape']})", f"{total:.1f} s", "< 60 s",
            f"make_plan {planning[f'make_plan/{scope}']:.2f} s (all layers) + prune "
            f"{planning[f'prune/{scope}']:.1f} s (timed on {planning['prune_layers']} layer(s), scaled)")

    print(f"\ndevice: {device_name(device)}; dtype {args.dtype}; preset {args.preset} with {layers} of {full_layers} "
          f"layers (budget {args.max_gb:g} GB); scoring/prefill batch {args.batch}x{args.seq}; {args.repeats} "
          f"repeats (median) after a warm-up; built in {build_s:.1f} s; torch {torch.__version__}; "
          f"{RATIO:.0%} of routed dims removed\n")
    print("| measure | value | target | note |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
