"""Benchmark suites: `eval/suites/*.yaml` list benchmarks, by built-in name or inline, with overrides.

```yaml
name: math
version: 1
benchmarks:
  - gsm8k                                   # a built-in, as defined in BUILTIN_BENCHMARKS
  - {use: math500, limit: 200}              # a built-in with overrides (deep-merged)
  - name: my_set                            # inline: a data source, prompt, generation, grader
    data: {path: data/my.jsonl, columns: {prompt: question}}
    grader: math_verify
```

A benchmark definition is validated when the suite loads, before any model does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import RecipeError, unknown_key
from posttrain.evaluation.graders import GRADERS
from posttrain.evaluation.kinds import benchmark_kind, kind_names
from posttrain.recipe import deep_merge

GRADER_NAMES = tuple(GRADERS)  # the graders registry is the one list (it was copied here and had lost boxed_strict)
BENCHMARK_KEYS = ("name", "use", "kind", "data", "prompt", "generation", "grader", "metrics", "slice_column", "limit",
                  "reward_model", "scorer", "baseline")  # fmt: skip
PROMPT_KEYS = ("template", "chat_template", "system_prompt", "few_shot", "few_shot_data", "shot_template")

# lm-eval-harness's GSM8K prompt ("Question: ...\nAnswer:", 5 shots from the train split), so numbers compare.
_GSM8K_STOP = ["Question:", "</s>", "<|im_end|>", "\n\n\n"]
# The SePPO paper's sampling: the pipeline's default scheduler, 50 steps, CFG 7.5, one image per prompt, seed 0, fp16.
PAPER_SAMPLING = {"scheduler": "pipeline", "steps": 50, "guidance_scale": 7.5, "seed": 0, "n": 1, "batch_size": 16,
                  "dtype": "fp16"}  # fmt: skip
# The NFT paper's math evaluation (Chen et al. 2025; NVlabs/NFT @ ed8e5b0972af113a6ac38c6c6065349e0f32c070):
# train_7B.sh validates with val_kwargs temperature 0.6, top_p 0.7, top_k -1 (off), do_sample, responses up to
# max_response_length = 4096 - 512 = 3584 tokens. Prompts: Qwen2.5-Math's chain-of-thought system prompt (the
# official parquets' own prompts could not be read here). Graders per verifier.py `_default_compute_score`.
NFT_SAMPLING = {"max_new_tokens": 3584, "temperature": 0.6, "top_p": 0.7}
_BOXED_COT = {"chat_template": True,
              "system_prompt": "Please reason step by step, and put your final answer within \\boxed{}."}  # fmt: skip


def _avg32_strict(path: str, split: str, column: str) -> dict:
    """An NFT-paper competition set: 32 samples per problem at the paper's sampling, DAPO's strict verifier."""
    return {"kind": "generate", "data": {"path": path, "split": split, "columns": {"prompt": column}},
            "prompt": _BOXED_COT, "generation": {**NFT_SAMPLING, "n": 32}, "grader": "dapo_strict",
            "metrics": ["avg@32", "pass@32"]}  # fmt: skip


BUILTIN_BENCHMARKS: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "kind": "generate",
        "data": {"path": "openai/gsm8k", "config": "main", "split": "test", "format": "gsm8k"},
        "prompt": {"template": "Question: {prompt}\nAnswer:", "few_shot": 5, "shot_template": "Question: {prompt}\nAnswer: {solution}",
                   "few_shot_data": {"path": "openai/gsm8k", "config": "main", "split": "train", "format": "gsm8k"}},
        "generation": {"max_new_tokens": 256, "temperature": 0.0, "stop": _GSM8K_STOP},
        "grader": "math_verify",
    },
    "math500": {
        "kind": "generate",
        "data": {"path": "HuggingFaceH4/MATH-500", "split": "test", "columns": {"prompt": "problem"}},
        "prompt": {"chat_template": True,
                   "system_prompt": "Please reason step by step, and put your final answer within \\boxed{}."},
        "generation": {"max_new_tokens": 2048, "temperature": 0.0},
        "grader": "math_verify",
    },
    "arithmetic": {
        "kind": "generate",
        "data": {"synthetic": "arithmetic", "split": "eval", "n": 1000},
        "generation": {"max_new_tokens": 5, "temperature": 0.0},
        "grader": "numeric_match",
        "slice_column": "carry",
    },
    "preference_accuracy": {
        "kind": "preference",
        "data": {"path": "Anthropic/hh-rlhf", "split": "test"},
    },
    # POLAR RMs: pairwise accuracy on (prompt, reference, chosen, rejected) rows, scored against the reference.
    # Point `data` at held-out pretraining triplets (policy discrimination) or at reference-carrying human pairs.
    "polar_discrimination": {
        "kind": "polar",
        "data": {"synthetic": "polar_markov", "split": "heldout", "n": 1000},
    },
    # Text-to-image (posttrain.evaluation.diffusion): mean image score over seeded samples, win rate vs `baseline`.
    # The coloured-squares task (posttrain.data.toy_images) with its analytic saturation reward: 100 per colour
    # (300 images: the 95% interval of the mean is about +-0.03, narrow enough to tell a trained model from its base).
    "toy_colors": {
        "kind": "diffusion",
        "data": {"prompts": ["red", "green", "blue"], "repeat": 100},
        "generation": {"steps": 20, "guidance_scale": 3.0, "seed": 0, "n": 1, "batch_size": 100},
        "scorer": "saturation",
    },
    # ImageReward's 100 benchmark prompts (ImageReward paper, sec. 5; shipped in posttrain/evaluation/prompts/, with
    # their source); scoring needs the `image-reward` package and weights.
    "imagereward_prompts": {
        "kind": "diffusion",
        "data": {"shipped": "imagereward_benchmark", "column": "prompt"},
        "generation": {"steps": 50, "guidance_scale": 7.5, "seed": 0, "n": 1, "batch_size": 8},
        "scorer": "imagereward",
    },
    # The SePPO paper's evaluation (Zhang et al. 2024, sec. 5): SD 1.5 sampled with the pipeline's default scheduler
    # (PNDM), 50 steps, CFG 7.5, one image per prompt from one seed-0 generator, fp16; scored by PickScore (raw
    # cosine x 100), HPS v2.0 (x 100), ImageReward v1.0 and the LAION aesthetic predictor (the suite
    # eval/suites/seppo_paper.yaml runs every pair).
    "pickapic_validation_unique": {  # Pick-a-Pic v2's 500 unique validation captions (the images are not needed)
        "kind": "diffusion",
        "data": {"dataset": "yuvalkirstain/pickapic_v2_no_images", "split": "validation_unique", "column": "caption"},
        "generation": PAPER_SAMPLING,
        "scorer": "pickscore",
    },
    "partiprompts": {  # PartiPrompts (Yu et al. 2022), 1,632 prompts
        "kind": "diffusion",
        "data": {"dataset": "nateraw/parti-prompts", "split": "train", "column": "Prompt"},
        "generation": PAPER_SAMPLING,
        "scorer": "pickscore",
    },
    "hps_benchmark": {  # HPS v2's benchmark: 800 prompts per style (anime, concept-art, paintings, photo)
        "kind": "diffusion",
        "data": {"hpsv2_benchmark": "all"},
        "generation": PAPER_SAMPLING,
        "scorer": {"name": "hpsv2", "hps_version": "v2.0"},
    },
    # The NFT paper's competition sets: avg@32 (README: "We report avg@32 for AIME24, AIME25, and AMC23"; the
    # official run repeats each problem 32 times and ray_nft_trainer.py `_validate` averages acc per prompt, then
    # over prompts), graded by DAPO's strict box verifier as verifier.py does for 'aime_2025_dapo_boxed' and
    # 'amc2023_dapo_boxed' (AIME24's data_source could not be read; the same verifier is assumed).
    "aime24": _avg32_strict("HuggingFaceH4/aime_2024", "train", "problem"),
    "aime25": _avg32_strict("math-ai/aime25", "test", "problem"),
    "amc23": _avg32_strict("math-ai/amc23", "test", "question"),
    # One sample per problem (avg@1), math-verify as verifier.py does for 'minerva_math' and 'olympiadbench'.
    "minerva_math": {
        "kind": "generate",
        "data": {"path": "math-ai/minervamath", "split": "test", "columns": {"prompt": "question"}},
        "prompt": _BOXED_COT,
        "generation": {**NFT_SAMPLING, "n": 1},
        "grader": "math_verify",
    },
    "olympiadbench": {  # final_answer is a list of answers: the generate kind joins it into one gold string
        "kind": "generate",
        "data": {"path": "math-ai/olympiadbench", "split": "test",
                 "columns": {"prompt": "question", "answer": "final_answer"}},
        "prompt": _BOXED_COT,
        "generation": {**NFT_SAMPLING, "n": 1},
        "grader": "math_verify",
    },
}  # fmt: skip


@dataclass
class BenchmarkSpec:
    """One validated benchmark definition (data is loaded later, by `posttrain.evaluation.benchmarks`)."""

    name: str
    kind: str = "generate"
    data: dict[str, Any] = field(default_factory=dict)
    prompt: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    grader: str = "math_verify"
    metrics: list[str] = field(default_factory=list)  # extra metrics, e.g. ["pass@4", "maj@8"]; accuracy always
    slice_column: str | None = None
    limit: int | None = None
    reward_model: str | None = None  # preference benchmarks: the RM to score with (defaults to --model)
    scorer: Any = None  # diffusion benchmarks: an image scorer name or {name, **options} (reward_models.image)
    baseline: str | None = None  # diffusion benchmarks: a model whose images the win rate compares against

    def settings(self) -> dict[str, Any]:
        """Everything that determines this benchmark's numbers, for the results store's settings hash: the fields
        its kind names (`BenchmarkKind.hash_keys`)."""
        return benchmark_kind(self.kind).settings(self)


@dataclass
class Suite:
    name: str
    version: str
    benchmarks: list[BenchmarkSpec]
    source: Path | None = None


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; paths in it are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: suite file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a suite must be a mapping with 'benchmarks'")
    for key in raw:
        if key not in ("name", "version", "description", "benchmarks"):
            raise RecipeError(
                f"{path}: {unknown_key(key, ('name', 'version', 'description', 'benchmarks'), 'a suite')}"
            )
    entries = raw.get("benchmarks")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{path}: 'benchmarks' must be a non-empty list")
    specs = [
        resolve_benchmark(entry, f"{path}: benchmarks[{i}]", base_dir=path.parent) for i, entry in enumerate(entries)
    ]
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise RecipeError(f"{path}: benchmark names must be unique; repeated: {', '.join(sorted(dupes))}")
    return Suite(
        name=str(raw.get("name", path.stem)), version=str(raw.get("version", "1")), benchmarks=specs, source=path
    )


def resolve_benchmark(entry: Any, where: str, base_dir: Path | None = None) -> BenchmarkSpec:
    """A suite entry (built-in name, `{use: name, ...overrides}` or an inline definition) → BenchmarkSpec."""
    if isinstance(entry, str):
        entry = {"use": entry}
    if not isinstance(entry, dict):
        raise RecipeError(f"{where}: a benchmark is a built-in name or a mapping, got {entry!r}")
    for key in entry:
        if key not in BENCHMARK_KEYS:
            raise RecipeError(f"{where}: {unknown_key(key, BENCHMARK_KEYS, 'a benchmark')}")
    definition = copy.deepcopy(entry)
    use = definition.pop("use", None)
    if use is not None:
        if use not in BUILTIN_BENCHMARKS:
            raise RecipeError(f"{where}: {unknown_key(use, BUILTIN_BENCHMARKS, noun='built-in benchmark')}")
        builtin = BUILTIN_BENCHMARKS[use]
        if _scorer_name(definition.get("scorer")) not in (None, _scorer_name(builtin.get("scorer"))):
            builtin = {k: v for k, v in builtin.items() if k != "scorer"}  # another scorer: its options do not merge
        definition = deep_merge(builtin, definition)
        definition.setdefault("name", use)
    if "name" not in definition:
        raise RecipeError(f"{where}: an inline benchmark needs a 'name' (or 'use: <built-in>')")
    if "data" not in definition:
        raise RecipeError(f"{where} ({definition['name']}): missing 'data' (a data source)")
    _check_section(definition.get("prompt", {}), PROMPT_KEYS, f"{where}.prompt")
    kind = benchmark_kind(definition.get("kind", "generate"), where)
    _check_section(definition.get("generation", {}), kind.generation_keys, f"{where}.generation")
    if not kind.takes_scorer and ("scorer" in definition or "baseline" in definition):
        takers = [name for name in kind_names() if benchmark_kind(name).takes_scorer]
        raise RecipeError(f"{where}: 'scorer' and 'baseline' apply to kind: {', '.join(takers)} only")
    grader = definition.get("grader", "math_verify")
    if kind.needs_grader and grader not in GRADER_NAMES:
        raise RecipeError(f"{where}: {unknown_key(grader, GRADER_NAMES, noun='grader')}")
    for metric in definition.get("metrics", []):
        counted = metric.startswith(("avg@", "pass@", "maj@")) and metric.split("@")[1].isdigit()
        if not (metric == "accuracy" or counted):
            raise RecipeError(f"{where}: unknown metric '{metric}' (accuracy, avg@K, pass@K, maj@K)")
    if base_dir is not None:
        for section in ("data",):
            _anchor_path(definition[section], base_dir)
        if isinstance(definition.get("prompt", {}).get("few_shot_data"), dict):
            _anchor_path(definition["prompt"]["few_shot_data"], base_dir)
    return BenchmarkSpec(**definition)


def _check_section(section: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(section, dict):
        raise RecipeError(f"{where} must be a mapping")
    for key in section:
        if key not in valid:
            raise RecipeError(f"{where}: {unknown_key(key, valid)}")


def _anchor_path(source: dict[str, Any], base_dir: Path) -> None:
    """Make a relative local path in a suite file relative to the file (hub ids are left alone)."""
    value = source.get("path")
    if isinstance(value, str) and (base_dir / value).exists():
        source["path"] = str(base_dir / value)


def _scorer_name(scorer: Any) -> str | None:
    """The name of a benchmark's `scorer:` (a name, or a mapping with `name`), or None without one."""
    return scorer.get("name") if isinstance(scorer, dict) else scorer
