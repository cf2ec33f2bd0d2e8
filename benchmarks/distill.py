"""Recovery by the data loss against recovery by distillation from the dense model, at 50% and 75% of routed dims
removed from the shipped toy MoE (CPU).

    python benchmarks/distill.py                          # the full grid (~8 min on 1 thread) -> docs/quality/distill/
    python benchmarks/distill.py --ratios '[0.75]' --variants '[lora-ce, lora-kd]' --seeds '[0]' --out /tmp/kd

Pruning: Fisher on the first 256 arithmetic training problems, layer scope, multiple_of=1, unbounded widths, one
shot; each ratio's pruned model is made once and copied for every recovery. Recovery: `steps` steps on the
arithmetic training texts after the calibration ones (fmoe.lightning.recovery.LoRARecovery through
benchmarks/quality.py's `recovered`), with the unpruned model as the teacher of the KD variants:
loss = kd_weight * T^2 * KL(teacher || student) + (1 - kd_weight) * NLL (fmoe.recovery.distill). "lora-*" train rank-`r`
adapters at `lr`; "experts-*" train the routed experts' own weights (r=0, tune_experts) at `experts_lr` (1e-3:
the best of 1e-4, 3e-4, 1e-3, 3e-3 for experts-ce at 75% on the val split, seed 0). Each
seed re-seeds the adapters' initialisation and shuffles the order of the training batches. Rows give exact-match
accuracy per domain (`split`, `limit` records per domain: arithmetic is the recovered domain, the others are
never trained on) and the seconds each recovery took (fit + merge); results.md gives the mean over seeds and min-max.
One thread by default: on a 2-core machine shared with other jobs, two threads ran up to 40x slower. Writes
results.json and results.md to `out`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from jsonargparse import auto_cli
from quality import dense_line, recovered, save_results, toy_setup

import fmoe
from fmoe import toy

# name -> recovery options; teacher=True stands for the dense model, lr=None for the adapters' `lr`
VARIANTS = {
    "lora-ce": {},
    "lora-kd": dict(teacher=True, kd_weight=1.0, temperature=1.0),
    "lora-kd+ce": dict(teacher=True, kd_weight=0.5, temperature=1.0),
    "lora-kd T=2": dict(teacher=True, kd_weight=1.0, temperature=2.0),
    "experts-ce": dict(r=0, tune_experts=True),
    "experts-kd": dict(r=0, tune_experts=True, teacher=True, kd_weight=1.0, temperature=1.0),
}


def shuffled(batches: list, seed: int) -> list:
    """The training batches in a seeded order."""
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def main(model_dir: str = str(toy.TOY_DIR), calibrate: str = "arithmetic", n_calibration: int = 256,
         batch_size: int = 16, ratios: list[float] = [0.5, 0.75], variants: list[str] = list(VARIANTS),
         steps: int = 100, r: int = 8, lr: float = 1e-3, experts_lr: float = 1e-3, seeds: list[int] = [0, 1, 2],
         split: str = "test", limit: int | None = 100, out: str = "docs/quality/distill", threads: int = 1) -> dict:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; valid: {list(VARIANTS)}")
    t0 = time.perf_counter()
    model, acc, domains, calib, train = toy_setup(model_dir, calibrate, n_calibration, batch_size, steps, split,
                                                  limit, 0, threads)
    teacher = copy.deepcopy(model)  # the dense model, never pruned
    results = {"dense": acc(model), "calibrate": calibrate, "n_calibration": n_calibration, "split": split,
               "limit": limit, "batch_size": batch_size, "steps": steps, "r": r, "lr": lr, "experts_lr": experts_lr,
               "seeds": seeds, "threads": threads,
               "variants": {v: {**VARIANTS[v], "teacher": "dense" if VARIANTS[v].get("teacher") else None}
                            for v in variants}, "rows": []}
    print(f"dense {results['dense']}", flush=True)
    scores = fmoe.score(model, calib, "fisher", progress=False)

    for ratio in ratios:
        plan = fmoe.make_plan(scores, ratio, "layer", model=model, multiple_of=1, max_widths=None)
        pruned = fmoe.prune(copy.deepcopy(model), plan)
        row = {"ratio": ratio, "variant": "none", "seed": None, "seconds": 0.0, **acc(pruned)}
        results["rows"].append(row)
        print(row, flush=True)
        for variant in variants:
            options = dict(VARIANTS[variant])
            options["r"] = options.get("r", r)
            options["lr"] = experts_lr if options.get("tune_experts") else lr
            if options.pop("teacher", False):
                options["teacher"] = teacher
            for seed in seeds:
                L.seed_everything(seed, verbose=False)
                start = time.perf_counter()
                tuned = recovered(copy.deepcopy(pruned), shuffled(train, seed), steps, **options)
                row = {"ratio": ratio, "variant": variant, "seed": seed,
                       "seconds": round(time.perf_counter() - start, 1), **acc(tuned)}
                results["rows"].append(row)
                print(row, flush=True)
    results["summary"] = summary(results["rows"], domains)
    results["seconds"] = round(time.perf_counter() - t0)
    write(results, Path(out), domains)
    return results


def summary(rows: list[dict], domains: list[str]) -> list[dict]:
    """Per (ratio, variant): mean, min and max over seeds of each domain's accuracy, and the mean seconds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["ratio"], row["variant"]), []).append(row)
    out = []
    for (ratio, variant), runs in groups.items():
        entry = {"ratio": ratio, "variant": variant, "runs": len(runs),
                 "seconds": round(sum(r["seconds"] for r in runs) / len(runs), 1)}
        for d in domains:
            values = [r[d] for r in runs]
            entry[d] = {"mean": round(sum(values) / len(values), 4), "min": min(values), "max": max(values)}
        out.append(entry)
    return out


def cell(stats: dict) -> str:
    """mean (min-max), or the mean alone when every seed agrees."""
    spread = f" ({stats['min']:.2f}-{stats['max']:.2f})" if stats["min"] != stats["max"] else ""
    return f"{stats['mean']:.3f}{spread}"


def write(results: dict, out: Path, domains: list[str]) -> None:
    dense = results["dense"]
    lines = [f"# Recovery by the data loss vs distillation from the dense model on the toy MoE ({results['split']} "
             f"split exact-match accuracy, {results['limit']} records per domain)", "",
             dense_line(dense, domains), "",
             f"Fisher on {results['n_calibration']} {results['calibrate']} problems, layer scope, multiple_of=1, "
             f"unbounded widths, one shot. Recovery: {results['steps']} steps on {results['calibrate']} "
             f"(batch {results['batch_size']}); lora-*: r={results['r']}, lr={results['lr']}; experts-*: the routed "
             f"experts' weights, lr={results['experts_lr']}. ce: data loss; kd: KL to the dense model (T=1 unless "
             f"named; kd+ce: 0.5 each). Mean over seeds {results['seeds']} (min-max); seconds: one recovery "
             f"(fit + merge) on {results['threads']} CPU thread(s), mean over seeds.", "",
             "| ratio | recovery | " + " | ".join(domains) + " | seconds |",
             "|---|---|" + "---|" * len(domains) + "---|"]
    for s in results["summary"]:
        lines.append(f"| {s['ratio']} | {s['variant']} | " + " | ".join(cell(s[d]) for d in domains)
                     + f" | {s['seconds'] if s['variant'] != 'none' else '–'} |")
    lines += ["", f"({results['seconds']} s in all on CPU)"]
    save_results(out, results, lines)


if __name__ == "__main__":
    auto_cli(main)
