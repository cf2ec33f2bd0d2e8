"""How much capability survives high compression with no gradient training: criterion x {one shot, iterative} x
{plain, least-squares reconstruction} at 50%, 75% and 90% of routed dims removed, on the shipped toy MoE (CPU).

    python benchmarks/no_training.py                        # the full grid (~8 min on 2 cores) -> docs/quality/no_training/
    python benchmarks/no_training.py --ratios '[0.75]' --criteria '[router]' --lora_steps 0 --limit 30 --out /tmp/nt

Calibration: the first 256 arithmetic training problems; layer scope, multiple_of=1, unbounded widths per layer (as
benchmarks/quality.py). "iterative" removes the share in `steps` equal steps, scoring the partly pruned model again
each time (fmoe.prune_iteratively); "reconstructed" refits each kept down projection by least squares on the
calibration tokens of the unpruned model (fmoe.reconstruct). Each row gives exact-match accuracy per domain (test
split), the seconds its compression took (scoring, planning, reconstruction), and, with lora_steps > 0, the same
after LoRA on arithmetic (at `lora_ratios`, 75% by default, to keep the grid short). `rank(a,b)`
criteria average the two criteria's per-layer ranks (fmoe.calibration.scores.rank_mean).
grad_abs and random run one shot only (grad_abs takes one backward per sequence; random does not change when
re-scored). Writes results.json and results.md to `out`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli
from quality import dense_line, recovered, save_results, toy_setup

import fmoe
from fmoe import toy
from fmoe.methods.dims.iterative import iterate
from fmoe.methods.dims.refit import LAM
from fmoe.calibration.scores import rank_mean

CRITERIA = ["fisher", "router", "activation", "magnitude", "compensated", "rank(fisher,router)",
            "rank(compensated,router)", "grad_abs", "random"]
ONE_SHOT_ONLY = ("grad_abs", "random", "magnitude")  # re-scoring changes nothing (magnitude, random) or is slow


def scorer(criterion: str, batches, seed: int):
    """model -> Scores for a criterion, a rank combination `rank(a,b)` included."""
    if criterion.startswith("rank("):
        parts = criterion[5:-1].split(",")
        return lambda model: rank_mean(*(fmoe.score(model, batches, p, seed=seed, progress=False) for p in parts))
    return lambda model: fmoe.score(model, batches, criterion, seed=seed, progress=False)


def main(model_dir: str = str(toy.TOY_DIR), calibrate: str = "arithmetic", n_calibration: int = 256,
         batch_size: int = 16, criteria: list[str] = CRITERIA, ratios: list[float] = [0.5, 0.75, 0.9],
         steps: int = 5, lam: float = LAM, lora_steps: int = 100, lora_ratios: list[float] = [0.75],
         lora_r: int = 8, lora_lr: float = 1e-3,
         split: str = "test", limit: int | None = 100, out: str = "docs/quality/no_training", seed: int = 0,
         threads: int = 2) -> dict:
    t0 = time.perf_counter()
    model, acc, tasks, calib, lora_data = toy_setup(model_dir, calibrate, n_calibration, batch_size, lora_steps,
                                                    split, limit, seed, threads)
    results = {"dense": acc(model), "calibrate": calibrate, "n_calibration": n_calibration, "split": split,
               "limit": limit, "steps": steps, "lam": lam,
               "lora": {"steps": lora_steps, "ratios": lora_ratios, "r": lora_r, "lr": lora_lr}, "rows": []}
    print(f"dense {results['dense']}", flush=True)
    options = dict(multiple_of=1, max_widths=None)

    for criterion in criteria:
        score = scorer(criterion, calib, seed)
        start = time.perf_counter()
        one_shot_scores = score(model)
        scoring_seconds = time.perf_counter() - start
        for ratio in ratios:
            plans = {}
            start = time.perf_counter()
            plans["one shot"] = fmoe.make_plan(one_shot_scores, ratio, "layer", model=model, **options)
            seconds = {"one shot": scoring_seconds + time.perf_counter() - start}
            if criterion not in ONE_SHOT_ONLY:
                start = time.perf_counter()
                working = copy.deepcopy(model)
                plans["iterative"], _ = iterate(working, ratio, steps, "layer", lambda step: score(working), **options)
                seconds["iterative"] = time.perf_counter() - start
            for variant, plan in plans.items():
                for reconstructed in (False, True):
                    start = time.perf_counter()
                    pruned = copy.deepcopy(model)
                    pruned = fmoe.reconstruct(pruned, plan, calib, lam=lam) if reconstructed else fmoe.prune(pruned, plan)
                    row = {"criterion": criterion, "ratio": ratio, "variant": variant, "reconstructed": reconstructed,
                           "seconds": round(seconds[variant] + time.perf_counter() - start, 1), **acc(pruned)}
                    if lora_steps > 0 and ratio in lora_ratios:
                        tuned = recovered(pruned, lora_data, lora_steps, lora_r, lora_lr)
                        row["lora"] = acc(tuned)
                    results["rows"].append(row)
                    print(row, flush=True)
    results["seconds"] = round(time.perf_counter() - t0)
    write(results, Path(out), list(tasks))
    return results


def write(results: dict, out: Path, domains: list[str]) -> None:
    dense = results["dense"]
    lora = results["lora"]["steps"] > 0
    lines = [f"# Compression without training on the toy MoE (calibrated on {results['calibrate']}, "
             f"{results['n_calibration']} samples; {results['split']} split exact-match accuracy, "
             f"{results['limit']} records per domain)", "",
             dense_line(dense, domains), "",
             f"Layer scope, multiple_of=1, unbounded widths. iterative: {results['steps']} equal steps, re-scored each "
             f"step. LS: least-squares refit of the kept down columns (lam={results['lam']}). seconds: scoring + "
             "planning + reconstruction on 2 CPU cores." + (f" After the arrow (at {results['lora']['ratios']}): + "
                                                             f"{results['lora']['steps']} LoRA steps on arithmetic."
                                                             if lora else ""), "",
             "| ratio | criterion | variant | LS | seconds | " + " | ".join(domains) + " |",
             "|---|---|---|---|---|" + "---|" * len(domains)]
    for r in sorted(results["rows"], key=lambda r: (r["ratio"], -r["arithmetic"])):
        cells = [f"{r[d]:.2f}" + (f" → {r['lora'][d]:.2f}" if "lora" in r else "") for d in domains]
        lines.append(f"| {r['ratio']} | {r['criterion']} | {r['variant']} | {'yes' if r['reconstructed'] else 'no'} | "
                     f"{r['seconds']} | " + " | ".join(cells) + " |")
    lines += ["", f"({results['seconds']} s in all on CPU)"]
    save_results(out, results, lines)


if __name__ == "__main__":
    auto_cli(main)
