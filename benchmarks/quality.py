"""Which criterion and scope keep capability: pruning sweeps and critical dims on the shipped toy MoE (CPU).

    python benchmarks/quality.py                     # full sweep (~15 min on 2 cores) -> docs/quality/
    python benchmarks/quality.py --ratios '[0.5]' --scopes '[layer]' --lora_steps 0 --limit 40 --out /tmp/q

Calibrates on one domain of the toy corpus (arithmetic by default), scores every routed dim with every criterion,
then reports exact-match accuracy per domain (test split) for criterion x scope x ratio, masked (= pruned, see
tests/test_prune.py) and, with lora_steps > 0, physically pruned + LoRA-recovered on the calibration domain.
Critical dims: accuracy after removing the top-k dims of each criterion, against k random dims (3 seeds).
Writes results.json, results.md and two plots to `out`.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from jsonargparse import auto_cli

import fmoe
from fmoe import toy
from fmoe.evaluation.critical import keep_except, random_dims, top_dims
from fmoe.lightning.recovery import LoRARecovery
from fmoe.methods.dims.plan import SCOPES
from fmoe.calibration.criteria import CRITERIA
from fmoe.evaluation.tasks import accuracy, load_tasks

RANDOM_SEEDS = (0, 1, 2)


def recovered(pruned, train_batches, steps: int, r: int, lr: float, **options):
    """LoRA-tune a compressed model on `train_batches` with Lightning (in place), merge; `options` go to
    LoRARecovery."""
    recovery = LoRARecovery(pruned, r=r, alpha=2 * r, lr=lr, eval_names=(), **options)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, limit_val_batches=0, accelerator="cpu", devices=1)
    trainer.fit(recovery, train_dataloaders=torch.utils.data.DataLoader(train_batches, batch_size=None, shuffle=False))
    return recovery.merged().eval()


def toy_setup(model_dir: str, calibrate: str, n_calibration: int, batch_size: int, lora_steps: int, split: str,
              limit: int | None, seed: int, threads: int):
    """(toy model, acc(model) -> {domain: exact-match accuracy}, the domains, calibration batches: the first
    `n_calibration` training texts of `calibrate`, LoRA batches: the texts after them) for the toy benchmarks."""
    torch.set_num_threads(threads)
    L.seed_everything(seed, verbose=False)
    model, tokenizer, config = toy.load(model_dir)
    files = toy.corpus_files(config)
    tasks = {d: load_tasks(files[d][split], limit) for d in files}

    def acc(m) -> dict[str, float]:
        return {d: round(accuracy(m, tokenizer, *tasks[d]), 4) for d in tasks}

    texts = [r["text"] for r in toy.read_jsonl(files[calibrate]["train"])]
    calib = toy.batches(tokenizer, texts[:n_calibration], batch_size)
    lora_texts = texts[n_calibration: n_calibration + lora_steps * batch_size]
    return model, acc, list(tasks), calib, toy.batches(tokenizer, lora_texts, batch_size) if lora_texts else []


def main(model_dir: str = str(toy.TOY_DIR), calibrate: str = "arithmetic", n_calibration: int = 256,
         batch_size: int = 16, criteria: list[str] = list(CRITERIA), scopes: list[str] = list(SCOPES),
         ratios: list[float] = [0.25, 0.5, 0.75], ks: list[int] = [1, 4, 12, 32, 128], lora_steps: int = 100,
         lora_r: int = 8, lora_lr: float = 1e-3, split: str = "test", limit: int | None = None,
         out: str = "docs/quality", seed: int = 0, threads: int = 2) -> dict:
    t0 = time.perf_counter()
    model, acc, tasks, calib, lora_data = toy_setup(model_dir, calibrate, n_calibration, batch_size, lora_steps,
                                                    split, limit, seed, threads)
    results = {"dense": acc(model), "calibrate": calibrate, "n_calibration": n_calibration, "split": split,
               "limit": limit, "lora": {"steps": lora_steps, "r": lora_r, "lr": lora_lr}, "sweep": [], "critical": []}
    print(f"dense {results['dense']}", flush=True)
    scores = {m: fmoe.score(model, calib, m, seed=seed, progress=False) for m in criteria}

    for criterion in criteria:
        for scope in scopes:
            for ratio in ratios:
                # multiple_of=1: every criterion and scope removes exactly the same number of dims; unbounded widths
                # per layer (benchmarks/max_widths.py measures what bounding them costs)
                plan = fmoe.make_plan(scores[criterion], ratio, scope, multiple_of=1, max_widths=None, model=model)
                with fmoe.masked(model, plan):
                    row = {"criterion": criterion, "scope": scope, "ratio": ratio, "lora": False, **acc(model)}
                results["sweep"].append(row)
                print(row, flush=True)
                if lora_steps > 0:
                    row = {**row, "lora": True, **acc(recovered(fmoe.prune(copy.deepcopy(model), plan), lora_data, lora_steps, lora_r, lora_lr))}
                    results["sweep"].append(row)
                    print(row, flush=True)

    any_scores = scores[criteria[0]]
    for k in ks:
        for criterion in criteria:
            if criterion == "random":
                continue
            with fmoe.masked(model, keep_except(scores[criterion], top_dims(scores[criterion], k))):
                row = {"criterion": criterion, "k": k, **acc(model)}
            results["critical"].append(row)
            print(row, flush=True)
        runs = []
        for s in RANDOM_SEEDS:
            with fmoe.masked(model, keep_except(any_scores, random_dims(any_scores, k, seed=s))):
                runs.append(acc(model))
        row = {"criterion": "random", "k": k, **{d: round(sum(r[d] for r in runs) / len(runs), 4) for d in tasks}}
        results["critical"].append(row)
        print(row, flush=True)

    results["seconds"] = round(time.perf_counter() - t0)
    write(results, Path(out), list(tasks))
    return results


def dense_line(dense: dict, domains: list[str]) -> str:
    """results.md's line of the unpruned model's accuracy per domain."""
    return "dense: " + ", ".join(f"{d} {dense[d]:.3f}" for d in domains)


def save_results(out: Path, results: dict, lines: list[str]) -> None:
    """results.json (everything measured) and results.md (`lines`) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")


def write(results: dict, out: Path, domains: list[str]) -> None:
    dense = results["dense"]
    lines = [f"# Pruning quality on the toy MoE (calibrated on {results['calibrate']}, "
             f"{results['n_calibration']} samples; {results['split']} split exact-match accuracy)", "",
             dense_line(dense, domains), "",
             "## Criterion x scope x ratio (masked; with LoRA recovery after the arrow)", "",
             "| criterion | scope | ratio | " + " | ".join(domains) + " |", "|---|---|---|" + "---|" * len(domains)]
    with_lora = {(r["criterion"], r["scope"], r["ratio"]): r for r in results["sweep"] if r["lora"]}
    for r in (r for r in results["sweep"] if not r["lora"]):
        lr = with_lora.get((r["criterion"], r["scope"], r["ratio"]))
        cells = [f"{r[d]:.3f}" + (f" → {lr[d]:.3f}" if lr else "") for d in domains]
        lines.append(f"| {r['criterion']} | {r['scope']} | {r['ratio']} | " + " | ".join(cells) + " |")
    lines += ["", "## Critical dims: accuracy after removing the top-k dims of a criterion (random: mean of 3 seeds)",
              "", "| k | criterion | " + " | ".join(domains) + " |", "|---|---|" + "---|" * len(domains)]
    for r in results["critical"]:
        lines.append(f"| {r['k']} | {r['criterion']} | " + " | ".join(f"{r[d]:.3f}" for d in domains) + " |")
    lines += ["", f"({results['seconds']} s on CPU)"]
    save_results(out, results, lines)
    plot(results, out, domains)


def plot(results: dict, out: Path, domains: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["sweep"] if not r["lora"]]
    scopes = sorted({r["scope"] for r in rows}, key=SCOPES.index)
    fig, axes = plt.subplots(len(scopes), len(domains), figsize=(4 * len(domains), 3 * len(scopes)), squeeze=False)
    for i, scope in enumerate(scopes):
        for j, d in enumerate(domains):
            ax = axes[i][j]
            for crit in dict.fromkeys(r["criterion"] for r in rows):
                pts = sorted((r["ratio"], r[d]) for r in rows if r["criterion"] == crit and r["scope"] == scope)
                ax.plot([0] + [p[0] for p in pts], [results["dense"][d]] + [p[1] for p in pts], marker="o", label=crit)
            ax.set(title=f"{d} ({scope} scope)", xlabel="share of routed dims removed", ylabel="accuracy", ylim=(0, 1))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=110)
    plt.close(fig)

    crit_rows = results["critical"]
    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3), squeeze=False)
    for j, d in enumerate(domains):
        ax = axes[0][j]
        for crit in dict.fromkeys(r["criterion"] for r in crit_rows):
            pts = sorted((r["k"], r[d]) for r in crit_rows if r["criterion"] == crit)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=crit,
                    linestyle="--" if crit == "random" else "-")
        ax.set(title=d, xlabel="top-k dims removed", ylabel="accuracy", xscale="log", ylim=(0, 1))
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "critical.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    auto_cli(main)
