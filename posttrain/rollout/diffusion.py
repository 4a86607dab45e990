"""Diffusion sampling: full reverse diffusion with DDIM and classifier-free guidance, next to LLM generation.

`ddim_sample` is the primitive (SePPO's reference samples call it per micro-batch); `sample_images` draws one
image per prompt from seeded noise in batches (the diffusion benchmarks). The noise comes from a CPU generator, so a
seed gives the same images on any device.
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def ddim_sample(
    unet: Any,
    scheduler_config: dict,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    shape: tuple[int, ...],
    steps: int = 50,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    scheduler: str = "ddim",
    scheduler_class: str | None = None,
) -> torch.Tensor:
    """Full reverse diffusion with DDIM and classifier-free guidance; returns samples in the UNet's space.

    `cond`/`uncond` are (B, L, D) text states (uncond = the empty prompt's). Noise is drawn on the CPU from
    `generator`, so a seed gives the same samples on any device.
    """
    scheduler = make_scheduler(scheduler_config, scheduler, scheduler_class)
    scheduler.set_timesteps(steps)
    device = cond.device
    dtype = next(unet.parameters()).dtype
    x = torch.randn(shape, generator=generator).to(device, dtype) * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond]).to(dtype) if guidance_scale != 1.0 else cond.to(dtype)
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if guidance_scale != 1.0 else x
        x_in = scheduler.scale_model_input(x_in, t)
        eps = unet(x_in, t, encoder_hidden_states=context).sample
        if guidance_scale != 1.0:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        extra = {"eta": eta, "generator": generator} if type(scheduler).__name__ == "DDIMScheduler" else {}
        x = scheduler.step(eps, t, x, **extra).prev_sample
    return x


def make_scheduler(config: dict, kind: str = "ddim", class_name: str | None = None) -> Any:
    """The sampling scheduler: `ddim` (DDIM from the model's scheduler config, deterministic with eta = 0), or
    `pipeline`, `class_name`: the class the model dir's scheduler config names (SD 1.5's PNDM: what
    `StableDiffusionPipeline` samples with by default, the SePPO paper's evaluation)."""
    import diffusers

    if kind == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if kind == "pipeline":
        name = class_name or dict(config).get("_class_name", "DDIMScheduler")
        cls = getattr(diffusers, name, None)
        if cls is None:
            raise ValueError(f"scheduler '{name}' named by the model's scheduler config is not in diffusers")
        return cls.from_config(config)
    raise ValueError(f"generation.scheduler must be 'ddim' or 'pipeline', got {kind!r}")


def sample_images(
    stack: Any,
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 32,
    device: Any = None,
    scheduler: str = "ddim",
    dtype: str = "fp32",
):
    """Images (len(prompts), 3, H, W) in [-1, 1] on the CPU, one per prompt, by `scheduler` (`make_scheduler`) +
    CFG from seeded noise (see the module docstring for what fixes each image's noise). `dtype: fp16` samples in
    half precision on a GPU (the SePPO paper's evaluation); on the CPU it stays fp32."""
    from posttrain.models.diffusion import encode_prompts, model_space_to_images, tokenize

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    half = dtype == "fp16" and torch.device(device).type == "cuda"
    for module in (stack.unet, stack.text_encoder, stack.vae):
        if module is not None:
            module.to(device, torch.float16 if half else torch.float32).eval()
    config = stack.unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    generator = torch.Generator().manual_seed(seed)
    uncond = encode_prompts(stack, tokenize(stack.tokenizer, [""]))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond = encode_prompts(stack, tokenize(stack.tokenizer, chunk))
        shape = (len(chunk), config.in_channels, size, size)
        x = ddim_sample(stack.unet, stack.scheduler.config, cond, uncond.expand(len(chunk), -1, -1), shape, steps,
                        guidance_scale, generator, scheduler=scheduler,
                        scheduler_class=getattr(stack, "scheduler_class", None))  # fmt: skip
        out.append(model_space_to_images(stack, x).float().cpu())
    return torch.cat(out)
