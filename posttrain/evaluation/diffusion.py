"""`kind: diffusion` benchmarks: prompts → images (fixed seeds, DDIM + CFG) → an image scorer → mean score with its
standard error and 95% interval, and, when `baseline:` names a second model, the win rate against the baseline's
images for the same prompts and the same initial noise.

```yaml
- name: toy_colors
  kind: diffusion
  data: {prompts: [red, green, blue], repeat: 16}      # or {path: prompts.json|.jsonl|.txt, column: prompt}
  generation: {steps: 10, guidance_scale: 3.0, seed: 0, n: 1, batch_size: 32}
  scorer: saturation                                  # or {name: pickscore, model_path: ..., processor_path: ...}
  baseline: runs/base/final                           # optional
```

Seeds: images are drawn in the benchmark's row order (each prompt `n` times), `batch_size` at a time, the initial
noise from one CPU generator seeded with `generation.seed`; so the noise of image i is fixed by (seed, i,
batch_size) and is the same for the model and its baseline (DDIM with eta = 0 draws no other noise).

Win rate: per image, 1 if the model's score beats the baseline's, 0.5 on a tie, 0 otherwise, averaged; a model
against itself therefore scores exactly 0.5. The headline metric is a *score*, not an accuracy (`EvalResult.metric`):
logged as `eval/<name>/score` with `score_ci95_low/high` (the report draws them as a band on a score panel of its
own), stored as `score` and `score_stderr` (a leaderboard column of the score kind); `win_rate` and its interval,
and `baseline_score_mean`, sit beside it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import DataError, RewardError, unknown_key
from posttrain.evaluation.runner import EvalResult
from posttrain.evaluation.suite import BenchmarkSpec

DATA_KEYS = (
    "prompts",
    "path",
    "shipped",
    "dataset",
    "hpsv2_benchmark",
    "split",
    "config",
    "column",
    "unique",
    "repeat",
)
SCHEDULERS = ("ddim", "pipeline")
DTYPES = ("fp32", "fp16")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"  # prompt sets shipped as package data (see README there)
Z95 = 1.959963984540054


@dataclass
class DiffusionBenchmark:
    """Prompts ready to sample, with the sampling settings and the scorer spec of a `kind: diffusion` benchmark."""

    name: str
    prompts: list[str]
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    n: int = 1  # images per prompt
    batch_size: int = 32
    scheduler: str = "ddim"  # or "pipeline": the model's own scheduler class (SD 1.5: PNDM), as the paper samples
    dtype: str = "fp32"  # or "fp16" (on a GPU)
    scorer: dict[str, Any] = field(default_factory=lambda: {"name": "saturation"})
    baseline: str | None = None
    kind: str = "diffusion"
    spec: Any = None


def scorer_spec(value: Any) -> dict[str, Any]:
    """`scorer: name` or `scorer: {name: ..., **kwargs}` → {"name": ..., **kwargs}."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return dict(value)
    raise DataError(f"scorer must be a name or a mapping with 'name', got {value!r}")


def load_prompts(data: dict[str, Any], origin: str) -> list[str]:
    """Prompts from `prompts:` (a list), `path:` (a JSON list of strings or of rows, jsonl rows, or a .txt file
    with one prompt a line; rows give `column`, default `prompt`), `shipped:` (a prompt set in
    posttrain/evaluation/prompts/, by name), `dataset:` (a hub dataset or local dataset dir through the data layer,
    with `split`, `config` and `column`) or `hpsv2_benchmark:` (the HPS v2 benchmark's prompts from the `hpsv2`
    package: all, anime, concept-art, paintings or photo); `unique: true` drops repeated prompts (first kept); then
    each is repeated `repeat` times in a row."""
    unknown = [k for k in data if k not in DATA_KEYS]
    if unknown:
        raise DataError(f"{origin}: {unknown_key(unknown[0], DATA_KEYS, 'diffusion data')}")
    if "prompts" in data:
        prompts = data["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise DataError(f"{origin}: data.prompts must be a list of strings")
    elif "path" in data:
        prompts = _prompts_from_file(Path(data["path"]).expanduser(), str(data.get("column", "prompt")), origin)
    elif "shipped" in data:  # by name, so the results store's settings hash is the same on every install
        path = PROMPTS_DIR / f"{data['shipped']}.json"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in PROMPTS_DIR.glob("*.json")))
            raise DataError(f"{origin}: no shipped prompt set '{data['shipped']}' (shipped: {names})")
        prompts = _prompts_from_file(path, str(data.get("column", "prompt")), origin)
    elif "dataset" in data:
        prompts = _prompts_from_dataset(data, origin)
    elif "hpsv2_benchmark" in data:
        prompts = _hpsv2_benchmark_prompts(str(data["hpsv2_benchmark"]), origin)
    else:
        raise DataError(
            f"{origin}: diffusion data needs 'prompts' (a list), 'path' (a prompt file), 'shipped', 'dataset' or "
            "'hpsv2_benchmark'"
        )
    if data.get("unique"):
        prompts = list(dict.fromkeys(prompts))
    repeat = int(data.get("repeat", 1))
    prompts = [p for p in prompts for _ in range(repeat)]
    if not prompts:
        raise DataError(f"{origin}: has no prompts")
    return prompts


def _prompts_from_dataset(data: dict[str, Any], origin: str) -> list[str]:
    """A prompt column of a hub dataset (or a local dataset dir/file) loaded through the data layer: offline, a
    hub name fails with the data layer's message (pass a local path)."""
    from posttrain.data.sources import load_source

    spec = {"path": str(data["dataset"]), "split": str(data.get("split", "train"))}
    if data.get("config") is not None:
        spec["config"] = str(data["config"])
    rows = load_source(spec, origin=f"{origin}: data.dataset")
    column = str(data.get("column", "prompt"))
    if column not in rows.column_names:
        raise DataError(
            f"{origin}: {data['dataset']} has no column '{column}' (columns: {', '.join(rows.column_names)})"
        )
    prompts = rows[column]
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise DataError(f"{origin}: {data['dataset']}: row {bad + 1} has no string '{column}'")
    return list(prompts)


HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


def _hpsv2_benchmark_prompts(style: str, origin: str) -> list[str]:
    """The HPS v2 benchmark prompts (800 per style) as the `hpsv2` package ships them, in style order."""
    if style not in ("all", *HPS_STYLES):
        raise DataError(f"{origin}: hpsv2_benchmark must be all or one of {', '.join(HPS_STYLES)}, got {style!r}")
    try:
        import hpsv2
    except ImportError as err:
        raise DataError(
            f"{origin}: the HPS v2 benchmark prompts come with the hpsv2 package: pip install hpsv2"
        ) from err
    found = hpsv2.benchmark_prompts(style)
    if isinstance(found, dict):
        return [p for name in HPS_STYLES if name in found for p in found[name]]
    return list(found)


def _prompts_from_file(path: Path, column: str, origin: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{origin}: prompt file {path} not found")
    if path.suffix in (".jsonl", ".gz"):  # the data layer's reader: a bad line is named by its number
        from posttrain.data.sources import jsonl_rows

        rows = jsonl_rows(path, f"{origin}: {path}")[0]
    else:
        text = path.read_text()
        if path.suffix == ".txt":
            return [line.strip() for line in text.splitlines() if line.strip()]
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{origin}: {path} is not valid JSON: {err}") from err
    prompts = []
    for i, row in enumerate(rows):
        value = row if isinstance(row, str) else row.get(column) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{origin}: {path}: row {i + 1} has no string '{column}'")
        prompts.append(value)
    return prompts


def describe_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> str:
    """One line for a dry-run plan: the prompts' source and count (a hub dataset or the hpsv2 package is named, not
    fetched), the sampling settings and the scorer."""
    data, g = spec.data, spec.generation
    if "dataset" in data and not Path(str(data["dataset"])).expanduser().exists():
        source = f"prompts from hub dataset {data['dataset']} split {data.get('split', 'train')} column " \
                 f"{data.get('column', 'prompt')} (not fetched by --dry-run)"  # fmt: skip
    elif "hpsv2_benchmark" in data:
        source = f"the HPS v2 benchmark prompts ({data['hpsv2_benchmark']}, from the hpsv2 package)"
    else:
        source = f"{len(build_diffusion_benchmark(spec, limit).prompts)} prompts"
    scorer = scorer_spec(spec.scorer or "saturation")
    options = ", ".join(f"{k} {v}" for k, v in scorer.items() if k != "name")
    return (f"{spec.name}: {source}; {g.get('scheduler', 'ddim')} scheduler, {g.get('steps', 20)} steps, CFG "
            f"{g.get('guidance_scale', 7.5)}, {g.get('n', 1)} image(s) per prompt, seed {g.get('seed', 0)}, "
            f"{g.get('dtype', 'fp32')}; scorer {scorer['name']}" + (f" ({options})" if options else ""))  # fmt: skip


def build_diffusion_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> DiffusionBenchmark:
    """Load the prompts (errors name the benchmark); `limit` caps the number of prompts (after `repeat`)."""
    origin = f"benchmark '{spec.name}'"
    prompts = load_prompts(spec.data, origin)
    cap = min(x for x in (limit, spec.limit, len(prompts)) if x is not None)
    g = spec.generation
    scheduler, dtype = str(g.get("scheduler", "ddim")), str(g.get("dtype", "fp32"))
    if scheduler not in SCHEDULERS or dtype not in DTYPES:
        raise DataError(f"{origin}: generation.scheduler must be one of {', '.join(SCHEDULERS)} and generation.dtype "
                        f"one of {', '.join(DTYPES)}, got {scheduler!r} and {dtype!r}")  # fmt: skip
    return DiffusionBenchmark(
        name=spec.name, prompts=prompts[:cap], steps=int(g.get("steps", 20)),
        guidance_scale=float(g.get("guidance_scale", 7.5)), seed=int(g.get("seed", 0)), n=int(g.get("n", 1)),
        batch_size=int(g.get("batch_size", 32)), scheduler=scheduler, dtype=dtype,
        scorer=scorer_spec(spec.scorer or "saturation"), baseline=spec.baseline, spec=spec,
    )  # fmt: skip


def win_rates(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """Per image: 1 if the score beats the baseline's, 0.5 on a tie, 0 otherwise."""
    if len(scores) != len(baseline_scores):
        raise ValueError(f"win_rates: {len(scores)} scores but {len(baseline_scores)} baseline scores")
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)]


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean, its standard error and a normal 95% interval (mean ± 1.96 stderr)."""
    from posttrain.evaluation.metrics import mean_stderr

    mean, stderr = mean_stderr(values)
    return {"mean": mean, "stderr": stderr, "ci95_low": mean - Z95 * stderr, "ci95_high": mean + Z95 * stderr}


def score_model(model: str | Path, bench: DiffusionBenchmark, scorer: Any, device: Any = None):
    """(prompts in sampling order, images, scores) of `model` on the benchmark."""
    from posttrain.models.diffusion import load_stack
    from posttrain.rollout.diffusion import sample_images

    prompts = [p for p in bench.prompts for _ in range(bench.n)]
    stack = load_stack(model)
    images = sample_images(stack, prompts, bench.steps, bench.guidance_scale, bench.seed, bench.batch_size, device,
                           scheduler=bench.scheduler, dtype=bench.dtype)  # fmt: skip
    return prompts, images, scorer.score(images, prompts)


def evaluate_diffusion(model: str | Path, bench: DiffusionBenchmark, scorer: Any = None, device: Any = None):
    """Sample, score and aggregate; with a baseline, also sample it with the same noise and count wins."""
    if scorer is None:
        from reward_models.image import image_scorer

        spec = dict(bench.scorer)
        scorer = image_scorer(spec.pop("name"), **spec)
    prompts, images, scores = score_model(model, bench, scorer, device)
    stats = mean_ci(scores)
    extra = {"score_ci95_low": stats["ci95_low"], "score_ci95_high": stats["ci95_high"]}
    samples = [{"prompt": p, "index": i, "score": s} for i, (p, s) in enumerate(zip(prompts, scores))]
    shown = grid_indices(len(images))
    grid_rows = [images[shown]]
    if bench.baseline is not None:
        _, base_images, base_scores = score_model(bench.baseline, bench, scorer, device)
        grid_rows.append(base_images[shown])
        wins = win_rates(scores, base_scores)
        w = mean_ci(wins)
        extra.update(win_rate=w["mean"], win_rate_stderr=w["stderr"], win_rate_ci95_low=w["ci95_low"],
                     win_rate_ci95_high=w["ci95_high"], baseline_score_mean=sum(base_scores) / len(base_scores))  # fmt: skip
        for sample, b, win in zip(samples, base_scores, wins):
            sample.update(baseline_score=b, win=win)
    if not all(math.isfinite(s) for s in scores):
        raise RewardError(f"benchmark '{bench.name}': scorer '{bench.scorer['name']}' returned a non-finite score")
    from reward_models.image import image_grid

    return EvalResult(
        name=bench.name, accuracy=stats["mean"], n=len(scores), stderr=stats["stderr"], extra=extra, samples=samples,
        grid=image_grid(grid_rows), metric="score",
    )  # fmt: skip


def grid_indices(n: int, count: int = 16) -> list[int]:
    """`count` image indices spread evenly over `n` (so a grid shows every prompt of a repeated prompt list)."""
    if n <= count:
        return list(range(n))
    return [round(i * (n - 1) / (count - 1)) for i in range(count)]
