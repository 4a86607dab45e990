"""The toy base of `trainer: seppo`: a tiny pixel-space stack pretrained on the coloured-squares mix, built once per
run dir as the first stage of a run whose `model.tiny` has `pretrain:` (the role the SFT model plays for GRPO in
the LLM quickstart).

The base is the SFT of a fresh tiny stack on `toy_pretrain_rows`: `n` squares of which a share `saturated` are in
the saturated prompt colour and the rest dull, so it mostly draws dull squares and SePPO has room to move it toward
the (saturated) winners. Loss: the epsilon-prediction MSE of DDPM (Ho et al. 2020, Eq. 14) at uniform timesteps,
with empty-prompt dropout so that classifier-free guidance has an unconditional model; AdamW with a cosine decay
of the learning rate to 0 (Loshchilov & Hutter 2017), gradient clipping at 1.0.

Deterministic: the init, the data, the batches, the timesteps and the noise depend only on the seed (the tiny
spec's, or the recipe's). Cached: written to `<run>/base_model.tmp/` and renamed to `<run>/base_model/` with
`base_model/pretrain.json` (the spec, the loss curve, the seconds), so a resumed run reuses it and a killed one
leaves no half-written base.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.data.toy_images import toy_pretrain_rows
from posttrain.models.diffusion import encode_prompts, load_stack, tokenize
from posttrain.models.tiny_diffusion import PRETRAIN_FILE, TinyDiffusionSpec, ToyPretrain, save_tiny_diffusion

LOG_EVERY = 25  # updates between the loss values kept in pretrain.json


def build_tiny_base(spec: TinyDiffusionSpec, target: Path) -> Path:
    """`target` holds the tiny stack of `spec`, pretrained when `spec.pretrain` is set (built once, atomically)."""
    if (target / "unet" / "config.json").exists() and (spec.pretrain is None or (target / PRETRAIN_FILE).exists()):
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)  # a base from before `pretrain:` was added, or a broken one
    save_tiny_diffusion(tmp, spec)
    if spec.pretrain is not None:
        record = pretrain_toy_base(tmp, spec.pretrain, spec.seed)
        (tmp / PRETRAIN_FILE).write_text(json.dumps(record, indent=1))
    tmp.rename(target)
    return target


def pretrain_toy_base(model_dir: Path, pretrain: ToyPretrain, seed: int) -> dict[str, Any]:
    """SFT of the stack in `model_dir` on the toy mix (module docstring); the UNet is saved back in place.
    Returns what pretrain.json records: the settings, the mean loss per `LOG_EVERY` updates and the seconds."""
    start = time.monotonic()
    stack = load_stack(model_dir)
    resolution = int(stack.unet.config.sample_size)  # pixel stacks only (TinyDiffusionSpec checks)
    rows = toy_pretrain_rows(pretrain.n, pretrain.saturated, seed=seed, resolution=resolution)
    images = torch.stack([row.winner for row in rows])
    prompts = [row.prompt for row in rows]
    vocab = sorted(set(prompts)) + [""]
    states = encode_prompts(stack, tokenize(stack.tokenizer, vocab))
    which = torch.tensor([vocab.index(p) for p in prompts])
    unet, scheduler = stack.unet.train(), stack.scheduler
    stack.text_encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=pretrain.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / pretrain.updates))
    )
    gen = torch.Generator().manual_seed(seed)
    losses, window = [], []
    from tqdm.auto import tqdm

    bar = tqdm(range(pretrain.updates), desc="toy base (pretraining)", unit="update", mininterval=1.0)
    for _ in bar:
        idx = torch.randint(0, len(rows), (pretrain.batch_size,), generator=gen)
        x0, context = images[idx], which[idx]
        dropped = torch.rand(len(idx), generator=gen) < pretrain.empty_prompt_prob
        context = states[torch.where(dropped, len(vocab) - 1, context)]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        pred = unet(scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred, eps)  # DDPM's simplified objective
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if len(window) == LOG_EVERY:
            losses.append(round(sum(window) / len(window), 5))
            bar.set_postfix(loss=losses[-1])
            window = []
    unet.eval().save_pretrained(model_dir / "unet")
    return {"pretrain": pretrain.as_dict(), "seed": seed, "loss_every": LOG_EVERY, "loss": losses,
            "seconds": round(time.monotonic() - start, 1)}  # fmt: skip
