"""`posttrain quickstart [--task arithmetic|tools]`: reinforcement learning with a verifier fixes what imitation got
wrong, on a CPU (`--task tools`: RL teaches a tiny model to use a calculator tool, docs/tools.md).

Stages, each an ordinary recipe run in its own run dir under `out/`:
1. `sft`: a tiny model imitates demonstrations where half the carry problems drop the carry (recipes/sft/).
2. `grpo`: GRPO from the SFT model with an exact-match verifier (recipes/grpo/arithmetic.yaml).
3. `sft_continue`: the baseline — SFT continued from the same SFT model on the same demonstrations for the same
   wall time GRPO took.
Then `out/report.md` compares held-out accuracy (overall, carry, no-carry) of all of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from posttrain.report import plot_accuracy_bars, plot_curves
from posttrain.runs import RunDir, write_atomic
from posttrain.shipped import recipes_dir
from posttrain.train import load_and_validate as load_recipe
from posttrain.train import train_recipe

RECIPES = recipes_dir()  # the checkout's recipes/, or the copies a wheel ships


@dataclass(frozen=True)
class Task:
    """One quickstart: its SFT recipe, the RL recipes run from the SFT model, the held-out metrics compared."""

    sft: str
    rl: tuple[tuple[str, str, str], ...]  # (label, recipe, stage dir)
    metrics: tuple[tuple[str, str], ...]  # (logged key, column label)
    title: str
    intro: str


TASKS = {
    "arithmetic": Task(
        sft="sft/arithmetic.yaml",
        rl=(("SFT → GRPO", "grpo/arithmetic.yaml", "grpo"),),
        metrics=(
            ("eval/arithmetic/accuracy", "all"),
            ("eval/arithmetic/accuracy[carry=True]", "carry"),
            ("eval/arithmetic/accuracy[carry=False]", "no carry"),
        ),  # fmt: skip
        title="held-out 2-digit addition",
        intro="A tiny Llama-style model learns 2-digit addition from demonstrations in which half of the problems "
        "that need a carry show it dropped (47+85= → 122). GRPO with an exact-match verifier then trains on the same "
        "prompts; the baseline continues SFT on the same demonstrations for the same wall time. Accuracy is greedy, "
        "on 1000 held-out problems never trained on.",
    ),
    "tools": Task(
        sft="sft/tools.yaml",
        rl=(("SFT → GRPO", "grpo/tools.yaml", "grpo"), ("SFT → NFT", "nft/tools.yaml", "nft")),
        metrics=(("eval/tools/accuracy", "accuracy"), ("eval/tools/tool_use_rate", "tool use")),
        title="held-out 3-digit × 2-digit products with a calculator tool",
        intro="A tiny model learns 3-digit × 2-digit multiplication from demonstrations of which 30% call a "
        "`multiply(a, b)` tool and the rest answer straight away (right half of the time). Multi-turn GRPO and NFT "
        "with an exact-match verifier then train with the tool; the baseline continues SFT on the same demonstrations "
        "for the same wall time as GRPO. Accuracy and tool use are greedy, through the tool loop, on 300 held-out "
        "problems never trained on (docs/tools.md).",
    ),
}


@dataclass
class QuickstartSummary:
    seed: int
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> metric -> value
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> training wall time
    task: str = "arithmetic"

    def table(self) -> str:
        metrics = TASKS[self.task].metrics
        head = "| model | " + " | ".join(label for _, label in metrics) + " | train s |"
        lines = [head, "|---" * (len(metrics) + 2) + "|"]
        for model, values in self.accuracy.items():
            cells = " | ".join(f"{values.get(k, float('nan')):.3f}" for k, _ in metrics)
            lines.append(f"| {model} | {cells} | {self.seconds.get(model, 0):.0f} |")
        return "\n".join(lines)


def run_quickstart(
    out: Path, seed: int = 0, overrides: list[str] | None = None, task: str = "arithmetic"
) -> QuickstartSummary:
    spec = TASKS[task]
    common = [f"seed={seed}", *(overrides or [])]
    summary = QuickstartSummary(seed=seed, task=task)

    sft = load_recipe(RECIPES / spec.sft, [*common, f"output_dir={out / 'sft'}"])
    sft_result = train_recipe(sft)
    summary.accuracy["base (untrained)"] = sft_result.before
    summary.accuracy["SFT"] = sft_result.after
    summary.seconds["SFT"] = sft_result.train_seconds
    sft_final = out / "sft" / "final"

    budget = None
    for label, recipe, stage in spec.rl:
        rl = load_recipe(RECIPES / recipe, [*common, f"model.path={sft_final}", f"output_dir={out / stage}"])
        rl_result = train_recipe(rl)
        summary.accuracy[label] = rl_result.after
        summary.seconds[label] = rl_result.train_seconds
        budget = rl_result.train_seconds if budget is None else budget  # the first RL stage's time

    # Same wall time as GRPO; the schedule is sized from SFT's measured step time so its cosine decay completes.
    steps = max(10, int(budget / max(sft_result.train_seconds / max(sft_result.global_step, 1), 1e-3)))
    cont = load_recipe(
        RECIPES / spec.sft,
        [*common, "model.tiny=null", f"model.path={sft_final}", f"output_dir={out / 'sft_continue'}",
         f"training.max_steps={steps}", f"training.time_budget_s={budget:.1f}", "name=sft-continue"],
    )  # fmt: skip
    cont_result = train_recipe(cont)
    summary.accuracy["SFT → more SFT (same time)"] = cont_result.after
    summary.seconds["SFT → more SFT (same time)"] = cont_result.train_seconds

    write_quickstart_report(out, summary)
    return summary


def write_quickstart_report(out: Path, summary: QuickstartSummary) -> None:
    spec = TASKS[summary.task]
    labels = dict(spec.metrics)
    write_atomic(out / "summary.json", json.dumps(asdict(summary), indent=1))
    rows = [(model, metrics) for model, metrics in summary.accuracy.items() if "untrained" not in model]
    plot_accuracy_bars(
        [(m, {labels[k]: v for k, v in metrics.items() if k in labels}) for m, metrics in rows],
        list(labels.values()),
        out / "accuracy.png",
        f"{spec.title}, seed {summary.seed}",
    )
    grpo_records = RunDir(out / "grpo").read_metrics()
    plot_curves(grpo_records, out / "grpo_curves.png", "GRPO: training reward and held-out accuracy")
    stages = ", ".join(f"`{stage}/`" for stage in ("sft", *(s for _, _, s in spec.rl), "sft_continue"))
    lines = [
        "# posttrain quickstart" + ("" if summary.task == "arithmetic" else f" --task {summary.task}"),
        "",
        spec.intro,
        "",
        summary.table(),
        "",
        "![held-out accuracy](accuracy.png)",
        "",
        "![GRPO curves](grpo_curves.png)",
        "",
        f"Stage run dirs (each with recipe.resolved.yaml, metrics.jsonl, final/ and report.md): {stages}.",
    ]
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
