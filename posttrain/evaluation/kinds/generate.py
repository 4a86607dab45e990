"""`kind: generate`: the model answers prompts (template, few-shot prefix or chat messages); a grader
(posttrain.evaluation.graders) checks each completion against the row's `answer`; accuracy, avg@k / pass@k /
maj@k when asked, per-slice accuracy. A text training run evaluates these on its policy.

Gold answers that are not text are written as text once, when the rows are built: a list (OlympiadBench's
`final_answer`) joined with ", ", an integral float (a float answer column: 27.0) as the integer (27), which the
strict string graders (`dapo_strict`, `gsm8k_*`) need."""

from __future__ import annotations

from typing import Any

from posttrain.errors import DataError, RecipeError
from posttrain.evaluation.benchmarks import Benchmark, load_rows, sampling_params
from posttrain.evaluation.kinds import FEW_SHOT_FIELDS, BenchmarkKind, RunContext, register_kind
from posttrain.evaluation.runner import EvalResult, evaluate
from posttrain.evaluation.suite import BenchmarkSpec


def build(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    """Load the benchmark's rows (errors name the benchmark) and shape its prompts."""
    from posttrain.data import format_prompts, validate

    check_avg_metrics(spec)
    rows, origin = load_rows(spec, limit)
    validate(rows, "prompt_answer", origin)
    rows = gold_answers_as_text(rows)
    p = spec.prompt
    chat = bool(p.get("chat_template", False))
    rows = format_prompts(rows, template=p.get("template"), system_prompt=p.get("system_prompt"), chat=chat)
    shots = int(p.get("few_shot", 0))
    if shots:
        if chat:
            raise DataError(f"{origin}: few_shot with chat_template is not supported; use one of them")
        prefix = few_shot_prefix(spec, shots, origin)
        rows = rows.map(lambda row: {"prompt": prefix + row["prompt"]})
    return Benchmark(
        name=spec.name,
        rows=rows,
        grader=spec.grader,
        params=sampling_params(spec),
        slice_column=spec.slice_column,
        spec=spec,
    )


def check_avg_metrics(spec: BenchmarkSpec) -> None:
    """avg@K averages K samples per prompt: the benchmark must draw K (`generation.n`); said before any data or
    model loads."""
    n = int(spec.generation.get("n", 1))
    for metric in spec.metrics:
        if metric.startswith("avg@") and int(metric.split("@")[1]) != n:
            raise RecipeError(
                f"benchmark '{spec.name}': metric {metric} averages {metric.split('@')[1]} samples per prompt, but "
                f"generation.n is {n}; set generation.n: {metric.split('@')[1]} or ask for avg@{n}"
            )


def gold_text(value: Any) -> str:
    """A gold answer as the text graders compare: a list joined with ", " (a one-item list is its item), an integral
    float as the integer ("27", not "27.0"), anything else as str()."""
    if isinstance(value, (list, tuple)):
        return ", ".join(gold_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def gold_answers_as_text(rows: Any) -> Any:
    """The rows with a list or float `answer` column turned into text (`gold_text`); text and integer columns are
    returned as they are (str() of them is already what the graders read)."""
    feature = rows.features.get("answer")
    dtype = getattr(feature, "dtype", None)
    if dtype is not None and not str(dtype).startswith("float"):
        return rows  # a string, integer or boolean Value
    from datasets import Value

    # The new type is given: left to infer it, datasets casts text that reads as a number back to the float column.
    features = rows.features.copy()
    features["answer"] = Value("string")
    return rows.map(lambda answer: {"answer": gold_text(answer)}, input_columns=["answer"], features=features,
                    desc="gold answers")  # fmt: skip


def few_shot_prefix(spec: BenchmarkSpec, shots: int, origin: str) -> str:
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


def run(bench: Benchmark, ctx: RunContext) -> EvalResult:
    """Generate with the suite's shared generator (made for the model on first use), grade, and add avg@k with its
    standard error when the benchmark asks for it."""
    from posttrain.evaluation.metrics import avg_at_k

    generator = ctx.shared_generator()
    result = evaluate(generator, bench, ctx.tokenizer)
    correct = [s["correct"] if isinstance(s["correct"], list) else [s["correct"]] for s in result.samples]
    for metric in bench.extra_metrics():
        if metric.startswith("avg@"):
            result.extra.update(avg_at_k(correct, int(metric.split("@")[1])))
    return result


KIND = register_kind(
    BenchmarkKind(
        name="generate",
        build=build,
        run=run,
        needs_grader=True,
        runs_in_training=True,
        stand_in_fields=FEW_SHOT_FIELDS,  # prompt, answer, and the worked solution a few-shot template may use
        description="the model answers prompts; a grader checks each answer",
    )
)
