"""report.md for a run (training curves, held-out accuracy before/after) and for the quickstart comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe
from posttrain.runs import RunDir, write_atomic

# The curve worth plotting for each kind of run, by the name TRL logs it under.
CURVE_KEYS = ("reward", "loss")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    """Plot each training curve and held-out accuracy against step; return the metric names drawn."""
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if isinstance(value, (int, float)) and (key in CURVE_KEYS or key.startswith("eval/")):
                series.setdefault(key, []).append((rec.get("step", 0), float(value)))
    if not series:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (key, points) in zip(axes[0], sorted(series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return sorted(series)


def write_run_report(run: RunDir, recipe: Recipe, result: Any) -> Path:
    records = [r for r in run.read_metrics() if r.get("stage") == recipe.name]
    drawn = plot_curves(records, run.path / "curves.png", f"{recipe.name} ({recipe.trainer})")
    lines = [
        f"# {recipe.name}",
        "",
        f"trainer `{recipe.trainer}`, seed {recipe.seed}, {result.global_step} steps in {result.train_seconds:.0f} s.",
        "Reproduce: `posttrain train " + str(run.path / "recipe.resolved.yaml") + "`",
        "",
    ]
    if result.before or result.after:
        lines += ["| held-out metric | before | after |", "|---|---|---|"]
        for key in sorted(set(result.before) | set(result.after)):
            b, a = result.before.get(key), result.after.get(key)
            lines.append(f"| {key} | {_fmt(b)} | {_fmt(a)} |")
        lines.append("")
    if drawn:
        lines += [f"![training curves](curves.png) ({', '.join(drawn)})", ""]
    path = run.path / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot_accuracy_bars(rows: list[tuple[str, dict[str, float]]], keys: list[str], out: Path, title: str) -> None:
    """Grouped bars: one group per metric key, one bar per labelled model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    width = 0.8 / max(len(rows), 1)
    for i, (label, metrics) in enumerate(rows):
        xs = [k + i * width for k in range(len(keys))]
        ys = [metrics.get(key, 0.0) for key in keys]
        bars = ax.bar(xs, ys, width=width, label=label)
        ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7)
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(keys))])
    ax.set_xticklabels(keys, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
