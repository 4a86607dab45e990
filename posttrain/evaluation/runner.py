"""Run a benchmark: render prompts, generate, grade with a reward function, aggregate with per-slice accuracy."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe
from posttrain.rollout import Generator, SamplingParams


@dataclass
class Benchmark:
    """Rows with `prompt` and `answer`, graded by a reward function name; a score >= 0.5 counts as correct."""

    name: str
    rows: Any  # datasets.Dataset
    grader: str = "numeric_match"
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    slice_column: str | None = None


@dataclass
class EvalResult:
    name: str
    accuracy: float
    n: int
    stderr: float
    slices: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def metrics(self) -> dict[str, float]:
        """Flat metrics as logged to metrics.jsonl: eval/<name>/accuracy and one entry per slice."""
        out = {f"eval/{self.name}/accuracy": self.accuracy}
        for key, value in self.slices.items():
            out[f"eval/{self.name}/accuracy[{key}]"] = value["accuracy"]
        return out

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: v for k, v in self.__dict__.items() if k != "samples"}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**summary, "samples": self.samples}, indent=1))
        tmp.replace(path)


def evaluate(generator: Generator, benchmark: Benchmark, tokenizer: Any = None) -> EvalResult:
    """Generate one completion per prompt (pass@1) and grade it; per-sample records are kept for reading failures."""
    from posttrain.data import render_prompt
    from reward_models import guarded, resolve_reward

    # datasets 5 returns lazy Column objects; reward functions get plain lists, as TRL gives them.
    rows = benchmark.rows
    columns = {col: list(rows[col]) for col in rows.column_names}
    prompts = [render_prompt(p, tokenizer) if tokenizer is not None else p for p in columns["prompt"]]
    completions = [c[0] for c in generator.generate(prompts, benchmark.params)]
    grader = guarded(resolve_reward(benchmark.grader), benchmark.grader)
    extra = {col: values for col, values in columns.items() if col not in ("prompt", "completion")}
    scores = grader(prompts=prompts, completions=completions, **extra)
    correct = [s is not None and s >= 0.5 for s in scores]
    n = len(correct)
    acc = sum(correct) / n if n else float("nan")
    result = EvalResult(
        name=benchmark.name,
        accuracy=acc,
        n=n,
        stderr=math.sqrt(acc * (1 - acc) / n) if n else float("nan"),
        samples=[
            {"prompt": p, "completion": c, "answer": a, "correct": ok}
            for p, c, a, ok in zip(prompts, completions, columns["answer"], correct)
        ],
    )
    if benchmark.slice_column:
        values = columns[benchmark.slice_column]
        for value in sorted(set(values), key=str):
            hits = [ok for ok, v in zip(correct, values) if v == value]
            key = f"{benchmark.slice_column}={value}"
            result.slices[key] = {"accuracy": sum(hits) / len(hits), "n": len(hits)}
    return result


def heldout_benchmark(recipe: Recipe) -> Benchmark | None:
    """The recipe's held-out set (eval.data, else data.eval) as a Benchmark, or None when it has none."""
    from posttrain.data import format_prompts, load_source

    spec = recipe.eval.data or recipe.data.eval
    if spec is None:
        return None
    origin = f"{recipe.where}: {'eval.data' if recipe.eval.data else 'data.eval'}"
    rows = load_source(spec, base_dir=recipe.source.parent if recipe.source else None, origin=origin)
    if recipe.eval.limit:
        rows = rows.select(range(min(recipe.eval.limit, len(rows))))
    rows = format_prompts(
        rows,
        template=recipe.data.prompt_template,
        system_prompt=recipe.data.system_prompt,
        chat=recipe.data.chat_template,
    )
    params = SamplingParams(
        temperature=0.0,
        max_new_tokens=recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens,
        seed=recipe.seed,
    )
    return Benchmark(
        name=recipe.eval.name,
        rows=rows,
        grader=recipe.eval.grader,
        params=params,
        slice_column=recipe.eval.slice_column,
    )
