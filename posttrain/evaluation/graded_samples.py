"""Graded samples: a model's own completions on prompts with known answers, each labelled by a grader (true = the
grader accepts it). The result is unpaired preference data, rows (prompt, completion, label) plus the source's other
columns, for trainers that learn from single completions judged desirable or undesirable. Written by
`posttrain data graded-samples`.

Sampling goes through the rollout layer (posttrain.rollout, seeded) and grading through the benchmark graders, so a
label means what a held-out evaluation with the same grader would score.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.rollout import Generator, SamplingParams


@dataclass(frozen=True)
class SampleBuild:
    model: str  # model dir or hub id to sample
    data: Mapping[str, Any] = field(default_factory=dict)  # a data source (as in a recipe) with prompt + answer
    samples: int = 2  # completions per prompt
    temperature: float = 1.0
    max_new_tokens: int = 256
    grader: str = "numeric_match"
    seed: int = 0
    batch_size: int = 256

    def params(self) -> SamplingParams:
        return SamplingParams(
            n=self.samples, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed
        )


def build_graded_samples(build: SampleBuild, out: Path, generator: Generator | None = None) -> dict[str, int]:
    """Sample `build.samples` completions per prompt of `build.data`, grade each against the row's answer and write
    one row per non-empty completion to `out` (jsonl). Returns the counts {rows, desirable, undesirable, empty}."""
    from posttrain.data import load_source, render_prompt
    from posttrain.evaluation.graders import get_grader, grade_batch
    from posttrain.rollout.factory import make_generator

    get_grader(build.grader)  # an unknown grader fails before the model loads
    rows = load_source({**build.data, "schema": "prompt_answer"}, origin="--data")
    if generator is None:
        from posttrain.models.loading import quiet_library_progress

        quiet_library_progress()
        generator = make_generator("hf", model_path=build.model, batch_size=build.batch_size)
    tokenizer = getattr(generator, "tokenizer", None)
    prompts = list(rows["prompt"])
    groups = generator.generate([render_prompt(p, tokenizer) for p in prompts], build.params())
    golds = [str(a) for a in rows["answer"]]
    texts = [text for group in groups for text in group]
    verdicts = grade_batch(build.grader, texts, [g for g in golds for _ in range(build.samples)])
    extra = [c for c in rows.column_names if c not in ("prompt", "completion", "label")]
    lines = []
    for i, row in enumerate(rows.select_columns(extra).to_list() if extra else [{}] * len(rows)):
        for j in range(build.samples):
            k = i * build.samples + j
            if not texts[k].strip():
                continue  # an empty completion is no training text (the unpaired schema refuses it)
            completion = texts[k] if isinstance(prompts[i], str) else [{"role": "assistant", "content": texts[k]}]
            lines.append({"prompt": prompts[i], "completion": completion, "label": verdicts[k].correct, **row})
    desirable = sum(r["label"] for r in lines)
    empty = len(texts) - len(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tmp.replace(out)
    return {"rows": len(lines), "desirable": desirable, "undesirable": len(lines) - desirable, "empty": empty}
