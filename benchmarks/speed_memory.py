"""Fisher scoring vs a training step, and dense vs 50%-pruned inference, on a small random MoE on CPU.

    python benchmarks/speed_memory.py                 # ~2 min on 2 CPU cores
    python benchmarks/speed_memory.py --family olmoe --hidden 512 --steps 5

Each measurement runs in its own process so its peak resident memory (ru_maxrss) is its own; the figure printed
is peak minus the resident size right after the model was built. Ratios are measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(args):
    from fmoe.tiny import tiny_model

    return tiny_model(args.family, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      intermediate_size=args.width, moe_intermediate_size=args.width,
                      shared_expert_intermediate_size=args.width, num_experts=args.experts,
                      num_local_experts=args.experts, n_routed_experts=args.experts,
                      num_experts_per_tok=args.top_k, vocab_size=args.vocab, head_dim=args.hidden // 8,
                      num_attention_heads=8, num_key_value_heads=8)


def batches(args, n):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)} for _ in range(n)]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args) -> dict:
    """Run one measurement (in this process): tokens/s and peak extra memory."""
    import fmoe

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(args)
    data = batches(args, args.steps + 1)
    if args.what in ("pruned_expert", "pruned_layer"):
        plan = fmoe.make_plan(fmoe.score(model, data[:1]), 0.5, args.what.split("_")[1])
        fmoe.prune(model, plan)
    base = rss_mb()
    out = {"weight_bytes": fmoe.weight_bytes(model), "routed_bytes": fmoe.weight_bytes(model, routed_only=True)}

    def train_step(batch):
        model.train()
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def forward(batch):
        with torch.no_grad():
            model.eval()
            model(input_ids=batch["input_ids"])

    run = {"fisher": lambda b: fmoe.score(model, [b], progress=False), "train": train_step}.get(args.what, forward)
    run(data[0])  # warm-up
    start = time.perf_counter()
    for batch in data[1:]:
        run(batch)
    seconds = time.perf_counter() - start
    out.update(tokens_per_s=args.steps * args.batch * args.seq / seconds, peak_extra_mb=rss_mb() - base)
    return out


def spawn(args, what: str) -> dict:
    argv = [sys.executable, __file__, "--child", what] + [f"--{k}={v}" for k, v in vars(args).items()
                                                           if k not in ("child", "what")]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", dest="what", default=None)
    args = p.parse_args()
    if args.what:
        print(json.dumps(measure(args)))
        return
    r = {what: spawn(args, what) for what in ("train", "fisher", "dense", "pruned_expert", "pruned_layer")}
    print(f"model: {args.family} hidden={args.hidden} layers={args.layers} experts={args.experts} top_k={args.top_k} "
          f"width={args.width}; batches {args.batch}x{args.seq}, {args.steps} timed steps, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'run':<22}{'tokens/s':>10}{'peak extra MB':>15}{'weight MB':>11}{'routed MB':>11}")
    for what, v in r.items():
        peak = "n/a" if what.startswith("pruned") else f"{v['peak_extra_mb']:.0f}"  # dense model built first there
        print(f"{what:<22}{v['tokens_per_s']:>10.0f}{peak:>15}"
              f"{v['weight_bytes'] / 2**20:>11.1f}{v['routed_bytes'] / 2**20:>11.1f}")
    print(f"fisher scoring / training step throughput: {r['fisher']['tokens_per_s'] / r['train']['tokens_per_s']:.2f}x "
          f"(target >= 1.3x); peak memory fisher / train: "
          f"{r['fisher']['peak_extra_mb'] / max(r['train']['peak_extra_mb'], 1e-9):.2f}x (target <= 1)")
    for what in ("pruned_expert", "pruned_layer"):
        print(f"{what} (50%): weight bytes {r[what]['weight_bytes'] / r['dense']['weight_bytes']:.2f}x dense "
              f"(routed {r[what]['routed_bytes'] / r['dense']['routed_bytes']:.2f}x), forward throughput "
              f"{r[what]['tokens_per_s'] / r['dense']['tokens_per_s']:.2f}x dense")


if __name__ == "__main__":
    main()
