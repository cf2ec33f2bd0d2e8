"""What bounding the distinct widths per layer costs: accuracy of the toy MoE pruned at layer and global scope with
`make_plan(max_widths=...)` against unbounded widths (CPU, a few minutes).

    python benchmarks/max_widths.py                                  # -> docs/quality/max_widths.md
    python benchmarks/max_widths.py --ratios '[0.5]' --limit 40 --out /tmp/widths

Ragged experts run one grouped matmul per distinct width in a layer, so fewer widths run faster; the plan keeps
each layer's budget and moves dims between experts to meet the bound. Masked accuracy (= pruned, see
tests/test_prune.py) with multiple_of=1, as in benchmarks/quality.py, plus the share of the total score the removed dims held.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli

import fmoe
from fmoe import toy
from fmoe.evaluation.tasks import accuracy, load_tasks


def kept_mass(scores: fmoe.Scores, plan: fmoe.PruningPlan) -> float:
    """Share of the total score that the plan's kept dims hold."""
    kept = sum(float(scores.tensors[n][e, k].double().sum()) for n, ks in plan.keep.items() for e, k in enumerate(ks))
    return kept / sum(float(t.double().sum()) for t in scores.tensors.values())


def main(model_dir: str = str(toy.TOY_DIR), calibrate: str = "arithmetic", n_calibration: int = 256,
         batch_size: int = 16, criterion: str = "fisher", scopes: list[str] = ["layer", "global"],
         ratios: list[float] = [0.5, 0.75], max_widths: list[int | None] = [None, 4, 2, 1],
         split: str = "test", limit: int | None = None, out: str = "docs/quality", threads: int = 2) -> list[dict]:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, tokenizer, config = toy.load(model_dir)
    files = toy.corpus_files(config)
    tasks = {d: load_tasks(files[d][split], limit) for d in files}
    texts = [r["text"] for r in toy.read_jsonl(files[calibrate]["train"])][:n_calibration]
    scores = fmoe.score(model, toy.batches(tokenizer, texts, batch_size), criterion, progress=False)
    rows = []
    for scope in scopes:
        for ratio in ratios:
            for bound in max_widths:
                plan = fmoe.make_plan(scores, ratio, scope, multiple_of=1, max_widths=bound, model=model)
                with fmoe.masked(model, plan):
                    row = {"scope": scope, "ratio": ratio, "max_widths": bound,
                           "widths": max(len(set(ws)) for ws in plan.kept_widths().values()),
                           "removed": round(plan.removed_fraction(), 4), "mass_lost": float(f"{1 - kept_mass(scores, plan):.3g}"),
                           **{d: round(accuracy(model, tokenizer, *tasks[d]), 4) for d in tasks}}
                rows.append(row)
                print(row, flush=True)
    write(rows, Path(out), list(tasks), criterion, round(time.perf_counter() - t0))
    return rows


def write(rows: list[dict], out: Path, domains: list[str], criterion: str, seconds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "max_widths.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# Bounding distinct widths per layer on the toy MoE ({criterion} scores, masked exact-match accuracy)",
             "", "| scope | ratio | max_widths | widths (most in a layer) | removed | score mass lost | "
             + " | ".join(domains) + " |", "|---|---|---|---|---|---|" + "---|" * len(domains)]
    for r in rows:
        lines.append(f"| {r['scope']} | {r['ratio']} | {r['max_widths'] or 'unbounded'} | {r['widths']} | "
                     f"{r['removed']:.4f} | {r['mass_lost']:.3g} | " + " | ".join(f"{r[d]:.3f}" for d in domains) + " |")
    lines += ["", f"({seconds} s on CPU)"]
    (out / "max_widths.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    auto_cli(main)
