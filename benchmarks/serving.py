"""vLLM throughput of fmoe's exports, as ratios measured in one run: the dense model and its pruned exports.

    FMOE_VLLM_PYTHON=.vllm-venv/bin/python python benchmarks/serving.py                  # CPU, the "toy" preset
    FMOE_VLLM_PYTHON=... python benchmarks/serving.py --preset qwen1.5-moe-a2.7b --layers 2 --dtype bfloat16 \
        --cuda_graphs true --prompts 256 --prefill_len 1024 --decode_tokens 256              # a GPU

Builds the preset (benchmarks/presets.py) with random weights, scores its dims with Fisher on random tokens and
writes four exports: dense; 50% of routed dims removed at layer scope (ragged widths, fused export, served with
fmoe's plugin); 50% at expert scope (uniform, stock export, stock vLLM); 25% of experts dropped at global scope
(counts that differ by layer). Each is served by vLLM (its own environment, $FMOE_VLLM_PYTHON) on two prompt
sets: prefill-heavy (P prompts of `prefill_len` random tokens, one new token) and decode-heavy (P prompts of 16
tokens, `decode_tokens` new tokens each, EOS ignored), after one untimed pass of the same shapes, the fastest of
`repeats` passes. Reported: tokens/s,
pruned / dense, the arithmetic limit (dense / pruned parameters a token runs through, embeddings excluded; an
expert drop keeps top-k, so its limit is 1 for compute: it saves memory) and the share of it reached, and ragged
/ uniform at equal kept bytes. Writes results.json and results.md to `out`.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli

import fmoe
from fmoe.serving import vllm as serving

sys.path.insert(0, str(Path(__file__).parent))
from speed_memory import build, device_name, preset_config, write_results  # noqa: E402

EXPORTS = {  # name: (method, amount, options)
    "dense": None,
    "dims 50% layer (ragged)": ("dims", 0.5, {"scope": "layer"}),
    "dims 50% expert (uniform)": ("dims", 0.5, {"scope": "expert"}),
    "expert drop 25% (global)": ("expert_drop", 0.25, {"scope": "global"}),
}


def compute_per_token(model) -> float:
    """Parameters a token runs through, without the input embeddings (a lookup, not a matmul)."""
    return fmoe.active_parameters(model) - model.get_input_embeddings().weight.numel()


def main(preset: str = "toy", layers: int | None = None, dtype: str = "float32", prompts: int = 64,
         prefill_len: int = 512, decode_tokens: int = 128, repeats: int = 3, cuda_graphs: bool = False, multiple_of: int = 32,
         max_widths: int | None = 4, out: str = "docs/quality/serving", seed: int = 0) -> dict:
    t0 = time.perf_counter()
    config = preset_config(preset, **({"num_hidden_layers": layers} if layers else {}))
    model = build(config, torch.device("cpu"), torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    batches = [{"input_ids": torch.randint(3, vocab, (4, 64), generator=g)} for _ in range(4)]
    calibration = fmoe.calibrate(model, batches, "fisher", progress=False)
    prefill = [torch.randint(3, vocab, (prefill_len,), generator=g).tolist() for _ in range(prompts)]
    decode = [torch.randint(3, vocab, (16,), generator=g).tolist() for _ in range(prompts)]
    rows, jobs = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, recipe) in enumerate(EXPORTS.items()):
            pruned = model if recipe is None else copy.deepcopy(model)
            if recipe is not None:
                method, amount, options = recipe
                if method == "dims":  # vLLM's CPU kernel pads widths to multiples of 32
                    options = {**options, "multiple_of": multiple_of, "max_widths": max_widths}
                fmoe.compress(pruned, method, amount, calibration, **options)
            path = Path(tmp) / f"export{i}"
            fmoe.save_pretrained(pruned, path)
            rows[name] = {"path": str(path), "plugin": serving.needs_plugin(path),
                          "routed_MB": fmoe.weight_bytes(pruned, routed_only=True) / 2**20,
                          "compute": compute_per_token(pruned)}
            engine = {"skip_tokenizer_init": True}
            timing = {"ignore_eos": True, "warmup": True, "repeats": repeats, "engine": engine}
            jobs += [{"path": str(path), "prompts": prefill, "max_tokens": 1, **timing},
                     {"path": str(path), "prompts": decode, "max_tokens": decode_tokens, **timing}]
            del pruned
        results = serving.generate(jobs, engine={"dtype": dtype, "enforce_eager": not cuda_graphs,
                                                 "max_model_len": prefill_len + 32})
    for name, (p, d) in zip(rows, zip(results[::2], results[1::2])):
        for r in (p, d):
            if r["error"]:
                raise RuntimeError(f"{name}: {r['error']}")
        rows[name]["prefill_tok_s"] = prompts * prefill_len / p["generate_s"]
        rows[name]["decode_tok_s"] = prompts * decode_tokens / d["generate_s"]
        rows[name].pop("path")
    dense = rows["dense"]
    for row in rows.values():
        row["limit"] = dense["compute"] / row["compute"]
        for kind in ("prefill", "decode"):
            row[f"{kind}_ratio"] = row[f"{kind}_tok_s"] / dense[f"{kind}_tok_s"]
            row[f"{kind}_share_of_limit"] = (row[f"{kind}_ratio"] - 1) / (row["limit"] - 1) if row["limit"] > 1.001 \
                else None
    ragged, uniform = rows["dims 50% layer (ragged)"], rows["dims 50% expert (uniform)"]
    summary = {k: ragged[f"{k}_tok_s"] / uniform[f"{k}_tok_s"] for k in ("prefill", "decode")}
    result = {"preset": preset, "layers": config.num_hidden_layers, "dtype": dtype, "prompts": prompts,
              "repeats": repeats,
              "multiple_of": multiple_of, "max_widths": max_widths,
              "prefill_len": prefill_len, "decode_tokens": decode_tokens, "cuda_graphs": cuda_graphs,
              "device": device_name(torch.device("cpu")), "rows": rows, "ragged_over_uniform": summary,
              "seconds": round(time.perf_counter() - t0)}
    write_results(out, result, markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"vLLM, preset `{result['preset']}` ({result['layers']} layers, random weights, {result['dtype']}), "
             f"{result['device']}; prefill: {result['prompts']} x {result['prefill_len']} tokens, decode: "
             f"{result['prompts']} x {result['decode_tokens']} new tokens; CUDA graphs {result['cuda_graphs']}; "
             f"dims widths multiples of {result['multiple_of']}, at most {result['max_widths']} per layer.", "",
             "| export | engine | routed MB | prefill tok/s | ÷ dense | decode tok/s | ÷ dense | limit | share "
             "(prefill / decode) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        share = "/".join("-" if r[f"{k}_share_of_limit"] is None else f"{r[f'{k}_share_of_limit']:.2f}"
                         for k in ("prefill", "decode"))
        lines.append(f"| {name} | {'plugin' if r['plugin'] else 'stock'} | {r['routed_MB']:.1f} | "
                     f"{r['prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_ratio']:.2f} | {r['limit']:.2f} | {share} |")
    s = result["ragged_over_uniform"]
    lines += ["", f"Ragged ÷ uniform at equal kept bytes: prefill {s['prefill']:.2f}, decode {s['decode']:.2f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    auto_cli(main)
