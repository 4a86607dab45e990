"""`kind: diffusion`: a text-to-image model samples images for prompts (posttrain.evaluation.diffusion: fixed seeds,
DDIM + CFG); an image scorer (`scorer:`) scores them; mean score, and the win rate against `baseline:` when given.
Its data is prompts, not rows; a rehearsal samples 2 steps of 2 images and, for data that is not local, the colour
prompts the saturation scorer knows."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from posttrain.evaluation.diffusion import DiffusionBenchmark, build_diffusion_benchmark, evaluate_diffusion
from posttrain.evaluation.kinds import BenchmarkKind, RehearsalCuts, RunContext, register_kind
from posttrain.evaluation.runner import EvalResult
from posttrain.evaluation.suite import BenchmarkSpec

GENERATION_KEYS = ("steps", "guidance_scale", "seed", "n", "batch_size", "scheduler", "dtype")
# Keys of the stored settings hash: no prompt or grader, the scorer and the baseline instead.
HASH_KEYS = ("kind", "data", "generation", "scorer", "baseline", "limit")
STAND_IN_PROMPTS = {"prompts": ["red", "green", "blue"], "repeat": 2}  # what the saturation scorer knows
REHEARSAL_SAMPLING = {"steps": 2, "batch_size": 2, "n": 1, "dtype": "fp32"}


def run(bench: DiffusionBenchmark, ctx: RunContext) -> EvalResult:
    return evaluate_diffusion(ctx.model, bench)


def rehearsal_prompts(bench: BenchmarkSpec, cuts: RehearsalCuts) -> dict[str, Any]:
    """Prompts given inline, shipped or in a local file are kept; others become the colour prompts."""
    data = bench.data
    if "prompts" in data or "shipped" in data or (data.get("path") and Path(data["path"]).exists()):
        return data
    cuts.synthesised.append(bench.name)
    return copy.deepcopy(STAND_IN_PROMPTS)  # a fresh list each time: yaml.safe_dump would alias a shared one


def rehearsal_entry(entry: dict[str, Any], bench: BenchmarkSpec, cuts: RehearsalCuts) -> dict[str, Any]:
    """2 steps, 2 images a batch, 1 per prompt, fp32; a scorer that needs weights becomes `saturation`."""
    entry["generation"] = {**bench.generation, **REHEARSAL_SAMPLING}
    scorer = bench.scorer if isinstance(bench.scorer, str) else (bench.scorer or {}).get("name")
    entry["scorer"] = "saturation" if scorer in cuts.scorers_with_weights else bench.scorer
    if scorer in cuts.scorers_with_weights:
        cuts.replaced_scorers.append(scorer)
    return entry


KIND = register_kind(
    BenchmarkKind(
        name="diffusion",
        build=build_diffusion_benchmark,
        run=run,
        generation_keys=GENERATION_KEYS,
        takes_scorer=True,
        hash_keys=HASH_KEYS,
        stand_in_fields=None,  # image prompts, not text rows
        rehearse_data=rehearsal_prompts,
        rehearse_entry=rehearsal_entry,
        description="a text-to-image model's samples scored by an image scorer",
    )
)
