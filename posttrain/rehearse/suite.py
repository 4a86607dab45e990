"""The rehearsal's eval suite: each benchmark cut to a few samples, its non-local data synthesised and model-based
image scorers replaced by the analytic saturation scorer."""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

import yaml

from posttrain.data.stand_ins import text_rows, write_rows
from posttrain.rehearse.common import EVAL_ROWS, IMAGE_SCORERS_WITH_WEIGHTS, MAX_NEW_TOKENS, ROWS, Rehearsal


def rehearse_suite(path: Path, out: Rehearsal, rng: random.Random) -> Path:
    """The suite with each benchmark cut to a few samples, its non-local data synthesised and its model-based
    image scorers replaced by the saturation scorer: each benchmark kind shrinks itself
    (`posttrain.evaluation.kinds`)."""
    from posttrain.evaluation.kinds import RehearsalCuts, benchmark_kind
    from posttrain.evaluation.suite import load_suite

    suite = load_suite(path)
    cuts = RehearsalCuts(max_new_tokens=MAX_NEW_TOKENS, scorers_with_weights=IMAGE_SCORERS_WITH_WEIGHTS,
                         stand_in_source=functools.partial(suite_source, out=out, rng=rng))  # fmt: skip
    entries = []
    for bench in suite.benchmarks:
        kind = benchmark_kind(bench.kind)
        entry = {"name": bench.name, "kind": bench.kind, "data": kind.stand_in_data(bench, cuts), "limit": EVAL_ROWS}
        entry = kind.shrink_for_rehearsal(entry, bench, cuts)
        for dropped in ("baseline", "reward_model"):
            if getattr(bench, dropped, None):
                out.note(f"suite {suite.name}/{bench.name}: {dropped} {getattr(bench, dropped)} dropped")
        entries.append({k: v for k, v in entry.items() if v not in (None, [], {})})
    if cuts.synthesised:
        out.note(f"suite {suite.name}: data not local -> {ROWS} synthetic rows (text) or the colour prompts "
                 f"(images) for {', '.join(cuts.synthesised)}")  # fmt: skip
    if cuts.replaced_scorers:
        kinds = ", ".join(dict.fromkeys(cuts.replaced_scorers))
        out.note(f"suite {suite.name}: image scorers {kinds} -> saturation (analytic, no weights)")
        out.not_rehearsed.append(f"the image scorers {kinds}: their packages and weights (saturation stood in)")  # fmt: skip
    target = out.workdir / "suite.yaml"
    target.write_text(yaml.safe_dump({"name": suite.name, "version": suite.version, "benchmarks": entries},
                                     sort_keys=False))  # fmt: skip
    out.did(f"eval suite {suite.name}: {len(entries)} benchmarks, {EVAL_ROWS} samples each")
    return target


def suite_source(
    name: str, data: dict[str, Any], fields: tuple[str, ...], out: Rehearsal, rng: random.Random
) -> dict[str, Any]:
    if "synthetic" in data or (isinstance(data.get("path"), str) and Path(data["path"]).exists()):
        return data
    target = out.workdir / "data" / f"suite_{name}.jsonl"
    write_rows(target, text_rows(fields, ROWS, rng))
    return {"path": str(target)}
