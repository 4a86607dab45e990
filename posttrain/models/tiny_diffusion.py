"""Tiny text-to-image diffusion stacks built from config, without a hub: the SePPO tests' and toy task's models.

Two layouts, both directories of diffusers/transformers components:
- latent (Stable Diffusion layout): unet/, vae/, text_encoder/, tokenizer/, scheduler/ and model_index.json, so
  `StableDiffusionPipeline.from_pretrained(dir)` loads it like SD 1.5;
- pixel (`pixel=True`, the issue's toy experiment): the UNet denoises RGB images directly; no vae/ and no
  model_index.json (it is not a StableDiffusionPipeline), the other four components as above.

With `pretrain:` (a `ToyPretrain`), the stack is the base of the toy task: `trainer: seppo` pretrains it on a
saturated/dull mix of coloured squares before its own stages (`posttrain.trainers.seppo_base`).

The tokenizer is a CLIPTokenizer built from the 256 byte-level symbols (each with and without CLIP's `</w>` word
end) plus merges for the words in `words`; it is saved as tokenizer.json and reloads to the same ids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Words merged into single tokens (anything else is still tokenised, one byte-level symbol at a time).
TOY_WORDS = ("a", "red", "green", "blue", "square", "photo", "of")
PRETRAIN_FILE = "pretrain.json"  # written last into a pretrained base: its settings, loss curve and seconds


@dataclass(frozen=True)
class ToyPretrain:
    """`model.tiny.pretrain:` keys: SFT of the fresh stack on the coloured-squares mix (`toy_pretrain_rows`)."""

    n: int = 2048  # squares in the mix (prompts red/green/blue)
    saturated: float = 0.3  # share of saturated squares; the rest are dull, so the base mostly draws dull ones
    updates: int = 300  # optimizer updates
    batch_size: int = 32
    learning_rate: float = 2e-3  # AdamW peak, cosine-decayed to 0 over the updates
    empty_prompt_prob: float = 0.2  # unconditional rows, for classifier-free guidance

    def __post_init__(self) -> None:
        for name in ("n", "updates", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.tiny.pretrain.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.saturated <= 1.0:
            raise ValueError(f"model.tiny.pretrain.saturated must be in [0, 1], got {self.saturated}")
        if not 0.0 <= self.empty_prompt_prob < 1.0:
            raise ValueError(f"model.tiny.pretrain.empty_prompt_prob must be in [0, 1), got {self.empty_prompt_prob}")
        if self.learning_rate <= 0:
            raise ValueError(f"model.tiny.pretrain.learning_rate must be > 0, got {self.learning_rate}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TinyDiffusionSpec:
    """Shape of a tiny text-to-image stack (recipe `model.tiny:` keys of `trainer: seppo`)."""

    pixel: bool = False  # pixel-space UNet (no VAE), as the toy experiment uses
    resolution: int = 32  # image side in pixels
    block_out_channels: tuple[int, ...] = (32, 64)  # UNet; the last block has cross-attention
    layers_per_block: int = 1
    vae_channels: tuple[int, ...] = (32, 32)  # VAE blocks; the latent is resolution / 2**(len - 1) wide
    latent_channels: int = 4
    text_hidden_size: int = 32
    text_layers: int = 2
    max_length: int = 16  # tokenizer model_max_length = text encoder positions
    beta_schedule: str | None = None  # None: "scaled_linear" (SD's) for latent, "linear" (DDPM's) for pixel
    num_train_timesteps: int = 1000
    seed: int = 0  # init (and pretraining) seed; `trainer: seppo` defaults it to the recipe's seed
    words: tuple[str, ...] = field(default=TOY_WORDS)
    pretrain: ToyPretrain | None = None  # pretrain on the coloured-squares mix (pixel stacks only)

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "vae_channels", "words"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # YAML gives lists
        if isinstance(self.pretrain, dict):
            try:
                object.__setattr__(self, "pretrain", ToyPretrain(**self.pretrain))
            except TypeError as err:
                raise ValueError(f"model.tiny.pretrain: {_unknown_key(err, ToyPretrain)}") from err
        if self.pretrain is not None and not self.pixel:
            raise ValueError("model.tiny.pretrain needs a pixel-space stack (pixel: true)")


def tiny_diffusion_spec(tiny: dict[str, Any], seed: int | None = None) -> TinyDiffusionSpec:
    """A recipe's `model.tiny` mapping as a spec (`seed` fills `model.tiny.seed` when the recipe leaves it out);
    a bad key or value raises ModelError naming it."""
    values = dict(tiny)
    if seed is not None:
        values.setdefault("seed", seed)
    try:
        return TinyDiffusionSpec(**values)
    except TypeError as err:
        raise ModelError(f"model.tiny: {_unknown_key(err, TinyDiffusionSpec)}") from err
    except ValueError as err:
        raise ModelError(str(err)) from err


def _unknown_key(err: TypeError, cls: type) -> str:
    """`errors.unknown_key`'s message from a dataclass constructor's TypeError."""
    import re

    match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
    if match is None:
        return str(err)
    from posttrain.errors import unknown_key

    return unknown_key(match.group(1), list(cls.__dataclass_fields__))


def build_clip_tokenizer(words: tuple[str, ...] = TOY_WORDS, max_length: int = 16):
    """A byte-level CLIPTokenizer with one token per word in `words` (BPE merges built left to right)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BOS: 0, EOS: 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = list(word.lower())
        pieces[-1] += "</w>"
        while len(pieces) > 1:  # merge the first two pieces until the word is one token
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny_diffusion(spec: TinyDiffusionSpec = TinyDiffusionSpec()) -> dict:
    """Fresh components {unet, vae (None in pixel mode), text_encoder, tokenizer, scheduler} seeded by `spec.seed`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(spec.words, spec.max_length)
    torch.manual_seed(spec.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden_size,
            intermediate_size=2 * spec.text_hidden_size,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=spec.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = None
    channels, size = 3, spec.resolution
    if not spec.pixel:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels,
            latent_channels=spec.latent_channels,
            norm_num_groups=min(32, spec.vae_channels[0]),
            sample_size=spec.resolution,
        )
        channels, size = spec.latent_channels, spec.resolution // 2 ** (len(spec.vae_channels) - 1)
    n = len(spec.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=spec.layers_per_block,
        block_out_channels=spec.block_out_channels,
        down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        cross_attention_dim=spec.text_hidden_size,
        attention_head_dim=8,
        norm_num_groups=min(32, spec.block_out_channels[0]),
    )
    scheduler = _tiny_scheduler(spec)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _tiny_scheduler(spec: TinyDiffusionSpec) -> Any:
    from diffusers import DDPMScheduler

    schedule = spec.beta_schedule or ("linear" if spec.pixel else "scaled_linear")
    betas = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}.get(schedule, (1e-4, 0.02))
    return DDPMScheduler(
        num_train_timesteps=spec.num_train_timesteps,
        beta_start=betas[0],
        beta_end=betas[1],
        beta_schedule=schedule,
        prediction_type="epsilon",
        # Pixel space: clip the predicted x0 to [-1, 1] when sampling, as DDPM does for pixel models (Ho et al. 2020).
        # Without it a tiny UNet's small eps error at t near T (alpha_bar ~ 4e-5) becomes an x0 error of ~10 per
        # pixel, and DDIM draws saturated coloured noise (which the toy's saturation reward scores as ~1.0).
        # Latent space keeps Stable Diffusion's clip_sample: false (latents are not bounded).
        clip_sample=spec.pixel,
        steps_offset=1,
    )


def save_tiny_diffusion(out_dir: str | Path, spec: TinyDiffusionSpec = TinyDiffusionSpec()) -> Path:
    """Build and save a tiny stack: a StableDiffusionPipeline dir (latent) or component subfolders (pixel)."""
    out = Path(out_dir)
    parts = build_tiny_diffusion(spec)
    if spec.pixel:
        for name in ("unet", "text_encoder", "tokenizer", "scheduler"):
            parts[name].save_pretrained(out / name)
        return out
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
