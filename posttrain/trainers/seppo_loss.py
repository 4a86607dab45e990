"""The SePPO loss (Zhang et al. 2024, "SePPO: Semi-Policy Preference Optimization for Diffusion Alignment"; v2
renamed SSPO) and its baselines as pure functions of per-sample denoising errors.

With a shared timestep t and noise eps for the rows' two images, e = ||eps - eps_model(x_t, t, c)||^2 (mean over
pixels/latents), Delta_w = e_theta^w - e_ref^w for the winner and Delta_r = e_theta^r - e_ref^r for the reference
sample (an image the reference checkpoint generated for the same prompt):

    Diffusion-DPO (Wallace et al. 2023, Eq. 14):  L = -log sigmoid(-beta/2 * (Delta_w - Delta_l))   (real loser l)
    SePPO with the Anchor-based Adaptive Flipper (AAF):  L = -log sigmoid(-beta/2 * (Delta_w - s * Delta_r))
        s = sign(e_ref^w - e_theta^w), without gradient: the winner is the anchor. s = +1 when theta already fits
        the winner better than the reference did, so the reference's sample is treated as a loser (pushed away);
        s = -1 when the reference fits the winner better, so its sample is treated as a winner (imitated).
    indicator variant:  s = 1(s_sign = +1) in {0, 1}: when the reference is better, the loss is
        -log sigmoid(-beta/2 * Delta_w), a DPO-regularised SFT on the winner.
    no-AAF ablation:   s = +1 always (the reference sample is always a loser).
    SFT on winners:    L = e_theta^w (plain epsilon-prediction MSE; no reference model).

Tie rule: e_ref^w == e_theta^w (exactly so at the first step, when theta = ref) gives s = +1. The paper's premise
is that the preferred images are better than what the reference draws, so before theta has moved there is no
evidence to overturn it: the reference sample starts as a loser, as in self-play fine-tuning (SPIN) and Diffusion-
DPO's own loser. sign() would give 0 and silently drop the reference sample from the first update; -1 would make
the first update imitate the model's own samples. The indicator variant shares the rule (tie -> 1), so at theta =
ref all three SePPO variants take the same first step.

The gradient at theta = ref is beta/4 * (grad e_theta^w - s * grad e_theta^r): the winner's error always falls, the
reference sample's error rises for s = +1 and falls for s = -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain.trainers.seppo_variants import USES_REFERENCE_SAMPLES, VARIANTS, Variant

__all__ = ["USES_REFERENCE_SAMPLES", "VARIANTS", "Variant"]


@dataclass(frozen=True)
class SePPOLossOptions:
    """Loss options (recipe `algorithm:` keys `variant` and `beta`)."""

    variant: Variant = "seppo"
    beta: float = 5000.0  # Diffusion-DPO's beta for SD 1.5; the loss sees beta/2 * (difference of MSEs)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"SePPO variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.beta <= 0:
            raise ValueError(f"SePPO beta must be > 0, got {self.beta}")


def per_sample_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||target - pred||^2 averaged over every dimension but the batch: shape (B,), in float32."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


def aaf_sign(e_theta_w: torch.Tensor, e_ref_w: torch.Tensor, variant: Variant = "seppo") -> torch.Tensor:
    """The Anchor-based Adaptive Flipper s per row, without gradient (ties -> +1; see the module docstring)."""
    with torch.no_grad():
        ahead = (e_ref_w - e_theta_w) >= 0  # theta fits the anchor at least as well as the reference
        if variant == "seppo":
            return torch.where(ahead, 1.0, -1.0).to(e_theta_w.dtype)
        if variant == "seppo_indicator":
            return ahead.to(e_theta_w.dtype)
        return torch.ones_like(e_theta_w)  # seppo_no_aaf and diffusion_dpo: the other image is always a loser


def seppo_loss(
    e_theta_w: torch.Tensor,
    e_ref_w: torch.Tensor | None,
    e_theta_o: torch.Tensor | None,
    e_ref_o: torch.Tensor | None,
    options: SePPOLossOptions,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the batch and detached stats, from per-sample errors of shape (B,).

    `_o` is the row's other image: the reference sample for the SePPO variants, the real loser for diffusion_dpo,
    unused (None) for sft_winner. Stats: `implicit_acc` (share of rows whose logit is positive, ties half, as
    Diffusion-DPO logs it), `flip_rate` (share of rows whose reference sample was not treated as a loser: s = -1,
    or s = 0 for the indicator), `s_mean`, and the mean `delta_w` / `delta_o`.
    """
    nan = torch.tensor(float("nan"))
    if options.variant == "sft_winner":
        loss = e_theta_w.mean()
        return loss, {"mse_w": loss.detach(), "implicit_acc": nan, "flip_rate": nan, "s_mean": nan}
    if e_ref_w is None or e_theta_o is None or e_ref_o is None:
        raise ValueError(f"variant {options.variant!r} needs e_ref_w, e_theta_o and e_ref_o")

    s = aaf_sign(e_theta_w, e_ref_w, options.variant)
    delta_w = e_theta_w - e_ref_w.detach()
    delta_o = e_theta_o - e_ref_o.detach()
    logits = -0.5 * options.beta * (delta_w - s * delta_o)  # SePPO's AAF loss; Diffusion-DPO's Eq. 14 when s = 1
    loss = -F.logsigmoid(logits).mean()

    with torch.no_grad():
        stats = {
            "mse_w": e_theta_w.mean(),
            "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
            "flip_rate": (s < 1).float().mean(),
            "s_mean": s.mean(),
            "delta_w": delta_w.mean(),
            "delta_o": delta_o.mean(),
        }
    return loss, stats


def shared_timesteps_and_noise(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps t ~ U{0..T-1} and noise eps for a batch of stacked pairs [first images; second images] (2B, ...).

    Row i and row B + i (the winner and the other image of one preference row) get the same t and eps, as in
    Diffusion-DPO's training script: the difference of their errors then measures the images, not the draw.
    """
    if latents.shape[0] % 2:
        raise ValueError(f"expected an even batch of stacked pairs, got {latents.shape[0]} rows")
    half = latents.shape[0] // 2
    t = torch.randint(0, num_train_timesteps, (half,), generator=generator, device="cpu").to(latents.device)
    eps = torch.randn((half, *latents.shape[1:]), generator=generator, device="cpu").to(latents)
    return t.repeat(2), eps.repeat(2, *([1] * (latents.dim() - 1)))
