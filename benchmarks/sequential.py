"""Sequential (layer-order) pruning against one shot, without training: criterion x ratio x {one shot, sequential} x
{plain, least-squares reconstruction} on the shipped toy MoE (CPU), set up as benchmarks/no_training.py.

    python benchmarks/sequential.py                         # the grid -> docs/quality/sequential/
    python benchmarks/sequential.py --criteria '[fisher]' --ratios '[0.75]'   # a part; rows already saved are kept

"sequential" plans layer l from scores of the model with layers 0..l-1 cut (fmoe.methods.dims.sequential); with LS
each layer is also refit by least squares on the activations of the already cut and refit layers before the next
is scored. "one shot" + LS is fmoe.reconstruct on the one-shot plan (activations of the unpruned model). Layer
scope, multiple_of=1, unbounded widths, default ridge. Rows already in `out`/results.json are kept and not run
again, so the grid can be run in parts; results.json and results.md are written after every row.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from jsonargparse import auto_cli
from no_training import scorer
from quality import dense_line, save_results, toy_setup

import fmoe
from fmoe import toy
from fmoe.methods.dims.refit import LAM
from fmoe.methods.dims.sequential import prune_sequentially

CRITERIA = ["router", "fisher", "compensated", "rank(compensated,router)"]
VARIANTS = ("one shot", "sequential")


def main(model_dir: str = str(toy.TOY_DIR), calibrate: str = "arithmetic", n_calibration: int = 256,
         batch_size: int = 16, criteria: list[str] = CRITERIA, ratios: list[float] = [0.5, 0.75], lam: float = LAM,
         split: str = "test", limit: int | None = 100, out: str = "docs/quality/sequential", seed: int = 0,
         threads: int = 2) -> dict:
    t0 = time.perf_counter()
    model, acc, tasks, calib, _ = toy_setup(model_dir, calibrate, n_calibration, batch_size, 0, split, limit, seed,
                                            threads)
    saved = Path(out) / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {
        "dense": acc(model), "calibrate": calibrate, "n_calibration": n_calibration, "split": split, "limit": limit,
        "lam": lam, "rows": [], "seconds": 0}
    done = {(r["criterion"], r["ratio"], r["variant"], r["reconstructed"]) for r in results["rows"]}
    print(f"dense {results['dense']}", flush=True)
    options = dict(multiple_of=1, max_widths=None)

    for criterion in criteria:
        score = scorer(criterion, calib, seed)
        dense_scores, scoring = None, 0.0
        for ratio in ratios:
            for variant in VARIANTS:
                for reconstructed in (False, True):
                    if (criterion, ratio, variant, reconstructed) in done:
                        continue
                    if dense_scores is None:
                        start = time.perf_counter()
                        dense_scores = score(model)
                        scoring = time.perf_counter() - start  # counted in every row: each needs these scores
                    start = time.perf_counter() - scoring
                    pruned = copy.deepcopy(model)
                    if variant == "one shot":
                        plan = fmoe.make_plan(dense_scores, ratio, "layer", model=model, **options)
                        fmoe.reconstruct(pruned, plan, calib, lam=lam) if reconstructed else fmoe.prune(pruned, plan)
                    else:
                        first = iter([dense_scores])  # layer 0 is scored on the dense model: the one-shot scores
                        prune_sequentially(pruned, calib, ratio, lambda m: next(first, None) or score(m),
                                           reconstruct=reconstructed, lam=lam, **options)
                    row = {"criterion": criterion, "ratio": ratio, "variant": variant, "reconstructed": reconstructed,
                           "seconds": round(time.perf_counter() - start, 1), **acc(pruned)}
                    results["rows"].append(row)
                    print(row, flush=True)
                    results["seconds"] += round(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    write(results, Path(out), list(tasks))
    return results


def write(results: dict, out: Path, domains: list[str]) -> None:
    lines = [f"# Sequential against one-shot pruning on the toy MoE (calibrated on {results['calibrate']}, "
             f"{results['n_calibration']} samples; {results['split']} split exact-match accuracy, "
             f"{results['limit']} records per domain)", "",
             dense_line(results["dense"], domains), "",
             "Layer scope, multiple_of=1, unbounded widths, no training. sequential: layer l planned (and, with LS, "
             "refit) on the activations of layers 0..l-1 already cut (and refit). LS: least-squares refit of the kept "
             f"down columns (lam={results['lam']}). seconds: scoring, planning, reconstruction and pruning on 2 CPU "
             "cores (a shared machine: compare within a row group only).", "",
             "| ratio | criterion | variant | LS | seconds | " + " | ".join(domains) + " |",
             "|---|---|---|---|---|" + "---|" * len(domains)]
    order = {c: i for i, c in enumerate(CRITERIA)}
    for r in sorted(results["rows"], key=lambda r: (r["ratio"], order.get(r["criterion"], 99), r["criterion"],
                                                     r["reconstructed"], r["variant"])):
        lines.append(f"| {r['ratio']} | {r['criterion']} | {r['variant']} | {'yes' if r['reconstructed'] else 'no'} | "
                     f"{r['seconds']} | " + " | ".join(f"{r[d]:.2f}" for d in domains) + " |")
    lines += ["", f"({results['seconds']} s in all on CPU.) Command: `python benchmarks/sequential.py` (the grid; run "
              "here in parts, e.g. `--criteria '[\"rank(compensated,router)\"]' --ratios '[0.75]'`, each part adding its "
              "rows to results.json)"]
    save_results(out, results, lines)


if __name__ == "__main__":
    auto_cli(main)
