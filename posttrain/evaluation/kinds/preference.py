"""`kind: preference`: a reward model (a sequence classifier; `reward_model:`, else the evaluated model) scores
the chosen and the rejected text of each pair; accuracy is the share where chosen scores higher (ties count as
wrong), with the mean margin. Rows are the Anthropic HH layout (`chosen`/`rejected` whole transcripts) or
prompt/chosen/rejected."""

from __future__ import annotations

from typing import Any

from posttrain.errors import DataError
from posttrain.evaluation.benchmarks import Benchmark, load_rows, split_hh_transcript
from posttrain.evaluation.kinds import BenchmarkKind, RunContext, register_kind
from posttrain.evaluation.runner import EvalResult, evaluate_preference
from posttrain.evaluation.suite import BenchmarkSpec


def build(spec: BenchmarkSpec, limit: int | None = None) -> Benchmark:
    rows, origin = load_rows(spec, limit)
    return Benchmark(name=spec.name, rows=preference_rows(rows, origin), kind=spec.kind, spec=spec)


def preference_rows(rows: Any, origin: str) -> Any:
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


def run(bench: Benchmark, ctx: RunContext) -> EvalResult:
    from reward_models.sequence_classifier import SequenceClassifierScorer

    return evaluate_preference(SequenceClassifierScorer(bench.spec.reward_model or ctx.model), bench)


KIND = register_kind(
    BenchmarkKind(
        name="preference",
        build=build,
        run=run,
        stand_in_fields=("prompt", "chosen", "rejected"),
        description="a reward model scores chosen above rejected",
    )
)
