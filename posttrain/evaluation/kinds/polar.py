"""`kind: polar`: a POLAR reward model (`reward_model:`, else the evaluated model) scores chosen and rejected
against each row's reference; accuracy is the share where chosen scores higher, with the mean margin."""

from __future__ import annotations

from posttrain.evaluation.benchmarks import Benchmark, load_rows
from posttrain.evaluation.kinds import BenchmarkKind, RunContext, register_kind
from posttrain.evaluation.runner import EvalResult, evaluate_polar
from posttrain.evaluation.suite import BenchmarkSpec


def build(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    from posttrain.data import validate

    rows, origin = load_rows(spec, limit)
    validate(rows, "polar_triplet", origin)
    return Benchmark(name=spec.name, rows=rows, kind=spec.kind, spec=spec)


def run(bench: Benchmark, ctx: RunContext) -> EvalResult:
    from reward_models.polar import PolarScorer

    return evaluate_polar(PolarScorer.from_pretrained(bench.spec.reward_model or ctx.model), bench)


KIND = register_kind(
    BenchmarkKind(
        name="polar",
        build=build,
        run=run,
        stand_in_fields=("prompt", "reference", "chosen", "rejected"),
        description="a POLAR reward model scores chosen above rejected against a reference",
    )
)
