"""Which compression method, at which budget: every registered method on the shipped toy MoE, one calibration (CPU).

    python benchmarks/methods.py                                   # the full comparison (~10 min on 2 cores)
    python benchmarks/methods.py --amounts '[0.5]' --lora_steps 0 --limit 30 --out /tmp/m   # a quick look

One calibration pass on arithmetic (dim Fisher + expert and layer statistics) plans every method of
fmoe.methods.METHODS at equal shares of routed parameters removed (25% and 50%); each compressed model is
measured (exact-match accuracy per domain, test split) before and after LoRA recovery on arithmetic. Compressed
experts remove compute, not parameters, so they are compared at equal active parameters (top-2 -> 1 computed
expert) with the other ways to halve the routed compute per token: top-1 routing with the vectors untrained, and
50% of routed dims removed. Writes results.json, results.md and methods.png to `out`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from jsonargparse import auto_cli
from quality import dense_line, recovered, save_results, toy_setup

import fmoe
from fmoe import methods, toy

# (label, method, options): the dims row plans like benchmarks/quality.py (exact budgets, unbounded widths)
RUNS = [
    ("dims (fisher, layer)", "dims", {"scope": "layer", "multiple_of": 1, "max_widths": None}),
    ("expert drop (router)", "expert_drop", {}),
    ("expert drop (frequency)", "expert_frequency", {}),
    ("REAP", "reap", {}),
    ("expert drop (expert Fisher)", "expert_fisher", {}),
    ("layer drop", "layer_drop", {}),
    ("block drop (discrete)", "block_drop", {"mode": "discrete"}),
    ("block drop (consecutive)", "block_drop", {"mode": "consecutive"}),
]


def main(model_dir: str = str(toy.TOY_DIR), calibrate: str = "arithmetic", n_calibration: int = 256,
         batch_size: int = 16, amounts: list[float] = [0.25, 0.5], lora_steps: int = 100, lora_r: int = 8,
         lora_lr: float = 1e-3, split: str = "test", limit: int | None = 100, out: str = "docs/quality/methods",
         seed: int = 0, threads: int = 2) -> dict:
    t0 = time.perf_counter()
    model, acc, tasks, calib, lora_data = toy_setup(model_dir, calibrate, n_calibration, batch_size, lora_steps,
                                                    split, limit, seed, threads)

    def measure(m, label: str, amount, plan=None, **extra) -> dict:
        row = {"method": label, "amount": amount, "params": sum(p.numel() for p in m.parameters()),
               "active": int(fmoe.active_parameters(m)),
               "achieved": None if plan is None else plan.meta.get("achieved"), **extra, **acc(m)}
        print(row, flush=True)
        return row

    start = time.perf_counter()
    calibration = methods.calibrate(model, calib)
    results = {"calibrate": calibrate, "n_calibration": n_calibration, "split": split, "limit": limit,
               "calibration_seconds": round(time.perf_counter() - start, 1),
               "lora": {"steps": lora_steps, "r": lora_r, "lr": lora_lr}, "rows": []}
    dense = measure(model, "dense", 0.0)
    results["rows"].append(dense)
    routed = sum(p.numel() for m in fmoe.find_experts(model).values() for p in m.parameters())

    def run(label, name, amount, **options):
        compressed = copy.deepcopy(model)
        plan = methods.compress(compressed, name, amount, calibration, **options)
        results["rows"].append(measure(compressed, label, amount, plan, lora=False))
        if lora_steps > 0:
            tuned = recovered(compressed, lora_data, lora_steps, lora_r, lora_lr)
            results["rows"].append(measure(tuned, label, amount, plan, lora=True))

    for amount in amounts:
        for label, name, options in RUNS:
            run(label, name, amount, **options)

    # equal active parameters: half the routed compute per token (dims at 50% above), two more ways
    top1 = methods.compress(copy.deepcopy(model), "compressed_experts", 0.5)
    for label, vectors in (("top-1 routing", False), ("compressed experts", True)):
        compressed = copy.deepcopy(model)
        methods.compress(compressed, "compressed_experts", 0.5)
        results["rows"].append(measure(compressed, label, 0.5, top1, lora=False))
        if lora_steps > 0:
            tuned = recovered(compressed, lora_data, lora_steps, lora_r, lora_lr, compressed=vectors)
            results["rows"].append(measure(tuned, label, 0.5, top1, lora=True))
    results["oracle"] = oracle(model, calibration, calib[: max(1, len(calib) // 4)])
    results["routed_params"] = routed
    results["seconds"] = round(time.perf_counter() - t0)
    write(results, Path(out), list(tasks))
    return results


def oracle(model, calibration, batches) -> dict:
    """How well each expert criterion predicts what removing one expert costs: the calibration loss increase when
    expert e alone is dropped (its router row deleted), for every expert of every layer, against each criterion's
    score; Spearman correlation within each layer (a higher score should mean a larger loss increase), averaged."""
    from fmoe.methods.expert_drop import ExpertPlan, drop_experts, expert_sizes
    from fmoe.calibration.loss import mean_nll, prepare_batch

    def loss(m) -> float:
        with torch.no_grad():
            return sum(float(mean_nll(m, prepare_batch(b, "cpu"))[0]) for b in batches) / len(batches)

    base, modules = loss(model), fmoe.find_experts(model)
    increase = {}
    for name, module in modules.items():
        n = module.down_proj.shape[0]
        rise = []
        for e in range(n):
            keep = {k: [i for i in range(m.down_proj.shape[0]) if k != name or i != e] for k, m in modules.items()}
            plan = ExpertPlan(keep, {k: m.down_proj.shape[0] for k, m in modules.items()},
                              {k: expert_sizes(m) for k, m in modules.items()}, fmoe.fingerprint(model))
            rise.append(loss(drop_experts(copy.deepcopy(model), plan)) - base)
        increase[name] = torch.tensor(rise)

    def rank(t):
        return t.argsort().argsort().double()

    out = {}
    for criterion, tensors in calibration.statistics.experts.items():
        per_layer = [float(torch.corrcoef(torch.stack([rank(tensors[n]), rank(increase[n])]))[0, 1]) for n in modules]
        out[criterion] = round(sum(per_layer) / len(per_layer), 3)
    out["loss"] = round(base, 4)
    return out


def write(results: dict, out: Path, domains: list[str]) -> None:
    rows = results["rows"]
    dense = rows[0]
    lines = [f"# Compression methods on the toy MoE (calibrated on {results['calibrate']}, "
             f"{results['n_calibration']} samples; {results['split']} split exact-match accuracy, "
             f"{results['limit']} records per domain)", "",
             dense_line(dense, domains) + f"; {dense['params']:,} parameters, "
             f"{dense['active']:,} active per token, {results['routed_params']:,} in routed experts", "",
             "Accuracy before → after LoRA recovery on arithmetic. `removed` is the share of routed parameters the "
             "plan removed.", "",
             "| method | budget | removed | params | active | " + " | ".join(domains) + " |",
             "|---|---|---|---|---|" + "---|" * len(domains)]
    tuned = {(r["method"], r["amount"]): r for r in rows if r.get("lora")}
    for r in rows[1:]:
        if r.get("lora"):
            continue
        t = tuned.get((r["method"], r["amount"]))
        cells = [f"{r[d]:.3f}" + (f" → {t[d]:.3f}" if t else "") for d in domains]
        removed = "" if r["achieved"] is None else f"{r['achieved']:.3f}"
        lines.append(f"| {r['method']} | {r['amount']} | {removed} | {r['params']:,} | {r['active']:,} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Which expert criterion predicts the cost of removing an expert: Spearman correlation, within each "
              "layer and averaged, between a criterion's score and the calibration loss increase when that expert "
              "alone is dropped (1: the same order).", "",
              "| " + " | ".join(k for k in results["oracle"] if k != "loss") + " |",
              "|" + "---|" * (len(results["oracle"]) - 1),
              "| " + " | ".join(f"{v:.3f}" for k, v in results["oracle"].items() if k != "loss") + " |"]
    lines += ["", f"(calibration {results['calibration_seconds']} s; {results['seconds']} s in all on CPU)"]
    save_results(out, results, lines)
    plot(results, out, domains)


def plot(results: dict, out: Path, domains: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"][1:] if r["method"] not in ("top-1 routing", "compressed experts")]
    labels = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 0.45 * len(labels) + 1.5), squeeze=False)
    for j, d in enumerate(domains):
        ax = axes[0][j]
        for k, (amount, lora, color) in enumerate([(0.25, False, "#9ecae1"), (0.25, True, "#3182bd"),
                                                    (0.5, False, "#fdae6b"), (0.5, True, "#e6550d")]):
            values = [next((r[d] for r in rows if r["method"] == lab and r["amount"] == amount
                            and bool(r.get("lora")) == lora), float("nan")) for lab in labels]
            ax.barh([i + 0.2 * k - 0.3 for i in range(len(labels))], values, height=0.2, color=color,
                    label=f"{amount:.0%}{' + LoRA' if lora else ''}")
        ax.axvline(results["rows"][0][d], color="k", linestyle="--", linewidth=1)
        ax.set(title=d, xlim=(0, 1), xlabel="accuracy")
        ax.set_yticks(range(len(labels)), labels if j == 0 else [""] * len(labels))
        ax.invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "methods.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    auto_cli(main)
