"""`kind: generate`: the model answers prompts (template, few-shot prefix or chat messages); a grader
(posttrain.evaluation.graders) checks each completion against the row's `answer`; accuracy, pass@k / maj@k when
asked, per-slice accuracy. A text training run evaluates these on its policy."""

from __future__ import annotations

from posttrain.errors import DataError
from posttrain.evaluation.benchmarks import Benchmark, load_rows, sampling_params
from posttrain.evaluation.kinds import FEW_SHOT_FIELDS, BenchmarkKind, RunContext, register_kind
from posttrain.evaluation.runner import EvalResult, evaluate
from posttrain.evaluation.suite import BenchmarkSpec


def build(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    """Load the benchmark's rows (errors name the benchmark) and shape its prompts."""
    from posttrain.data import format_prompts, validate

    rows, origin = load_rows(spec, limit)
    validate(rows, "prompt_answer", origin)
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
    """Generate with the suite's shared generator (made for the model on first use) and grade."""
    generator = ctx.shared_generator()
    return evaluate(generator, bench, ctx.tokenizer)


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
