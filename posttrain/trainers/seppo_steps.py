"""SePPO's loop (imported only when a SePPO run starts): `SePPORun.setup` builds everything, `train` runs the
stages, each a short loop of `_update`s over `_pair_batch`es, checkpointing at stage ends. The run lifecycle around it
(resume lookup, eval before/after, atomic final/, report) is `posttrain.trainers.lifecycle`, as for every trainer.

Checkpoints are written at stage ends (accelerate state + stage/step/pool size, with a completion marker); pool
entries live once in <run>/pool/, so resuming rebuilds the pool and redraws the same references (draws and the
per-stage RNG depend only on seed and stage).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from posttrain.data.images import ImageRowDataset, ImageTransform, collate_image_rows
from posttrain.errors import RecipeError
from posttrain.models.diffusion import (
    encode_prompts,
    images_to_model_space,
    load_stack,
    model_space_to_images,
    tokenize,
)
from posttrain.models.loading import resolve_precision
from posttrain.models.processes import stop_after_checkpoint
from posttrain.models.tiny_diffusion import tiny_diffusion_spec
from posttrain.recipe import Recipe
from posttrain.rollout.diffusion import ddim_sample
from posttrain.runs import RunDir, mark_complete
from posttrain.trainers.lifecycle import model_source
from posttrain.trainers.seppo_base import build_tiny_base
from posttrain.trainers.seppo_loss import USES_REFERENCE_SAMPLES, SePPOLossOptions, shared_timesteps_and_noise
from posttrain.trainers.seppo_pool import ReferencePool

STATE_FILE = "seppo_state.json"


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


# ------------------------------------------------------------------------------------------------- the run


@dataclass
class SePPORun:
    """Everything one SePPO run holds between its steps."""

    recipe: Recipe
    cfg: Any  # posttrain.trainers.seppo.SePPOConfig
    run: RunDir
    accelerator: Any
    stack: Any
    source: Path
    unet: Any
    ref_unet: Any
    loader: Any
    optimizer: Any
    lr_scheduler: Any
    pool: ReferencePool
    weight_dtype: Any
    uncond: Any
    start_stage: int = 0
    global_step: int = 0

    @property
    def needs_ref(self) -> bool:
        return self.cfg.variant != "sft_winner"

    @classmethod
    def setup(cls, recipe: Recipe, cfg: Any, run: RunDir, checkpoint: Path | None) -> SePPORun:
        """Accelerator, the diffusion stack (frozen VAE/text encoder), theta and its reference copy, data, AdamW,
        the reference pool; restored from `checkpoint` when resuming."""
        precision = resolve_precision(recipe.settings.precision)
        # AcceleratorState is a process-wide singleton that refuses a second Accelerator with another mixed
        # precision (a fp32 run, then a bf16 one in the same Python process). Clear it, keeping the process group
        # (PartialState), as transformers' Trainer does between hyper-parameter trials.
        AcceleratorState._reset_state(reset_partial_state=False)
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
            cpu=not torch.cuda.is_available(),
        )
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        set_seed(recipe.seed)
        source = _stack_source(recipe, run, accelerator)
        stack = load_stack(source)
        device = accelerator.device
        for frozen in (stack.vae, stack.text_encoder):
            if frozen is not None:
                _to(frozen.requires_grad_(False).eval(), device, weight_dtype)
        unet = stack.unet
        if recipe.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        ref_unet = None
        if cfg.variant != "sft_winner":
            ref_unet = _to(copy.deepcopy(unet).requires_grad_(False).eval(), device, weight_dtype)
        loader = _loader(recipe, cfg, stack)
        optimizer, lr_scheduler = _optimizer(cfg, unet, accelerator.num_processes)
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
        pool = ReferencePool(run.path / "pool", dtype=getattr(torch, cfg.pool_dtype), keep_in_memory=cfg.pool_in_memory)
        stack.scheduler.alphas_cumprod = stack.scheduler.alphas_cumprod.to(device)
        job = cls(recipe, cfg, run, accelerator, stack, source, unet, ref_unet, loader, optimizer, lr_scheduler, pool,
                  weight_dtype, encode_prompts(stack, tokenize(stack.tokenizer, [""])))  # fmt: skip
        if checkpoint is not None:
            job.restore(checkpoint)
        elif job.needs_ref:
            job.grow_pool()  # theta_0
        return job

    def restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.accelerator.load_state(str(checkpoint))
        self.start_stage, self.global_step = state["stages_done"], state["global_step"]
        self.pool.restore(state["pool_size"])

    def train(self, budget: float | None) -> float:
        """Run the remaining stages (or until `budget` seconds); returns the training wall time."""
        from tqdm.auto import tqdm

        cfg, start = self.cfg, time.monotonic()
        deadline = None if budget is None else start + budget
        bar = tqdm(total=cfg.num_stages * cfg.updates_per_stage, initial=self.global_step, desc=self.recipe.name,
                   dynamic_ncols=True, disable=not self.accelerator.is_main_process)  # fmt: skip
        for stage in range(self.start_stage, cfg.num_stages):
            finished = self.stage(stage, bar, start, deadline)
            if not finished:
                break
            if self.needs_ref:
                self.grow_pool()
            if cfg.save_stages and (stage + 1) % cfg.save_stages == 0:
                self.save_checkpoint(stage + 1)
        bar.close()
        return time.monotonic() - start

    def stage(self, stage: int, bar: Any, start: float, deadline: float | None) -> bool:
        """One stage: draw the reference, then M updates. False when the time budget ran out mid-stage."""
        cfg = self.cfg
        set_seed(self.recipe.seed + 1000 * stage)  # resume at a stage boundary replays the same data and noise
        ref_index = None
        if self.needs_ref:
            ref_index = self.pool.draw(cfg.reference, self.recipe.seed, stage)
            self.pool.load_into(ref_index, self.ref_unet)
        sample_gen = torch.Generator().manual_seed(
            self.recipe.seed * 7919 + stage + self.accelerator.process_index * 104729
        )
        batches = _cycle(self.loader)
        grid = self.run.path / "samples" / f"stage-{stage}.png"  # the stage's first winners and references
        for _ in range(cfg.updates_per_stage):
            record = self.update(batches, sample_gen, grid)
            grid = None
            self.global_step += 1
            bar.update(1)
            bar.set_postfix(stage=stage, loss=f"{record['loss']:.3g}", flip=f"{record['flip_rate']:.2f}", refresh=False)
            if self.accelerator.is_main_process and self.global_step % cfg.logging_steps == 0:
                record.update(learning_rate=self.lr_scheduler.get_last_lr()[0], reference=ref_index,
                              pool_size=len(self.pool), seconds=round(time.monotonic() - start, 3))  # fmt: skip
                self.run.append_metrics({"step": self.global_step, "stage": f"{self.recipe.name}:{stage}", **record})
            if deadline is not None and out_of_time(self.accelerator, deadline):
                return False
        return True

    def update(self, batches: Any, sample_gen: Any, grid: Path | None) -> dict[str, float]:
        """One optimizer update over `gradient_accumulation_steps` micro-batches; the mean of their stats."""
        cfg, accelerator = self.cfg, self.accelerator
        options = SePPOLossOptions(variant=cfg.variant, beta=cfg.beta)
        sums: dict[str, float] = {}
        for _micro in range(cfg.gradient_accumulation_steps):
            x_w, x_o, context, t, eps = self.pair_batch(next(batches), sample_gen, grid)
            grid = None
            with accelerator.accumulate(self.unet):
                loss, stats = seppo_step_loss(
                    self.unet, self.ref_unet, x_w, x_o, context.float(), t, eps, self.stack.scheduler, options
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(self.unet.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
            for key, value in {"loss": loss.detach(), **stats}.items():
                sums[key] = sums.get(key, 0.0) + accelerator.gather(value.detach().reshape(1)).float().mean().item()
        return {k: v / cfg.gradient_accumulation_steps for k, v in sums.items()}

    @torch.no_grad()
    def pair_batch(self, batch: dict[str, Any], sample_gen: Any, grid: Path | None):
        """(x_w, x_o, context, t, eps) of a micro-batch: winners in the UNet's space, the other image (a reference
        sample drawn now, or the loser for Diffusion-DPO), the prompt-dropped context, shared timesteps and noise."""
        cfg, stack = self.cfg, self.stack
        device, prompts = self.accelerator.device, batch["prompt"]
        x_w = images_to_model_space(stack, batch["winner"].to(device, self.weight_dtype)).float()
        cond = encode_prompts(stack, tokenize(stack.tokenizer, prompts))
        x_o = None
        if cfg.variant in USES_REFERENCE_SAMPLES:
            x_o = ddim_sample(
                self.ref_unet, stack.scheduler.config, cond, self.uncond.expand(len(prompts), -1, -1),
                tuple(x_w.shape), cfg.sample_steps, cfg.guidance_scale, sample_gen,
            ).float()  # fmt: skip
        elif cfg.variant == "diffusion_dpo":
            x_o = images_to_model_space(stack, batch["loser"].to(device, self.weight_dtype)).float()
        if x_o is not None and grid is not None and self.accelerator.is_main_process:
            _save_stage_grid(stack, x_w, x_o, grid)
        context = encode_prompts(stack, tokenize(stack.tokenizer, drop_prompts(prompts, cfg.empty_prompt_prob)))
        t, eps = shared_timesteps_and_noise(torch.cat([x_w, x_w]), stack.scheduler.config.num_train_timesteps)
        b = x_w.shape[0]
        return x_w, x_o, context, t[:b], eps[:b]

    def grow_pool(self) -> None:
        """Append theta to the pool: the main process writes the entry, the others read it back from disk."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.pool.append(accelerator.unwrap_model(self.unet))
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            self.pool.restore(len(self.pool) + 1)

    def save_checkpoint(self, stages_done: int) -> Path:
        accelerator = self.accelerator
        path = self.run.checkpoints / f"checkpoint-{self.global_step}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            state = {"stages_done": stages_done, "global_step": self.global_step, "pool_size": len(self.pool)}
            (path / STATE_FILE).write_text(json.dumps(state))
            mark_complete(path)
        accelerator.wait_for_everyone()
        stop_after_checkpoint(self.global_step)  # a rehearsal's planned stop (every rank; a no-op otherwise)
        return path

    def write_final(self, target: Path) -> None:
        """The source pipeline dir with the trained UNet (from_pretrained-loadable); written by the main process."""
        if not self.accelerator.is_main_process:
            return
        target.mkdir(parents=True)
        for child in Path(self.source).iterdir():
            if child.name == "unet":
                continue
            dest = target / child.name
            shutil.copytree(child, dest) if child.is_dir() else shutil.copy2(child, dest)
        self.accelerator.unwrap_model(self.unet).save_pretrained(target / "unet")


def _stack_source(recipe: Recipe, run: RunDir, accelerator: Any) -> Path:
    if recipe.model.tiny is None:
        return Path(model_source(recipe))
    target = run.path / "base_model"
    if accelerator.is_main_process:  # fresh, or pretrained on the toy mix (model.tiny.pretrain): built once per run
        build_tiny_base(tiny_diffusion_spec(recipe.model.tiny, recipe.seed), target)
    accelerator.wait_for_everyone()
    return target


def _loader(recipe: Recipe, cfg: Any, stack: Any):
    resolution = cfg.resolution or _native_resolution(stack)
    rows = _load_rows(recipe, cfg, resolution)
    dataset = ImageRowDataset(rows, ImageTransform(resolution, cfg.center_crop, cfg.random_flip))
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.per_device_train_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= cfg.per_device_train_batch_size,
        collate_fn=collate_image_rows,
        num_workers=cfg.dataloader_num_workers,
    )


def _optimizer(cfg: Any, unet: Any, num_processes: int):
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * num_processes
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
        eps=cfg.adam_epsilon,
    )  # fmt: skip
    warmup = max(1, cfg.lr_warmup_steps * num_processes)  # accelerate steps it once per process
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def _native_resolution(stack) -> int:
    factor = 1 if stack.pixel else 2 ** (len(stack.vae.config.block_out_channels) - 1)
    size = stack.unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * factor


def _load_rows(recipe: Recipe, cfg: Any, resolution: int):
    from posttrain.data.images import load_image_rows

    spec = dict(recipe.data.train or {})
    if "synthetic" in spec:
        spec.setdefault("resolution", resolution)
    base = recipe.source.parent if recipe.source else None
    rows = load_image_rows(spec, base_dir=base, origin=f"{recipe.where}: data.train")
    if cfg.variant == "diffusion_dpo" and any(r.loser is None for r in rows):
        raise RecipeError(f"{recipe.where}: variant diffusion_dpo needs preference pairs (winner and loser images)")
    return rows


def _save_stage_grid(stack, x_w, x_o, path: Path, count: int = 8) -> None:
    """Top row: winners; bottom row: the reference model's samples for the same prompts (losers for DPO)."""
    from reward_models.image import image_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [model_space_to_images(stack, x[:count]).cpu() for x in (x_w, x_o)]
    image_grid(rows).save(path)


def _to(module, device, dtype):
    """Move to device; cast only to a lower precision (diffusers warns on every same-dtype `.to(dtype)`)."""
    import torch

    module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def _cycle(loader):
    while True:
        yield from loader


def out_of_time(accelerator: Any, deadline: float) -> bool:
    """Any process past `deadline` (accelerate's trigger, reduced over the processes): all stop at one update, as
    TimeBudget does for the other trainers."""
    if time.monotonic() >= deadline:
        accelerator.set_trigger()
    return accelerator.check_trigger()
