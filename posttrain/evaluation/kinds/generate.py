"""`kind: generate`: the model answers prompts (template, few-shot prefix or chat messages); a grader
(posttrain.evaluation.graders) checks each completion against the row's `answer`; accuracy, avg@k / pass@k /
maj@k when asked, per-slice accuracy. A text training run evaluates these on its policy. With `generation.tools`
(and `max_tool_calls`), the model answers through the tool loop training runs, and tool use is reported.

Gold answers that are not text are written as text once, when the rows are built: a list (OlympiadBench's
`final_answer`) joined with ", ", an integral float (a float answer column: 27.0) as the integer (27), which the
strict string graders (`dapo_strict`, `gsm8k_*`) need."""

from __future__ import annotations

from typing import Any

from posttrain.errors import DataError, RecipeError
from posttrain.evaluation.benchmarks import Benchmark, load_rows, sampling_params
from posttrain.evaluation.kinds import (
    FEW_SHOT_FIELDS,
    TEXT_GENERATION_KEYS,
    BenchmarkKind,
    RunContext,
    register_kind,
)
from posttrain.evaluation.runner import EvalResult, evaluate
from posttrain.evaluation.suite import BenchmarkSpec


def build(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    """Load the benchmark's rows (errors name the benchmark) and shape its prompts."""
    from posttrain.data import format_prompts, validate

    check_avg_metrics(spec)
    tool_functions(spec)  # a tool that does not import or cannot be offered is named before any data or model
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


def tool_functions(spec: BenchmarkSpec) -> list[Any]:
    """`generation.tools` (package.module:function, as `rollout.tools`), imported and checked as offerable; the
    prompts must be chat messages (`prompt.chat_template: true`), since the template renders the tools."""
    from posttrain.rollout.tools import import_ref, tool_problem

    refs = spec.generation.get("tools") or []
    where = f"benchmark '{spec.name}': generation"
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise RecipeError(f"{where}.tools must be a list of 'package.module:function' names")
    if spec.generation.get("max_tool_calls") is not None and not refs:
        raise RecipeError(f"{where}.max_tool_calls needs generation.tools")
    if refs and not spec.prompt.get("chat_template"):
        raise RecipeError(f"{where}.tools needs prompt.chat_template: true (the template renders the tools)")
    funcs = []
    for i, ref in enumerate(refs):
        func = import_ref(ref, f"{where}.tools[{i}]")
        wrong = tool_problem(func)
        if wrong:
            raise RecipeError(f"{where}.tools[{i}] '{ref}' {wrong}")
        funcs.append(func)
    return funcs


def with_benchmark_tools(generator: Any, bench: Benchmark, tokenizer: Any) -> Any:
    """The generator a benchmark answers with: with `generation.tools`, the multi-turn loop training runs
    (posttrain.rollout.tool_loop) over the plain generator underneath (a recipe's own tool loop is replaced by the
    benchmark's); else `generator` itself. The suite runner and a training run's held-out evaluation both ask."""
    tools = tool_functions(bench.spec) if bench.spec is not None else []
    if not tools:
        return generator
    from posttrain.rollout.tool_loop import ToolLoopGenerator

    plain = generator.inner if isinstance(generator, ToolLoopGenerator) else generator
    return ToolLoopGenerator(plain, tokenizer, tools, bench.spec.generation.get("max_tool_calls"))


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

    generator = with_benchmark_tools(ctx.shared_generator(), bench, ctx.tokenizer)
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
        # a tool loop (tool_functions): in generation, so its settings enter the stored hash only when given
        generation_keys=(*TEXT_GENERATION_KEYS, "tools", "max_tool_calls"),
        stand_in_fields=FEW_SHOT_FIELDS,  # prompt, answer, and the worked solution a few-shot template may use
        description="the model answers prompts; a grader checks each answer",
    )
)
