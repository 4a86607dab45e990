"""A text-to-image diffusion stack as the trainers use it: load the components of a Stable-Diffusion-layout dir,
encode prompts, map images to the UNet's space (VAE latents x scaling factor, or pixels) and sample with DDIM + CFG.

Only diffusers/transformers components are used; this module holds the glue the SePPO trainer and its tests share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class DiffusionStack:
    """The five components; `vae is None` means the UNet works in pixel space (images in [-1, 1])."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # the training (DDPM) noise scheduler
    # The scheduler class the dir's scheduler_config.json names (SD 1.5: PNDMScheduler): what the pipeline samples
    # with by default (`generation.scheduler: pipeline`).
    scheduler_class: str = "DDPMScheduler"

    @property
    def pixel(self) -> bool:
        return self.vae is None


def load_stack(path: str | Path) -> DiffusionStack:
    """Load unet/, vae/ (optional), text_encoder/, tokenizer/ and scheduler/ from a pipeline dir."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(path)
    missing = [name for name in ("unet", "text_encoder", "tokenizer", "scheduler") if not (root / name).is_dir()]
    if missing:
        raise ModelError(
            f"{root}: not a diffusion pipeline dir (missing {', '.join(f'{m}/' for m in missing)}); pass a local "
            f"Stable-Diffusion-layout dir (e.g. a downloaded runwayml/stable-diffusion-v1-5) or a `model.tiny` spec"
        )
    try:
        return DiffusionStack(
            unet=UNet2DConditionModel.from_pretrained(root / "unet"),
            vae=AutoencoderKL.from_pretrained(root / "vae") if (root / "vae").is_dir() else None,
            text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
            tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
            scheduler=DDPMScheduler.from_pretrained(root / "scheduler"),
            scheduler_class=_scheduler_class(root / "scheduler"),
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"{root}: could not load the diffusion components: {err}") from err


def _scheduler_class(folder: Path) -> str:
    import json

    try:
        return str(json.loads((folder / "scheduler_config.json").read_text()).get("_class_name", "DDPMScheduler"))
    except (OSError, ValueError):
        return "DDPMScheduler"


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(stack: DiffusionStack, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden states (SD 1.x conditioning), shape (B, L, D)."""
    device = next(stack.text_encoder.parameters()).device
    return stack.text_encoder(input_ids.to(device))[0]


@torch.no_grad()
def images_to_model_space(stack: DiffusionStack, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → what the UNet denoises: VAE latents x scaling factor (sampled, as SD training does)."""
    if stack.pixel:
        return images
    vae = stack.vae
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


@torch.no_grad()
def model_space_to_images(stack: DiffusionStack, x: torch.Tensor) -> torch.Tensor:
    """Inverse of `images_to_model_space` (decode latents), clamped to [-1, 1]."""
    if not stack.pixel:
        x = stack.vae.decode(x.to(stack.vae.dtype) / stack.vae.config.scaling_factor).sample
    return x.float().clamp(-1, 1)
