"""`trainer: seppo`: semi-policy preference optimisation for text-to-image diffusion (Zhang et al. 2024) and its
baselines (SFT on winners, SePPO without the flipper, Diffusion-DPO on real pairs), on diffusers + accelerate.

The loop mirrors Diffusion-DPO's training script (which SePPO forked): frozen VAE and text encoder, latents x the
VAE scaling factor, 20% empty-prompt dropout, epsilon-prediction at uniform timesteps, AdamW with weight decay 1e-2,
gradient clipping at 1.0, gradient accumulation. SePPO adds stages: K stages of M optimizer updates; at each stage
start a reference is drawn from the pool of past checkpoints (`posttrain.trainers.seppo_pool`) and, after the
stage, a copy of theta joins the pool. Each row's second image is a sample the reference UNet draws for the row's
prompt (full DDIM reverse diffusion with CFG, no_grad, on the fly per micro-batch). The loss is
`posttrain.trainers.seppo_loss`.

Checkpoints are written at stage ends (accelerate state + stage/step/pool size, with a completion marker); pool
entries live once in <run>/pool/, so resuming rebuilds the pool and redraws the same references (draws and the
per-stage RNG depend only on seed and stage).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import RecipeError
from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.lifecycle import RunResult, finish, record_evaluation, save_final, start
from posttrain.trainers.seppo_variants import USES_REFERENCE_SAMPLES, Draw, Variant


@dataclass(frozen=True)
class SePPOOptions:
    """SePPO's `algorithm:` keys. Defaults are Diffusion-DPO's / the paper's for SD 1.5 where they exist."""

    variant: Variant = field(
        default="seppo",
        metadata={"help": "seppo (AAF), seppo_indicator, seppo_no_aaf (s = +1), sft_winner (MSE), diffusion_dpo"},
    )
    reference: Draw = field(
        default="uniform",
        metadata={"help": "how each stage draws its reference from the pool (diffusion_dpo defaults to initial)"},
    )
    beta: float = field(default=5000.0, metadata={"help": "KL strength; the logit is -beta/2 x (error differences)"})
    num_stages: int = field(default=7, metadata={"help": "K: stages; a copy of theta joins the pool after each"})
    updates_per_stage: int = field(default=30, metadata={"help": "M: optimizer updates per stage"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps for the reference samples"})
    guidance_scale: float = field(default=7.5, metadata={"help": "CFG scale for the reference samples"})
    pool_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "precision of the CPU copies in the reference pool"}
    )
    pool_in_memory: bool = field(
        default=True, metadata={"help": "keep pool entries in host memory (else read from <run>/pool/ on each draw)"}
    )

    def __post_init__(self) -> None:
        for name in ("num_stages", "updates_per_stage"):
            if getattr(self, name) < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {getattr(self, name)}")
        if self.beta <= 0:
            raise ValueError("algorithm.beta must be > 0")


@dataclass(frozen=True)
class SePPOTraining:
    """SePPO's `training:` keys (no library config exists for its loop: this dataclass is its config)."""

    learning_rate: float = field(default=1e-8, metadata={"help": "AdamW learning rate (Diffusion-DPO SD1.5: 1e-8)"})
    scale_lr: bool = field(default=False, metadata={"help": "multiply the lr by the effective batch size"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up updates, then constant"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    per_device_train_batch_size: int = field(default=1, metadata={"help": "prompts per micro-batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer update"})
    empty_prompt_prob: float = field(default=0.2, metadata={"help": "share of rows trained with the empty prompt"})
    resolution: int | None = field(default=None, metadata={"help": "image side; None = the UNet's native size"})
    center_crop: bool = field(default=True, metadata={"help": "center crop (else random crop)"})
    random_flip: bool = field(default=True, metadata={"help": "random horizontal flip"})
    logging_steps: int = field(default=1, metadata={"help": "log metrics every this many updates"})
    save_stages: int = field(default=1, metadata={"help": "checkpoint every this many stages (0: never)"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.empty_prompt_prob < 1.0:
            raise ValueError("training.empty_prompt_prob must be in [0, 1)")


SPEC = TrainerSpec(
    name="seppo",
    description="semi-policy preference optimisation for text-to-image diffusion from winning images only, with "
    "reference-pool samples and the anchor-based flipper (Zhang et al. 2024; diffusers + accelerate)",
    options=SePPOOptions,
    library_config="posttrain.trainers.seppo:SePPOTraining",
    curves=("loss", "flip_rate", "implicit_acc"),
    deepspeed=False,  # its own accelerate loop, built and tested for DDP
    lora=False,
    model="diffusion",
    length_key=None,
    paper="[SePPO: Semi-Policy Preference Optimization for Diffusion Alignment](https://arxiv.org/abs/2410.05255)",
)


@dataclass(frozen=True)
class SePPOConfig:
    """What the loop reads: the validated options and training settings of one run."""

    options: SePPOOptions
    training: SePPOTraining

    def __getattr__(self, name: str) -> Any:
        for part in (self.options, self.training):
            if name in part.__dataclass_fields__:
                return getattr(part, name)
        raise AttributeError(name)


def config_from(recipe: Recipe) -> SePPOConfig:
    options = recipe.options
    if options.variant == "diffusion_dpo" and "reference" not in recipe.algorithm:
        options = _replace(options, reference="initial")  # Diffusion-DPO's fixed reference, unless set
    own = {k: v for k, v in recipe.training.items() if k in SePPOTraining.__dataclass_fields__}
    try:
        training = SePPOTraining(**own)
    except ValueError as err:
        raise RecipeError(f"{recipe.where}: {err}") from err
    return SePPOConfig(options, training)


def _replace(options: SePPOOptions, **changes: Any) -> SePPOOptions:
    return dataclasses.replace(options, **changes)


def planned_steps(recipe: Recipe) -> int:
    """Optimizer updates of the whole run (stages x updates per stage): a run dir whose final/ has them is finished."""
    cfg = config_from(recipe)
    return cfg.num_stages * cfg.updates_per_stage


def rehearse(edit: Any) -> None:
    """`--rehearse` (posttrain.rehearsal_edit): `edit.steps` stages of one update each (a checkpoint after each),
    reference sampling with 2 DDIM steps, at most 2 prompts x 2 micro-batches."""
    cfg = config_from(edit.recipe)
    edit.algorithm.update(num_stages=edit.steps, updates_per_stage=1)
    if cfg.sample_steps > 2:
        edit.algorithm["sample_steps"] = 2
    batch, accum = min(cfg.per_device_train_batch_size, 2), min(cfg.gradient_accumulation_steps, 2)
    edit.training.update(per_device_train_batch_size=batch, gradient_accumulation_steps=accum, save_stages=1,
                         logging_steps=1)  # fmt: skip
    edit.note(f"stages: {cfg.num_stages} x {cfg.updates_per_stage} updates -> {edit.steps} x 1 (a checkpoint after "
              f"each); reference sampling 2 DDIM steps; batch {cfg.per_device_train_batch_size} x "
              f"{cfg.gradient_accumulation_steps} -> {batch} x {accum}")  # fmt: skip
    if edit.training.pop("resolution", None) is not None:
        edit.note("training.resolution: the tiny stack's own size")
    edit.did(f"SePPO variant {cfg.variant}, reference pool '{cfg.reference}'")


def check_tiny(recipe: Recipe) -> None:
    """A `model.tiny` spec (and its `pretrain:` keys) is checked before any model is built: a bad key or value is a
    ModelError naming it."""
    if recipe.model.tiny is not None:
        from posttrain.models.tiny_diffusion import tiny_diffusion_spec

        tiny_diffusion_spec(recipe.model.tiny, recipe.seed)


def plan(recipe: Recipe) -> list[str]:
    check_tiny(recipe)
    cfg = config_from(recipe)
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    lines = [*_describe_tiny(recipe), *_describe_data(recipe),
        f"SePPO variant {cfg.variant}: {cfg.num_stages} stages x {cfg.updates_per_stage} updates, {batch} prompts "
        f"per update per process, beta {cfg.beta:g}, lr {cfg.learning_rate:g}",
    ]  # fmt: skip
    if cfg.variant in USES_REFERENCE_SAMPLES:
        lines.append(
            f"reference: {cfg.reference} draw from the checkpoint pool; samples by DDIM {cfg.sample_steps} steps, "
            f"CFG {cfg.guidance_scale:g}"
        )
    specs = diffusion_benchmarks(recipe, load=False)  # validates the suite in a dry run too (hub data not fetched)
    if specs:
        from posttrain.evaluation.diffusion import describe_benchmark

        lines.append("eval before and after training (final/ also against the base, same prompts and noise):")
        lines += [f"  {describe_benchmark(spec, recipe.eval.limit)}" for spec in specs]
    return lines


def _describe_tiny(recipe: Recipe) -> list[str]:
    if recipe.model.tiny is None:
        return []
    from posttrain.models.tiny_diffusion import tiny_diffusion_spec

    spec = tiny_diffusion_spec(recipe.model.tiny, recipe.seed)
    kind = "pixel-space" if spec.pixel else "latent (SD layout)"
    line = (
        f"model: tiny {kind} stack, {spec.resolution}x{spec.resolution}, UNet channels {list(spec.block_out_channels)}"
    )
    if spec.pretrain is not None:
        p = spec.pretrain
        line += (f"; base pretrained first (seed {spec.seed}): {p.updates} updates x {p.batch_size} on {p.n} squares, "
                 f"{p.saturated:.0%} saturated, lr {p.learning_rate:g} cosine, into <run>/base_model (built once)")  # fmt: skip
    return [line]


def _describe_data(recipe: Recipe) -> list[str]:
    from posttrain.data.images import describe_image_source

    base = recipe.source.parent if recipe.source else None
    return [
        f"data.{split}: " + describe_image_source(spec, base_dir=base, origin=f"{recipe.where}: data.{split}")
        for split, spec in (("train", recipe.data.train), ("eval", recipe.data.eval))
        if spec is not None
    ]


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    """Setup, eval before, the stages, atomic final/, eval after, report (the shared lifecycle)."""
    from posttrain.trainers.seppo_steps import SePPORun

    check_tiny(recipe)
    cfg = config_from(recipe)
    benchmarks = diffusion_benchmarks(recipe)  # suite errors before any model loads
    checkpoint = start(run, resume)
    job = SePPORun.setup(recipe, cfg, run, checkpoint)
    is_main = job.accelerator.is_main_process
    result = RunResult(run_dir=str(run.path), stage=recipe.name, train_seconds=0.0, global_step=job.global_step)
    if benchmarks and checkpoint is None and is_main:
        result.before = _evaluate(benchmarks, job.source, run, "before", job.global_step, recipe.name)
    result.train_seconds = job.train(recipe.settings.time_budget_s)
    result.global_step = job.global_step
    save_final(run, job.write_final, is_main, job.accelerator.wait_for_everyone, job.global_step)
    if is_main:
        if benchmarks:  # final/ against the base it started from (same prompts and noise), unless one is named
            against_base = [bench if bench.baseline else dataclasses.replace(bench, baseline=str(job.source))
                            for bench in benchmarks]  # fmt: skip
            result.after = _evaluate(against_base, run.final, run, "after", job.global_step, recipe.name)
        finish(run, recipe, result)
    return result


def diffusion_benchmarks(recipe: Recipe, load: bool = True) -> list:
    """The `kind: diffusion` benchmarks of `eval.suite`, evaluated before and after training (images are sampled
    from the base model and from final/); a suite with other kinds is refused, naming them. `load=False` returns
    the validated specs without loading their prompts (a dry run fetches no hub data)."""
    if not recipe.eval.suite:
        return []
    from posttrain.evaluation.diffusion import build_diffusion_benchmark
    from posttrain.evaluation.suite import load_suite

    suite = load_suite(recipe.resolve_path(recipe.eval.suite))
    other = [b.name for b in suite.benchmarks if b.kind != "diffusion"]
    if other:
        raise RecipeError(f"{recipe.where}: eval.suite {recipe.eval.suite}: trainer seppo evaluates kind: diffusion "
                          f"benchmarks only, not {', '.join(other)}")  # fmt: skip
    if not load:
        return list(suite.benchmarks)
    return [build_diffusion_benchmark(b, limit=recipe.eval.limit) for b in suite.benchmarks]


def _evaluate(benchmarks: list, model: Path, run: RunDir, tag: str, step: int, stage: str) -> dict[str, float]:
    """Score each benchmark on `model`; results (with a sample grid) to eval/<name>.<tag>.json/.png, metrics logged."""
    from posttrain.evaluation.diffusion import evaluate_diffusion

    return record_evaluation(run, stage, tag, step, [evaluate_diffusion(model, bench) for bench in benchmarks])
