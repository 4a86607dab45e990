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

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.errors import RecipeError
from posttrain.recipe import Recipe
from posttrain.runs import COMPLETE_MARKER, RunDir

STATE_FILE = "seppo_state.json"


@dataclass
class SePPOConfig:
    """Options of `trainer: seppo` (no TRL config exists for it). The first block goes under `algorithm:`, the
    rest under `training:`. Defaults are Diffusion-DPO's / the paper's for SD 1.5 where they exist."""

    # --- algorithm ---
    variant: Literal["seppo", "seppo_indicator", "seppo_no_aaf", "sft_winner", "diffusion_dpo"] = field(
        default="seppo",
        metadata={"help": "seppo (AAF), seppo_indicator, seppo_no_aaf (s = +1), sft_winner (MSE), diffusion_dpo"},
    )
    reference: Literal["uniform", "initial", "latest"] = field(
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
    # --- training ---
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


ALGORITHM_KEYS = frozenset(
    {"variant", "reference", "beta", "num_stages", "updates_per_stage", "sample_steps", "guidance_scale",
     "pool_dtype", "pool_in_memory"}
)  # fmt: skip


def config_from(recipe: Recipe) -> SePPOConfig:
    training = {k: v for k, v in recipe.training.items() if k not in ("time_budget_s", "precision")}
    algorithm = dict(recipe.algorithm)
    if algorithm.get("variant") == "diffusion_dpo":
        algorithm.setdefault("reference", "initial")  # Diffusion-DPO's fixed reference, unless set for an ablation
    cfg = SePPOConfig(**algorithm, **training)
    for name in ("num_stages", "updates_per_stage", "per_device_train_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, name) < 1:
            raise RecipeError(f"{recipe.where}: {name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.empty_prompt_prob < 1.0:
        raise RecipeError(f"{recipe.where}: training.empty_prompt_prob must be in [0, 1)")
    if cfg.beta <= 0:
        raise RecipeError(f"{recipe.where}: algorithm.beta must be > 0")
    return cfg


def plan(recipe: Recipe) -> list[str]:
    cfg = config_from(recipe)
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    lines = [
        f"SePPO variant {cfg.variant}: {cfg.num_stages} stages x {cfg.updates_per_stage} updates, {batch} prompts "
        f"per update per process, beta {cfg.beta:g}, lr {cfg.learning_rate:g}",
    ]
    if cfg.variant in ("seppo", "seppo_indicator", "seppo_no_aaf"):
        lines.append(
            f"reference: {cfg.reference} draw from the checkpoint pool; samples by DDIM {cfg.sample_steps} steps, "
            f"CFG {cfg.guidance_scale:g}"
        )
    benchmarks = diffusion_benchmarks(recipe)  # validates the suite in a dry run too
    if benchmarks:
        names = ", ".join(f"{b.name} ({len(b.prompts) * b.n} images, scorer {b.scorer['name']})" for b in benchmarks)
        lines.append(f"eval before and after training: {names}")
    return lines


# ------------------------------------------------------------------------------------------------ pieces


def drop_prompts(prompts: list[str], prob: float, generator: Any = None) -> list[str]:
    """Replace each prompt by "" with probability `prob` (classifier-free guidance training)."""
    import torch

    drop = torch.rand(len(prompts), generator=generator) < prob
    return ["" if d else p for p, d in zip(prompts, drop.tolist())]


def seppo_step_loss(
    unet: Any,
    ref_unet: Any,
    x_w: Any,
    x_o: Any,
    context: Any,
    t: Any,
    eps: Any,
    scheduler: Any,
    options: Any,
):
    """Loss and stats of one micro-batch. x_w / x_o: winners and the other images (reference samples or losers)
    in the UNet's space, (B, C, H, W); context (B, L, D); t (B,) and eps (B, C, H, W) shared by both images."""
    import torch

    from posttrain.trainers.seppo_loss import per_sample_error, seppo_loss

    if options.variant == "sft_winner":
        noisy = scheduler.add_noise(x_w, eps, t)
        e_w = per_sample_error(unet(noisy, t, encoder_hidden_states=context).sample, eps)
        return seppo_loss(e_w, None, None, None, options)
    x = torch.cat([x_w, x_o])
    t2, eps2, ctx2 = torch.cat([t, t]), torch.cat([eps, eps]), torch.cat([context, context])
    noisy = scheduler.add_noise(x, eps2, t2)
    e_theta = per_sample_error(unet(noisy, t2, encoder_hidden_states=ctx2).sample, eps2)
    with torch.no_grad():
        ref_dtype = next(ref_unet.parameters()).dtype
        ref_pred = ref_unet(noisy.to(ref_dtype), t2, encoder_hidden_states=ctx2.to(ref_dtype)).sample
        e_ref = per_sample_error(ref_pred, eps2)
    b = x_w.shape[0]
    return seppo_loss(e_theta[:b], e_ref[:b], e_theta[b:], e_ref[b:], options)


# ------------------------------------------------------------------------------------------------- train


def _native_resolution(stack) -> int:
    factor = 1 if stack.pixel else 2 ** (len(stack.vae.config.block_out_channels) - 1)
    size = stack.unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * factor


def _load_rows(recipe: Recipe, cfg: SePPOConfig, resolution: int):
    from posttrain.data.images import load_image_rows

    spec = dict(recipe.data.train or {})
    if "synthetic" in spec:
        spec.setdefault("resolution", resolution)
    base = recipe.source.parent if recipe.source else None
    rows = load_image_rows(spec, base_dir=base, origin=f"{recipe.where}: data.train")
    if cfg.variant == "diffusion_dpo" and any(r.loser is None for r in rows):
        raise RecipeError(f"{recipe.where}: variant diffusion_dpo needs preference pairs (winner and loser images)")
    return rows


def train(recipe: Recipe, run: RunDir, resume: bool = False):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from posttrain.data.images import ImageRowDataset, ImageTransform, collate_image_rows
    from posttrain.diffusion import (
        ddim_sample,
        encode_prompts,
        images_to_model_space,
        load_stack,
        tokenize,
    )
    from posttrain.errors import PosttrainError
    from posttrain.models import model_source, resolve_precision
    from posttrain.tiny_diffusion import materialise_tiny_diffusion
    from posttrain.trainers.base import RunResult
    from posttrain.trainers.seppo_loss import USES_REFERENCE_SAMPLES, SePPOLossOptions, shared_timesteps_and_noise
    from posttrain.trainers.seppo_pool import ReferencePool

    cfg = config_from(recipe)
    options = SePPOLossOptions(variant=cfg.variant, beta=cfg.beta)
    benchmarks = diffusion_benchmarks(recipe)  # suite errors before any model loads
    precision = resolve_precision(recipe.training.get("precision", "auto"))
    mixed = {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no")
    # AcceleratorState is a process-wide singleton that refuses a second Accelerator with another mixed precision
    # (e.g. a fp32 run, then a bf16 one in the same Python process). Clear it, keeping the process group
    # (PartialState), as transformers' Trainer does between hyper-parameter trials.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=mixed,
        cpu=not torch.cuda.is_available(),
    )
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    set_seed(recipe.seed)

    if recipe.model.tiny is not None:
        if accelerator.is_main_process:
            materialise_tiny_diffusion(recipe.model.tiny, run.path)
        accelerator.wait_for_everyone()
        source = run.path / "base_model"
    else:
        source = Path(model_source(recipe))
    stack = load_stack(source)
    device = accelerator.device
    for frozen in (stack.vae, stack.text_encoder):
        if frozen is not None:
            _to(frozen.requires_grad_(False).eval(), device, weight_dtype)
    unet = stack.unet
    if recipe.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    needs_ref = cfg.variant != "sft_winner"
    ref_unet = None
    if needs_ref:
        import copy

        ref_unet = _to(copy.deepcopy(unet).requires_grad_(False).eval(), device, weight_dtype)

    resolution = cfg.resolution or _native_resolution(stack)
    rows = _load_rows(recipe, cfg, resolution)
    dataset = ImageRowDataset(rows, ImageTransform(resolution, cfg.center_crop, cfg.random_flip))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.per_device_train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= cfg.per_device_train_batch_size,
        collate_fn=collate_image_rows,
        num_workers=cfg.dataloader_num_workers,
    )
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        eps=cfg.adam_epsilon,
    )  # fmt: skip
    warmup = max(1, cfg.lr_warmup_steps * accelerator.num_processes)  # accelerate steps it once per process
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)

    pool_dtype = getattr(torch, cfg.pool_dtype)
    pool = ReferencePool(run.path / "pool", dtype=pool_dtype, keep_in_memory=cfg.pool_in_memory)
    start_stage, global_step = 0, 0
    if resume:
        checkpoint = run.last_checkpoint()
        if checkpoint is None:
            raise PosttrainError(f"--resume: no complete checkpoint under {run.checkpoints}")
        state = json.loads((checkpoint / STATE_FILE).read_text())
        accelerator.load_state(str(checkpoint))
        start_stage, global_step = state["stages_done"], state["global_step"]
        pool.restore(state["pool_size"])
    elif needs_ref:
        _grow_pool(accelerator, pool, unet)  # theta_0

    before: dict[str, float] = {}
    if benchmarks and not resume and accelerator.is_main_process:
        before = _evaluate(benchmarks, source, run, "before", global_step, recipe.name)
    empty_ids = tokenize(stack.tokenizer, [""])
    uncond = encode_prompts(stack, empty_ids)
    num_train_timesteps = stack.scheduler.config.num_train_timesteps
    stack.scheduler.alphas_cumprod = stack.scheduler.alphas_cumprod.to(device)
    start = time.monotonic()
    budget = recipe.training.get("time_budget_s")
    stopped = False
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.num_stages * cfg.updates_per_stage, initial=global_step, desc=recipe.name, dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )  # fmt: skip

    for stage in range(start_stage, cfg.num_stages):
        set_seed(recipe.seed + 1000 * stage)  # resume at a stage boundary replays the same data and noise
        ref_index = None
        if needs_ref:
            ref_index = pool.draw(cfg.reference, recipe.seed, stage)
            pool.load_into(ref_index, ref_unet)
        sample_gen = torch.Generator().manual_seed(recipe.seed * 7919 + stage + accelerator.process_index * 104729)
        batches = _cycle(loader)
        stage_grid_pending = True  # the stage's first winners and reference samples (or losers) go to samples/
        for _ in range(cfg.updates_per_stage):
            sums: dict[str, float] = {}
            for _micro in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                prompts = batch["prompt"]
                with torch.no_grad():
                    x_w = images_to_model_space(stack, batch["winner"].to(device, weight_dtype)).float()
                    cond = encode_prompts(stack, tokenize(stack.tokenizer, prompts))
                    x_o = None
                    if cfg.variant in USES_REFERENCE_SAMPLES:
                        x_o = ddim_sample(
                            ref_unet, stack.scheduler.config, cond, uncond.expand(len(prompts), -1, -1),
                            tuple(x_w.shape), cfg.sample_steps, cfg.guidance_scale, sample_gen,
                        ).float()  # fmt: skip
                    elif cfg.variant == "diffusion_dpo":
                        x_o = images_to_model_space(stack, batch["loser"].to(device, weight_dtype)).float()
                    if x_o is not None and stage_grid_pending and accelerator.is_main_process:
                        _save_stage_grid(stack, x_w, x_o, run.path / "samples" / f"stage-{stage}.png")
                    stage_grid_pending = False
                    context = encode_prompts(
                        stack, tokenize(stack.tokenizer, drop_prompts(prompts, cfg.empty_prompt_prob))
                    )
                    t, eps = shared_timesteps_and_noise(torch.cat([x_w, x_w]), num_train_timesteps)
                    b = x_w.shape[0]
                with accelerator.accumulate(unet):
                    loss, stats = seppo_step_loss(
                        unet, ref_unet, x_w, x_o, context.float(), t[:b], eps[:b], stack.scheduler, options
                    )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                for key, value in {"loss": loss.detach(), **stats}.items():
                    sums[key] = sums.get(key, 0.0) + accelerator.gather(value.detach().reshape(1)).float().mean().item()
            global_step += 1
            record = {k: v / cfg.gradient_accumulation_steps for k, v in sums.items()}
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{record['loss']:.3g}", flip=f"{record['flip_rate']:.2f}", refresh=False)
            if accelerator.is_main_process and global_step % cfg.logging_steps == 0:
                record.update(
                    learning_rate=lr_scheduler.get_last_lr()[0], reference=ref_index, pool_size=len(pool),
                    seconds=round(time.monotonic() - start, 3),
                )  # fmt: skip
                run.append_metrics({"step": global_step, "stage": f"{recipe.name}:{stage}", **record})
            if budget is not None and time.monotonic() - start >= budget:
                stopped = True
                break
        if stopped:
            break
        if needs_ref:
            _grow_pool(accelerator, pool, unet)
        if cfg.save_stages and (stage + 1) % cfg.save_stages == 0:
            _save_checkpoint(accelerator, run, stage + 1, global_step, len(pool))

    bar.close()
    _save_final(accelerator, unet, source, run)
    result = RunResult(
        run_dir=str(run.path), stage=recipe.name, train_seconds=time.monotonic() - start, global_step=global_step
    )
    if benchmarks and accelerator.is_main_process:
        result.before = before
        result.after = _evaluate(benchmarks, run.final, run, "after", global_step, recipe.name)
    if accelerator.is_main_process:
        from posttrain.report import write_run_report

        write_run_report(run, recipe, result)
    return result


def diffusion_benchmarks(recipe: Recipe) -> list:
    """The `kind: diffusion` benchmarks of `eval.suite`, evaluated before and after training (images are sampled
    from the base model and from final/); a suite with other kinds is refused, naming them."""
    if not recipe.eval.suite:
        return []
    from posttrain.evaluation.diffusion import build_diffusion_benchmark
    from posttrain.evaluation.suite import load_suite

    suite = load_suite(recipe.resolve_path(recipe.eval.suite))
    other = [b.name for b in suite.benchmarks if b.kind != "diffusion"]
    if other:
        raise RecipeError(f"{recipe.where}: eval.suite {recipe.eval.suite}: trainer seppo evaluates kind: diffusion "
                          f"benchmarks only, not {', '.join(other)}")  # fmt: skip
    return [build_diffusion_benchmark(b, limit=recipe.eval.limit) for b in suite.benchmarks]


def _evaluate(benchmarks: list, model: Path, run: RunDir, tag: str, step: int, stage: str) -> dict[str, float]:
    """Score each benchmark on `model`; results (with a sample grid) to eval/<name>.<tag>.json, metrics logged."""
    from posttrain.evaluation.diffusion import evaluate_diffusion

    found: dict[str, float] = {}
    for bench in benchmarks:
        res = evaluate_diffusion(model, bench)
        res.save(run.eval_dir / f"{bench.name}.{tag}.json")
        res.grid.save(run.eval_dir / f"{bench.name}.{tag}.png")
        found.update(res.metrics())
    run.append_metrics({"step": step, "stage": f"{stage}:{tag}", **found})
    return found


def _save_stage_grid(stack, x_w, x_o, path: Path, count: int = 8) -> None:
    """Top row: winners; bottom row: the reference model's samples for the same prompts (losers for DPO)."""
    from posttrain.diffusion import model_space_to_images
    from reward_models.image import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [model_space_to_images(stack, x[:count]).cpu() for x in (x_w, x_o)]
    image_grid(rows).save(path)


def _to(module, device, dtype):
    """Move to device; cast only to a lower precision (diffusers warns on every same-dtype `.to(dtype)`)."""
    import torch

    module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def _grow_pool(accelerator, pool, unet) -> None:
    """Append theta to the pool: the main process writes the entry, the others read it back from disk."""
    if accelerator.is_main_process:
        pool.append(accelerator.unwrap_model(unet))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        pool.restore(len(pool) + 1)


def _cycle(loader):
    while True:
        yield from loader


def _save_checkpoint(accelerator, run: RunDir, stages_done: int, global_step: int, pool_size: int) -> Path:
    path = run.checkpoints / f"checkpoint-{global_step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        state = {"stages_done": stages_done, "global_step": global_step, "pool_size": pool_size}
        (path / STATE_FILE).write_text(json.dumps(state))
        (path / COMPLETE_MARKER).write_text(str(time.time()))
    accelerator.wait_for_everyone()
    return path


def _save_final(accelerator, unet, source: Path, run: RunDir) -> None:
    """final/ = the source pipeline dir with the trained UNet (from_pretrained-loadable), swapped in atomically."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    shutil.rmtree(run.final_tmp, ignore_errors=True)
    run.final_tmp.mkdir(parents=True)
    for child in Path(source).iterdir():
        if child.name == "unet":
            continue
        target = run.final_tmp / child.name
        shutil.copytree(child, target) if child.is_dir() else shutil.copy2(child, target)
    accelerator.unwrap_model(unet).save_pretrained(run.final_tmp / "unet")
    run.swap_in_final()


def config_dict(recipe: Recipe) -> dict[str, Any]:
    return asdict(config_from(recipe))
