"""`posttrain eval`: run a suite on one model, store every result, save per-sample outputs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError
from posttrain.evaluation.benchmarks import build_benchmark
from posttrain.evaluation.runner import EvalResult, evaluate, evaluate_polar, evaluate_preference
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
    """Evaluate `model` on every benchmark of the suite; one store row per benchmark."""
    from tqdm.auto import tqdm

    suite = load_suite(suite_path)
    from posttrain.evaluation.diffusion import build_diffusion_benchmark

    benchmarks = [
        (build_diffusion_benchmark if spec.kind == "diffusion" else build_benchmark)(spec, limit=limit)
        for spec in suite.benchmarks
    ]  # data errors before any model
    label = label or model_label(model)
    if not Path(model).exists() and model.count("/") != 1:
        raise ModelError(f"model path '{model}' does not exist")
    outcomes = []
    for bench in tqdm(benchmarks, desc=f"eval {label}", unit="benchmark"):
        if bench.kind == "diffusion":
            from posttrain.evaluation.diffusion import evaluate_diffusion

            result = evaluate_diffusion(model, bench)
        elif bench.kind == "polar":
            from reward_models.polar import PolarScorer

            result = evaluate_polar(PolarScorer.from_pretrained(bench.spec.reward_model or model), bench)
        elif bench.kind == "preference":
            from reward_models.sequence_classifier import SequenceClassifierScorer

            result = evaluate_preference(SequenceClassifierScorer(bench.spec.reward_model or model), bench)
        else:
            if generator is None:
                from posttrain.rollout.factory import make_generator

                generator = make_generator(backend, model_path=model, batch_size=batch_size)
                tokenizer = getattr(generator, "tokenizer", tokenizer)
            result = evaluate(generator, bench, tokenizer)
        settings = {**bench.spec.settings(), "limit": limit}
        record = ResultRecord(model=model, model_label=label, benchmark=bench.name, settings=settings,
                              metrics=result.summary(), n=result.n, suite=suite.name,
                              suite_version=suite.version)  # fmt: skip
        record.samples_path = str(_save_samples(samples_dir, label, bench.name, record.settings_hash, result))
        store.add(record)
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
