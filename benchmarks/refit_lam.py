"""The least-squares refit's ridge `lam` against calibration size, on the shipped toy MoE (CPU, ~30 s on 2 cores).

    python benchmarks/refit_lam.py                             # -> docs/quality/refit/
    python benchmarks/refit_lam.py --lams '[0.1]' --out /tmp/refit

A 0.5 magnitude plan (layer scope, fmoe.make_plan defaults) refit by fmoe.reconstruct from the first 2, 8, 16,
32 and 64 training sequences of the toy corpus (the domains in turn); held-out NLL per token on `limit` sequences
per domain of the validation split (which chooses the default lam) and of the test split (which reports it).
Grams are sums over tokens, so each size's statistics are the sum of those of consecutive groups, gathered once.
Writes results.json and results.md to `out`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli
from quality import save_results

import fmoe
from fmoe import toy
from fmoe.calibration.loss import corpus_nll
from fmoe.calibration.gram import gather
from fmoe.methods.dims.refit import solutions, write


def main(model_dir: str = str(toy.TOY_DIR), sizes: list[int] = [2, 8, 16, 32, 64], ratio: float = 0.5,
         method: str = "magnitude", lams: list[float] = [0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
         limit: int = 64, batch_size: int = 16, out: str = "docs/quality/refit", threads: int = 2) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    model, tokenizer, config = toy.load(model_dir)
    files = toy.corpus_files(config)
    calib = toy.batches(tokenizer, toy.interleaved(files, "train", None)[: max(sizes)], 1)  # one sequence per batch
    held = {s: toy.batches(tokenizer, toy.interleaved(files, s, limit), batch_size) for s in ("val", "test")}
    plan = fmoe.make_plan(fmoe.score(model, criterion=method), ratio, "layer", model=model)
    plain = fmoe.prune(copy.deepcopy(model), plan)
    results = {"method": method, "ratio": ratio, "limit": limit, "kept_widths": plan.kept_widths(),
               "dense": {s: corpus_nll(model, b) for s, b in held.items()},
               "pruned": {s: corpus_nll(plain, b) for s, b in held.items()}, "rows": []}
    print(results["dense"], results["pruned"], flush=True)
    stats, start = None, 0
    for size in sorted(sizes):
        part = gather(model, calib[start:size])
        stats, start = (part if stats is None else stats + part), size
        least = min(int(c.min()) for c in stats.counts.values())
        for lam in lams:
            refit = write(copy.deepcopy(plain), solutions(stats, plan, lam))
            row = {"sequences": size, "tokens": stats.tokens, "fewest_expert_tokens": least, "lam": lam,
                   **{s: corpus_nll(refit, b) for s, b in held.items()}}
            results["rows"].append(row)
            print(row, flush=True)
    results["seconds"] = round(time.perf_counter() - t0)
    results["chosen"] = choose(results)
    save_results(Path(out), results, table(results))
    return results


def choose(results: dict) -> float:
    """The lam of the lowest mean validation NLL over the sizes, among those never above the plainly pruned
    model's validation NLL at any size."""
    lams = sorted({r["lam"] for r in results["rows"]})
    per_lam = {lam: [r["val"] for r in results["rows"] if r["lam"] == lam] for lam in lams}
    safe = [lam for lam, v in per_lam.items() if max(v) <= results["pruned"]["val"]] or lams
    return min(safe, key=lambda lam: sum(per_lam[lam]) / len(per_lam[lam]))


def table(results: dict) -> list[str]:
    """results.md: held-out NLL per calibration size (rows) and lam (columns), validation / test."""
    lams = sorted({r["lam"] for r in results["rows"]})
    sizes = sorted({r["sequences"] for r in results["rows"]})
    cell = {(r["sequences"], r["lam"]): r for r in results["rows"]}
    dense, pruned = results["dense"], results["pruned"]
    lines = [f"# Least-squares refit: held-out NLL by calibration size and lam ({results['method']} plan, "
             f"{results['ratio']} removed, toy MoE; validation / test, {results['limit']} sequences per domain)", "",
             f"dense {dense['val']:.4f} / {dense['test']:.4f}; pruned without refit {pruned['val']:.4f} / "
             f"{pruned['test']:.4f}; chosen (lowest mean validation NLL, never above pruned there): "
             f"lam={results['chosen']:g}", "",
             "| sequences | tokens | " + " | ".join(f"lam={lam:g}" for lam in lams) + " |",
             "|---|---|" + "---|" * len(lams)]
    for size in sizes:
        row = [cell[size, lam] for lam in lams]
        lines.append(f"| {size} | {row[0]['tokens']} | " + " | ".join(f"{r['val']:.4f} / {r['test']:.4f}" for r in row)
                     + " |")
    lines += ["", f"({results['seconds']} s on CPU)"]
    return lines


if __name__ == "__main__":
    auto_cli(main)
