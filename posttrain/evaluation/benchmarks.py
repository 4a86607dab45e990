"""Runnable benchmarks: `Benchmark` and where it is built: from a validated BenchmarkSpec by its kind
(`build_benchmark`; posttrain/evaluation/kinds/ load the data and shape the rows: prompts with template, few-shot
prefix or chat messages, preference texts, POLAR triplets) or from a recipe's held-out set and eval suite
(`recipe_benchmarks`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import DataError
from posttrain.evaluation.kinds import benchmark_kind
from posttrain.evaluation.suite import BenchmarkSpec, load_suite
from posttrain.recipe import Recipe
from posttrain.rollout import SamplingParams


@dataclass
class Benchmark:
    """Rows ready to run, shaped by the kind's module (posttrain/evaluation/kinds/): `generate`: `prompt` +
    `answer`, graded by `grader` (posttrain.evaluation.graders). `preference`: `chosen_text` / `rejected_text`,
    scored by a reward model. `polar`: prompt, reference, chosen, rejected, scored by a POLAR RM against the
    reference."""

    name: str
    rows: Any  # datasets.Dataset
    grader: str = "numeric_match"
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    slice_column: str | None = None
    kind: str = "generate"
    spec: Any = None  # the BenchmarkSpec it came from, when it came from a suite

    def extra_metrics(self) -> list[str]:
        return list(self.spec.metrics) if self.spec is not None else []


def sampling_params(spec: BenchmarkSpec, seed: int = 0) -> SamplingParams:
    g = spec.generation
    return SamplingParams(
        n=int(g.get("n", 1)),
        max_new_tokens=int(g.get("max_new_tokens", 256)),
        temperature=float(g.get("temperature", 0.0)),
        top_p=float(g.get("top_p", 1.0)),
        top_k=int(g.get("top_k", 0)),
        seed=int(g.get("seed", seed)),
        stop=tuple(g.get("stop", ())),
    )


def build_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> Any:
    """What the suite runner runs: the benchmark's rows loaded and shaped by its kind
    (posttrain.evaluation.kinds), errors naming the benchmark; `limit` caps the rows."""
    return benchmark_kind(spec.kind, f"benchmark '{spec.name}'").build(spec, limit)


def load_rows(spec: BenchmarkSpec, limit: int | None = None) -> tuple[Any, str]:
    """(the first `limit` rows of the benchmark's data source (and at most `spec.limit`), the origin that errors
    name); no rows is an error."""
    from posttrain.data import load_source

    origin = f"benchmark '{spec.name}'"
    rows = load_source(spec.data, origin=origin)
    cap = min(x for x in (limit, spec.limit, len(rows)) if x is not None)
    rows = rows.select(range(cap))
    if len(rows) == 0:
        raise DataError(f"{origin}: has no rows")
    return rows, origin


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Anthropic HH rows hold a whole transcript; the prompt is everything up to the last '\\n\\nAssistant:'."""
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut == -1:
        return "", text
    return text[: cut + len(marker)], text[cut + len(marker) :]


def recipe_benchmarks(recipe: Recipe) -> list[Benchmark]:
    """What a training run evaluates: its held-out set (eval.data, else data.eval) and eval.suite's benchmarks."""
    from posttrain.data import format_prompts, load_source

    benchmarks = []
    spec = recipe.eval.data or recipe.data.eval
    if spec is not None:
        origin = f"{recipe.where}: {'eval.data' if recipe.eval.data else 'data.eval'}"
        rows = load_source(spec, base_dir=recipe.source.parent if recipe.source else None, origin=origin)
        if recipe.eval.limit:
            rows = rows.select(range(min(recipe.eval.limit, len(rows))))
        rows = format_prompts(
            rows, template=recipe.data.prompt_template, system_prompt=recipe.data.system_prompt,
            chat=recipe.data.chat_template,
        )  # fmt: skip
        params = SamplingParams(
            temperature=0.0,
            max_new_tokens=recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens,
            seed=recipe.seed,
        )
        benchmarks.append(
            Benchmark(recipe.eval.name, rows, recipe.eval.grader, params, slice_column=recipe.eval.slice_column)
        )
    if recipe.eval.suite:
        suite = load_suite(recipe.resolve_path(recipe.eval.suite))
        for bench in suite.benchmarks:
            if benchmark_kind(bench.kind).runs_in_training:  # the policy's own text (not reward models, images)
                benchmarks.append(build_benchmark(bench, limit=recipe.eval.limit))
    return benchmarks
