"""report.md for a run (training curves, held-out accuracy or score before/after) and for the quickstart comparison."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe
from posttrain.runs import MIXTURE_FILE, TOOL_FAILURES_FILE, TOOL_TRANSCRIPTS_FILE, RunDir, write_atomic

# Training curves drawn when the caller names none (a run's report passes its trainer's own: TrainerSpec.curves).
DEFAULT_CURVES = ("reward", "loss")
# Uncertainty of a held-out mean: drawn as a band around its accuracy curve, not as curves of their own.
_BAND_SUFFIXES = ("_stderr", "_ci95_low", "_ci95_high")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(series: dict[str, dict[int, float]], curves: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group the metrics into (kind, keys) panels.

    Training curves one each; accuracy-like held-out metrics share a [0, 1] panel; a benchmark's mean score
    (diffusion: a reward on the scorer's own scale, with its 95% band) gets a score panel of its own, with the
    baseline's score beside it; win rates a [0, 1] panel; others (a reward model's scores, margin, loss) one panel
    each on their own scale.
    """
    panels = [("train", [k]) for k in curves if k in series]
    evals = sorted(k for k in series if k.startswith("eval/") and "accuracy" in k)
    if evals:
        panels.append(("accuracy", evals))
    others = [k for k in sorted(series) if k.startswith("eval/") and "accuracy" not in k]
    for key in [k for k in others if k.endswith("/score")]:
        baseline = key.rsplit("/", 1)[0] + "/baseline_score_mean"
        panels.append(("score", [key] + ([baseline] if baseline in series else [])))
    placed = {k for _, keys in panels for k in keys}
    win_rates = [k for k in others if k.endswith("/win_rate")]
    if win_rates:
        panels.append(("win_rate", win_rates))
    others = [k for k in others if k not in placed and k not in win_rates]
    scores = [k for k in others if k.endswith("_score")]  # e.g. chosen vs rejected: compared on one panel
    if scores:
        panels.append(("scores", scores))
    return panels + [("eval", [k]) for k in others if k not in scores]


def _draw_band(ax: Any, key: str, series: dict[str, dict[int, float]], bands: dict[str, dict[int, float]]) -> None:
    """The 95% interval of a mean (diffusion benchmarks' score and win rate): a band, or an error bar for one point."""
    low, high = bands.get(key + "_ci95_low", {}), bands.get(key + "_ci95_high", {})
    steps = sorted(t for t in series[key] if t in low and t in high)
    if len(steps) > 1:
        ax.fill_between(steps, [low[t] for t in steps], [high[t] for t in steps], alpha=0.2)
    elif steps:  # one evaluation (e.g. the win rate, after training only)
        t, y = steps[0], series[key][steps[0]]
        ax.errorbar([t], [y], yerr=[[y - low[t]], [high[t] - y]], fmt="none", capsize=3, alpha=0.6)


_PANEL_TITLES = {
    "accuracy": "held-out accuracy",
    "win_rate": "held-out win rate vs baseline",
    "scores": "held-out scores",
}


def plot_curves(
    records: list[dict[str, Any]], out: Path, title: str, curves: Sequence[str] = DEFAULT_CURVES
) -> list[str]:
    """One panel per training curve (`curves`, e.g. reward and loss), one with every held-out accuracy, one per
    held-out score (with its interval band) and one with the win rates, all against step.

    Returns the metric names drawn (empty when there was nothing to plot, and then no file is written).
    """
    series: dict[str, dict[int, float]] = {}
    for rec in records:
        for key, value in rec.items():
            if isinstance(value, (int, float)) and (key in curves or key.startswith("eval/")):
                series.setdefault(key, {})[int(rec.get("step", 0))] = float(value)
    bands = {k: series.pop(k) for k in list(series) if k.endswith(_BAND_SUFFIXES)}
    if not series:
        return []
    panels = _panels(series, curves)
    plt = _plt()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    steps = [t for points in series.values() for t in points]
    first, last = min(steps), max(steps)
    pad = max(1.0, 0.03 * (last - first))  # every panel on the run's step axis, even one with a single point
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (kind, keys) in zip(axes.flat, panels):
        for key in keys:
            points = sorted(series[key].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None,
                    label=key.removeprefix("eval/"))  # fmt: skip
            _draw_band(ax, key, series, bands)
        ax.set_xlabel("step")
        ax.set_xlim(first - pad, last + pad)
        ax.grid(alpha=0.3)
        if kind in ("accuracy", "win_rate"):
            ax.set_ylim(0, 1.02)
        if kind == "win_rate":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        if kind == "score":
            ax.set_title(f"held-out score: {keys[0].split('/')[1]} (mean, 95% CI)", fontsize=9)
            ax.set_ylabel("score")
        elif kind == "eval":
            ax.set_title(f"held-out {keys[0].removeprefix('eval/')}", fontsize=9)
        elif kind == "train":
            ax.set_title(f"training {keys[0]}", fontsize=9)
        else:
            ax.set_title(_PANEL_TITLES[kind], fontsize=9)
        if kind in ("accuracy", "win_rate", "score", "scores"):
            ax.legend(fontsize=7, loc="lower right" if kind == "accuracy" else "best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return sorted(series)


def write_run_report(run: RunDir, recipe: Recipe, result: Any, curves: Sequence[str] = DEFAULT_CURVES) -> Path:
    """report.md: steps, time, the held-out before/after table and the training curves named by `curves`."""
    # The stage's own log lines plus its "<name>:before"/":after" evaluations.
    records = [r for r in run.read_metrics() if str(r.get("stage", "")).split(":")[0] == recipe.name]
    tool_run = (run.path / TOOL_TRANSCRIPTS_FILE).is_file()
    if tool_run:
        curves = (*curves, *TOOL_CURVES)
    drawn = plot_curves(records, run.path / "curves.png", f"{recipe.name} ({recipe.trainer})", curves)
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
    if (run.path / MIXTURE_FILE).is_file():
        lines += [*mixture_table(json.loads((run.path / MIXTURE_FILE).read_text())), ""]
    if tool_run:
        lines += [*tool_section(run.path), ""]
    path = run.path / "report.md"
    write_atomic(path, "\n".join(lines))
    return path


TOOL_CURVES = ("tools/call_frequency", "tools/used", "tools/turns", "tools/failure_frequency")


def tool_section(path: Path) -> list[str]:
    """Multi-turn rollouts: the last rewarded and unrewarded transcripts, and how many tool calls failed."""
    kept = json.loads((path / TOOL_TRANSCRIPTS_FILE).read_text())
    lines = ["## Tool-use transcripts", ""]
    for kind in ("rewarded", "unrewarded"):
        example = kept.get(kind)
        if example is None:
            lines += [f"No {kind} rollout in training.", ""]
            continue
        lines += [f"{kind} (generation at step {example['step']}), reward {example['reward']:.3g}, "
                  f"{example['turns']} turn(s):", "", "```text", example["transcript"], "```", ""]  # fmt: skip
    failures = path / TOOL_FAILURES_FILE
    if failures.is_file():
        records = [json.loads(line) for line in failures.read_text().splitlines() if line.strip()]
        tools = sorted({r["tool"] for r in records})
        lines.append(f"{len(records)} tool call(s) failed ({', '.join(tools)}): each with its sample in "
                     f"`{TOOL_FAILURES_FILE}`; the first: `{records[0]['tool']}` raised `{records[0]['error']}`")  # fmt: skip
    else:
        lines.append("No tool call failed.")
    return lines


def mixture_table(summary: dict[str, Any]) -> list[str]:
    """A mixed data.train (runs.MIXTURE_FILE) as markdown: each source's weight, requested and realised share."""
    lines = [f"data.train mixture: {summary['rows']} rows, stopping {summary['stopping']}, seed {summary['seed']}", "",
             "| source | data | weight | requested | realised | rows |", "|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary["sources"]:
        lines.append(f"| {s['source']} | {s['data']} | {s['weight']:g} | {s['requested']:.3f} | {s['realised']:.3f} "
                     f"| {s['rows']} |")  # fmt: skip
    return lines


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot_accuracy_bars(rows: list[tuple[str, dict[str, float]]], keys: list[str], out: Path, title: str) -> None:
    """Grouped bars: one group per metric key, one bar per labelled model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.4))
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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
