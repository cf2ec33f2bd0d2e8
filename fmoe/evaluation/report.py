"""One PNG summarising a prune-recover run: metrics per stage, and for a dims plan where the width was cut."""

from __future__ import annotations

from pathlib import Path

from ..methods.dims.plan import PruningPlan


def _metric_groups(rows: dict[str, dict]) -> dict[str, list[str]]:
    """{"accuracy": [...], "perplexity": [...]} metric names found in the rows (sizes left out)."""
    names = sorted({k for row in rows.values() for k, v in row.items() if isinstance(v, (int, float))})
    ppl = [k for k in names if k.endswith("_ppl")]
    sizes = {"params", "active", "weight_MB"}
    acc = [k for k in names if k not in sizes and k not in ppl
           and all(0.0 <= row.get(k, 0.0) <= 1.0 for row in rows.values())]
    return {"accuracy": acc, "perplexity": ppl}


def _bars(ax, rows: dict[str, dict], metrics: list[str], title: str) -> None:
    """Grouped bars: one group per metric, one bar per stage."""
    stages = list(rows)
    width = 0.8 / max(len(stages), 1)
    for i, stage in enumerate(stages):
        xs = [m + (i - (len(stages) - 1) / 2) * width for m in range(len(metrics))]
        ax.bar(xs, [rows[stage].get(k, float("nan")) for k in metrics], width, label=stage)
    ax.set_xticks(range(len(metrics)), metrics, rotation=30, ha="right", fontsize=7)
    ax.set_title(title)
    ax.legend(fontsize=7)


def write_report(rows: dict[str, dict], plan=None, path: str | Path = "report.png") -> Path:
    """Write `path` (PNG): accuracy and perplexity per stage as bars (from the recipe's rows, {stage: {metric:
    value}}); for a dims PruningPlan also the kept width of every expert per layer (heat map) and the share of
    routed dims removed per layer. Other plans (or None) get the bars only."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = {title: metrics for title, metrics in _metric_groups(rows).items() if metrics}
    dims = isinstance(plan, PruningPlan) and bool(plan.keep)
    panels = len(groups) + (2 if dims else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5 * max(panels, 1), 4), squeeze=False)
    axes = list(axes[0])
    for ax, (title, metrics) in zip(axes, groups.items()):
        _bars(ax, rows, metrics, title)
    if dims:
        names = list(plan.keep)
        kept = plan.kept_widths()
        n_experts = max(len(kept[n]) for n in names)
        grid = [[kept[n][e] if e < len(kept[n]) else float("nan") for e in range(n_experts)] for n in names]
        heat = axes[len(groups)]
        image = heat.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        heat.set_xlabel("expert")
        heat.set_ylabel("MoE layer")
        heat.set_title("kept width per expert")
        fig.colorbar(image, ax=heat)
        share = [1 - sum(kept[n]) / sum(plan.widths[n]) for n in names]
        removed = axes[len(groups) + 1]
        removed.bar(range(len(names)), share)
        removed.set_xlabel("MoE layer")
        removed.set_ylabel("share of routed dims removed")
        removed.set_ylim(0, 1)
        removed.set_title(f"removed per layer (total {plan.removed_fraction():.0%})")
        for axis in (heat.xaxis, heat.yaxis, removed.xaxis):  # layer and expert indices: whole numbers
            axis.set_major_locator(MaxNLocator(integer=True))
    if not panels:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no metrics", ha="center", va="center")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.png")  # replaced in one step: never a half-written report
    fig.savefig(partial, dpi=100)
    plt.close(fig)
    partial.replace(path)
    return path
