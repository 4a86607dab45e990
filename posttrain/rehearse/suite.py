"""The rehearsal's eval suite: each benchmark cut to a few samples, its non-local data synthesised and model-based
image scorers replaced by the analytic saturation scorer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from posttrain.data.stand_ins import text_rows, write_rows
from posttrain.rehearse.common import EVAL_ROWS, IMAGE_SCORERS_WITH_WEIGHTS, MAX_NEW_TOKENS, ROWS, Rehearsal


def rehearse_suite(path: Path, out: Rehearsal, rng: random.Random) -> Path:
    """The suite with each benchmark cut to a few samples, its non-local data synthesised and its model-based
    image scorers replaced by the saturation scorer."""
    from posttrain.evaluation.suite import load_suite

    suite = load_suite(path)
    entries, scorers, synthesised = [], [], []
    for bench in suite.benchmarks:
        data = suite_data(bench, out, rng)
        if data is not bench.data:
            synthesised.append(bench.name)
        entry = {"name": bench.name, "kind": bench.kind, "data": data, "limit": EVAL_ROWS}
        if bench.kind == "diffusion":
            entry["generation"] = {**bench.generation, "steps": 2, "batch_size": 2, "n": 1, "dtype": "fp32"}
            scorer = bench.scorer if isinstance(bench.scorer, str) else (bench.scorer or {}).get("name")
            entry["scorer"] = "saturation" if scorer in IMAGE_SCORERS_WITH_WEIGHTS else bench.scorer
            if scorer in IMAGE_SCORERS_WITH_WEIGHTS:
                scorers.append(scorer)
        else:
            gen = dict(bench.generation)
            gen["max_new_tokens"] = min(int(gen.get("max_new_tokens", MAX_NEW_TOKENS)), MAX_NEW_TOKENS)
            prompt = dict(bench.prompt)
            if isinstance(prompt.get("few_shot_data"), dict):
                shots = suite_source(f"{bench.name}_shots", prompt["few_shot_data"], ("prompt", "answer", "solution"),
                                     out, rng)  # fmt: skip
                if shots is not prompt["few_shot_data"]:
                    synthesised.append(f"{bench.name} (few-shot examples)")
                prompt["few_shot_data"] = shots
            entry.update(prompt=prompt, generation=gen, grader=bench.grader, metrics=bench.metrics,
                         slice_column=bench.slice_column)  # fmt: skip
        for dropped in ("baseline", "reward_model"):
            if getattr(bench, dropped, None):
                out.note(f"suite {suite.name}/{bench.name}: {dropped} {getattr(bench, dropped)} dropped")
        entries.append({k: v for k, v in entry.items() if v not in (None, [], {})})
    if synthesised:
        out.note(f"suite {suite.name}: data not local -> {ROWS} synthetic rows (text) or the colour prompts "
                  f"(images) for {', '.join(synthesised)}")  # fmt: skip
    if scorers:
        kinds = ", ".join(dict.fromkeys(scorers))
        out.note(f"suite {suite.name}: image scorers {kinds} -> saturation (analytic, no weights)")
        out.not_rehearsed.append(f"the image scorers {kinds}: their packages and weights (saturation stood in)")  # fmt: skip
    target = out.workdir / "suite.yaml"
    target.write_text(yaml.safe_dump({"name": suite.name, "version": suite.version, "benchmarks": entries},
                                     sort_keys=False))  # fmt: skip
    out.did(f"eval suite {suite.name}: {len(entries)} benchmarks, {EVAL_ROWS} samples each")
    return target


def suite_data(bench: Any, out: Rehearsal, rng: random.Random) -> dict[str, Any]:
    data = bench.data
    if bench.kind == "diffusion":
        if "prompts" in data or "shipped" in data or (data.get("path") and Path(data["path"]).exists()):
            return data
        return {"prompts": ["red", "green", "blue"], "repeat": 2}  # what the saturation scorer knows
    fields = {"preference": ("prompt", "chosen", "rejected"),
              "polar": ("prompt", "reference", "chosen", "rejected")}.get(bench.kind, ("prompt", "answer", "solution"))  # fmt: skip
    if bench.slice_column:
        fields = (*fields, bench.slice_column)
    return suite_source(bench.name, data, fields, out, rng)


def suite_source(
    name: str, data: dict[str, Any], fields: tuple[str, ...], out: Rehearsal, rng: random.Random
) -> dict[str, Any]:
    if "synthetic" in data or (isinstance(data.get("path"), str) and Path(data["path"]).exists()):
        return data
    target = out.workdir / "data" / f"suite_{name}.jsonl"
    write_rows(target, text_rows(fields, ROWS, rng))
    return {"path": str(target)}
