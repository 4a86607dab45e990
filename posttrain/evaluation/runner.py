"""Run a benchmark: render prompts, generate, grade with a reward function, aggregate with per-slice accuracy."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.evaluation.benchmarks import Benchmark
from posttrain.rollout import Generator


@dataclass
class EvalResult:
    name: str
    accuracy: float
    n: int
    stderr: float
    slices: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)  # pass@k, maj@k, mean scores
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)
    grid: Any = field(default=None, repr=False)  # diffusion benchmarks: a PIL grid of samples, saved beside them
    # What the headline number is: "accuracy" (a share of right answers, in [0, 1]) or "score" (a mean reward on
    # the scorer's own scale: diffusion benchmarks). It names the logged and stored keys, the report's panel and
    # the leaderboard column, so a reward score is never shown as an accuracy. The value is `accuracy` either way.
    metric: str = "accuracy"

    @property
    def value(self) -> float:
        return self.accuracy

    def metrics(self) -> dict[str, float]:
        """Flat metrics as logged to metrics.jsonl: eval/<name>/<metric>, one entry per slice and extra metric."""
        out = {f"eval/{self.name}/{self.metric}": self.accuracy}
        for key, value in self.extra.items():
            out[f"eval/{self.name}/{key}"] = value
        for key, value in self.slices.items():
            out[f"eval/{self.name}/accuracy[{key}]"] = value["accuracy"]
        return out

    def summary(self) -> dict[str, float]:
        """Metrics for the results store: the headline metric (accuracy or score), its standard error, extras and
        slices."""
        out = {self.metric: self.accuracy, f"{self.metric}_stderr": self.stderr, **self.extra}
        for key, value in self.slices.items():
            out[f"accuracy[{key}]"] = value["accuracy"]
        return out

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in self.__dict__.items() if k not in ("samples", "grid")}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**summary, "samples": self.samples}, indent=1))
        tmp.replace(path)


def evaluate(generator: Generator, benchmark: Benchmark, tokenizer: Any = None) -> EvalResult:
    """Sample `params.n` completions per prompt, grade each, aggregate accuracy (mean per-prompt success rate),
    its standard error, pass@k / maj@k when asked, and per-slice accuracy; per-sample records are kept."""
    from posttrain.data import render_prompt
    from posttrain.evaluation.graders import grade_batch
    from posttrain.evaluation.metrics import aggregate
    from posttrain.rollout.tool_loop import tool_use_metrics

    # datasets 5 returns lazy Column objects; work on plain lists.
    rows = benchmark.rows
    columns = {col: list(rows[col]) for col in rows.column_names}
    # A tool loop (posttrain.rollout.tool_loop) renders its conversations itself, with the tools, each round.
    render = getattr(generator, "render", None) or (lambda p: render_prompt(p, tokenizer) if tokenizer is not None else p)
    prompts = [render(p) for p in columns["prompt"]]
    golds = [str(a) for a in columns["answer"]]
    if hasattr(generator, "bind_rows"):  # a tool loop resets each sample's environment with its row (as TRL does)
        generator.bind_rows([dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)])
    samples = generator.generate(prompts, benchmark.params)
    n = benchmark.params.n
    verdicts = grade_batch(
        benchmark.grader, [c for group in samples for c in group], [g for g in golds for _ in range(n)]
    )
    correct = [[v.correct for v in verdicts[i * n : (i + 1) * n]] for i in range(len(prompts))]
    answers = [[v.extracted for v in verdicts[i * n : (i + 1) * n]] for i in range(len(prompts))]

    ks = tuple(int(m.split("@")[1]) for m in benchmark.extra_metrics() if m.startswith("pass@"))
    wants_maj = any(m.startswith("maj@") for m in benchmark.extra_metrics())

    # maj@n takes the verdict of the samples that gave the majority answer (graders are deterministic); re-grading
    # the extracted answer as a completion would fail for gsm8k_strict (no '####') and some math-verify printouts.
    agg = aggregate(correct, answers if wants_maj else None, None, ks=ks)
    agg.update(tool_use_metrics(generator, n))
    result = EvalResult(
        name=benchmark.name,
        accuracy=agg.pop("accuracy"),
        n=len(prompts),
        stderr=agg.pop("accuracy_stderr"),
        extra=agg,
        samples=[_sample_record(*row) for row in zip(prompts, golds, samples, answers, correct)],
    )
    transcripts = getattr(generator, "last_transcripts", None)
    if transcripts:  # a tool loop: each sample's turns and tool results, beside its graded answer
        for i, record in enumerate(result.samples):
            record["transcript"] = transcripts[i * n] if n == 1 else transcripts[i * n : (i + 1) * n]
    if benchmark.slice_column:
        values = columns[benchmark.slice_column]
        rates = [sum(c) / n for c in correct]
        for value in sorted(set(values), key=str):
            hits = [r for r, v in zip(rates, values) if v == value]
            result.slices[f"{benchmark.slice_column}={value}"] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    return result


def _sample_record(prompt: str, gold: str, group: list[str], answers: list, correct: list[bool]) -> dict[str, Any]:
    """What `eval/samples/*.jsonl` holds per prompt: one completion flat, several as parallel lists."""
    if len(group) == 1:
        return {
            "prompt": prompt,
            "answer": gold,
            "completion": group[0],
            "extracted": answers[0],
            "correct": correct[0],
        }
    return {"prompt": prompt, "answer": gold, "completions": group, "extracted": answers, "correct": correct}


def evaluate_preference(score: Any, benchmark: Benchmark) -> EvalResult:
    """Reward-model accuracy on pairs: the share where score(chosen) > score(rejected) (ties count as wrong)."""
    from posttrain.evaluation.metrics import preference_metrics

    rows = benchmark.rows
    chosen = score(list(rows["chosen_text"]))
    rejected = score(list(rows["rejected_text"]))
    pairs = preference_metrics(chosen, rejected)
    wins = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    return EvalResult(
        name=benchmark.name,
        accuracy=pairs["accuracy"],
        n=len(wins),
        stderr=pairs["accuracy_stderr"],
        extra={"mean_margin": pairs["margin"]},
        samples=[
            {"prompt": p, "chosen_score": c, "rejected_score": r, "correct": bool(w)}
            for p, c, r, w in zip(rows["prompt"], chosen, rejected, wins)
        ],  # fmt: skip
    )


def evaluate_polar(scorer: Any, benchmark: Benchmark) -> EvalResult:
    """POLAR RM accuracy on triplets: the share where score(p, ref, chosen) > score(p, ref, rejected)."""
    from posttrain.evaluation.metrics import preference_metrics

    rows = benchmark.rows
    prompts, n = list(rows["prompt"]), len(rows)
    chosen, rejected = scorer.score_triplets(rows)
    pairs = preference_metrics(chosen, rejected)
    wins = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    return EvalResult(
        name=benchmark.name, accuracy=pairs["accuracy"], n=n, stderr=pairs["accuracy_stderr"],
        extra={"mean_margin": pairs["margin"]},
        samples=[{"prompt": p, "chosen_score": c, "rejected_score": r, "correct": bool(w)}
                 for p, c, r, w in zip(prompts, chosen, rejected, wins)],
    )  # fmt: skip
