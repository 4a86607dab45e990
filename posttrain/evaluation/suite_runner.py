"""`posttrain eval`: run a suite on one model, store every result, save per-sample outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError
from posttrain.evaluation.kinds import RunContext, benchmark_kind
from posttrain.evaluation.runner import EvalResult
from posttrain.evaluation.store import ResultRecord, ResultsStore
from posttrain.evaluation.suite import load_suite


@dataclass
class SuiteOutcome:
    record: ResultRecord
    result: EvalResult
    reruns: int  # earlier results with identical model, benchmark and settings


def model_label(model: str) -> str:
    """A short name for tables: the hub id, or for a run dir's `final/` the run's name."""
    path = Path(model)
    if path.exists():
        parts = path.resolve().parts
        return parts[-2] if parts[-1] in ("final", "base_model") and len(parts) > 1 else parts[-1]
    return model


def run_suite(
    model: str,
    suite_path: str | Path,
    *,
    backend: str = "hf",
    store: ResultsStore,
    samples_dir: Path = Path("eval/samples"),
    limit: int | None = None,
    label: str | None = None,
    batch_size: int = 64,
    generator: Any = None,
    tokenizer: Any = None,
) -> list[SuiteOutcome]:
    """Evaluate `model` on every benchmark of the suite, each built and run by its kind
    (posttrain.evaluation.kinds); one store row per benchmark. A text generator is made for `model` the first
    time a kind asks for one (or `generator`, with `tokenizer`, is used)."""
    from tqdm.auto import tqdm

    suite = load_suite(suite_path)
    kinds = [benchmark_kind(spec.kind) for spec in suite.benchmarks]
    # every benchmark's data is loaded (and its errors raised) before any model
    benchmarks = [kind.build(spec, limit) for kind, spec in zip(kinds, suite.benchmarks)]
    label = label or model_label(model)
    if not Path(model).exists() and model.count("/") != 1:
        raise ModelError(f"model path '{model}' does not exist")
    ctx = RunContext(model=model, backend=backend, batch_size=batch_size, generator=generator, tokenizer=tokenizer)
    outcomes = []
    for kind, spec, bench in tqdm(list(zip(kinds, suite.benchmarks, benchmarks)), desc=f"eval {label}",
                                  unit="benchmark"):  # fmt: skip
        result = kind.run(bench, ctx)
        settings = {**spec.settings(), "limit": limit}
        record = ResultRecord(model=model, model_label=label, benchmark=spec.name, settings=settings,
                              metrics=result.summary(), n=result.n, suite=suite.name,
                              suite_version=suite.version)  # fmt: skip
        record.samples_path = str(_save_samples(samples_dir, label, spec.name, record.settings_hash, result))
        store.add(record)  # a store locked past its timeout keeps the record pending beside it (store.kept)
        outcomes.append(SuiteOutcome(record, result, reruns=len(store.previous_identical(record))))
    return outcomes


def _save_samples(samples_dir: Path, label: str, benchmark: str, settings_hash: str, result: EvalResult) -> Path:
    safe = label.replace("/", "__")
    path = samples_dir / safe / f"{benchmark}-{settings_hash}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(s) + "\n" for s in result.samples))
    tmp.replace(path)
    if result.grid is not None:
        result.grid.save(path.with_suffix(".png"))
    return path


def format_outcomes(outcomes: list[SuiteOutcome]) -> str:
    lines = ["| benchmark | n | metric | value | ± stderr | other |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        m, metric = o.record.metrics, o.result.metric  # accuracy, or score (diffusion benchmarks)
        other = ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k not in (metric, f"{metric}_stderr"))
        note = f" (re-run #{o.reruns + 1} of identical settings)" if o.reruns else ""
        lines.append(
            f"| {o.record.benchmark}{note} | {o.result.n} | {metric} | {m[metric]:.3f} | {m[f'{metric}_stderr']:.3f} "
            f"| {other} |"
        )
    return "\n".join(lines)
