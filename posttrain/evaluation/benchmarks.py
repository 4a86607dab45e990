"""Runnable benchmarks: `Benchmark` and where it is built — from a validated BenchmarkSpec (load its data, build
prompts with template, few-shot prefix or chat messages, and its sampling parameters) or from a recipe's held-out
set and eval suite (`recipe_benchmarks`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import DataError
from posttrain.evaluation.suite import BenchmarkSpec, load_suite
from posttrain.recipe import Recipe
from posttrain.rollout import SamplingParams


@dataclass
class Benchmark:
    """Rows ready to run. `generate`: `prompt` + `answer`, graded by `grader` (posttrain.evaluation.graders).
    `preference`: `chosen_text` / `rejected_text`, scored by a reward model. `polar`: prompt, reference, chosen,
    rejected, scored by a POLAR RM against the reference."""

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


def build_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    """Load the benchmark's rows (errors name the benchmark) and shape its prompts."""
    from posttrain.data import format_prompts, load_source, validate

    origin = f"benchmark '{spec.name}'"
    rows = load_source(spec.data, origin=origin)
    cap = min(x for x in (limit, spec.limit, len(rows)) if x is not None)
    rows = rows.select(range(cap))
    if len(rows) == 0:
        raise DataError(f"{origin}: has no rows")
    if spec.kind == "preference":
        return Benchmark(name=spec.name, rows=_preference_rows(rows, origin), kind="preference", spec=spec)
    if spec.kind == "polar":
        validate(rows, "polar_triplet", origin)
        return Benchmark(name=spec.name, rows=rows, kind="polar", spec=spec)

    validate(rows, "prompt_answer", origin)
    p = spec.prompt
    chat = bool(p.get("chat_template", False))
    rows = format_prompts(rows, template=p.get("template"), system_prompt=p.get("system_prompt"), chat=chat)
    shots = int(p.get("few_shot", 0))
    if shots:
        if chat:
            raise DataError(f"{origin}: few_shot with chat_template is not supported; use one of them")
        prefix = _few_shot_prefix(spec, shots, origin)
        rows = rows.map(lambda row: {"prompt": prefix + row["prompt"]})
    return Benchmark(
        name=spec.name,
        rows=rows,
        grader=spec.grader,
        params=sampling_params(spec),
        slice_column=spec.slice_column,
        spec=spec,
    )


def _few_shot_prefix(spec: BenchmarkSpec, shots: int, origin: str) -> str:
    """The first `shots` rows of the few-shot data, each formatted with shot_template, then a blank line."""
    from posttrain.data import load_source

    source = spec.prompt.get("few_shot_data")
    if source is None:
        raise DataError(f"{origin}: few_shot needs prompt.few_shot_data (a data source of worked examples)")
    examples = load_source(source, origin=f"{origin}: few_shot_data")
    template = spec.prompt.get("shot_template", "{prompt}\n{answer}")
    try:
        parts = [template.format(**examples[i]) for i in range(min(shots, len(examples)))]
    except KeyError as err:
        raise DataError(f"{origin}: shot_template uses column {err} that the few-shot data doesn't have") from err
    return "\n\n".join(parts) + "\n\n"


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Anthropic HH rows hold a whole transcript; the prompt is everything up to the last '\\n\\nAssistant:'."""
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut == -1:
        return "", text
    return text[: cut + len(marker)], text[cut + len(marker) :]


def _preference_rows(rows: Any, origin: str) -> Any:
    """Rows with `chosen_text` / `rejected_text`: the full texts the reward model scores.

    Accepts the Anthropic HH layout (`chosen`/`rejected` whole transcripts) and prompt/chosen/rejected.
    """
    cols = rows.column_names
    for col in ("chosen", "rejected"):
        if col not in cols:
            raise DataError(f"{origin}: preference data needs '{col}' (columns: {', '.join(cols)})")
    has_prompt = "prompt" in cols

    def texts(row: dict[str, Any], idx: int) -> dict[str, Any]:
        for col in ("chosen", "rejected"):
            if not isinstance(row[col], str) or not row[col]:
                raise DataError(f"{origin}: row {idx + 1} has an empty '{col}'")
        if has_prompt:
            prompt = row["prompt"] or ""
            return {"prompt": prompt, "chosen_text": prompt + row["chosen"], "rejected_text": prompt + row["rejected"]}
        prompt, _ = split_hh_transcript(row["chosen"])
        return {"prompt": prompt, "chosen_text": row["chosen"], "rejected_text": row["rejected"]}

    return rows.map(texts, with_indices=True)


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
            if bench.kind == "generate":  # preference/polar benchmarks score reward models, not the policy
                benchmarks.append(build_benchmark(bench, limit=recipe.eval.limit))
    return benchmarks
