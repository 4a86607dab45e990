"""The NFT loss (Chen et al. 2025, "Bridging Supervised Learning and Reinforcement Learning in Math Reasoning",
Eq. 8-9; official code NVlabs/NFT) as a pure function of tensors, and the group statistics it needs. Its options
are the trainer's `NFTOptions` (posttrain.trainers.nft), a torch-free dataclass.

Per question q with K answers from pi_old, verifier r in {0, 1} and r_hat_q = mean r over the group:

    loss_token = -omega(q) * [ r * log R  +  (1 - r) * log max_v((1 - r_hat * R) / (1 - r_hat), eps) ]

with R = pi_theta / pi_old per token. The negative term is the likelihood of the *implicit negative policy*
pi^- = (pi_old - r_hat * pi^+) / (1 - r_hat) (Eq. 6), so minimising it trains pi_theta = pi^+ towards the correct
answers using the wrong ones too; at the optimum pi_theta = pi_old restricted to correct answers, renormalised.

On-policy (R = 1) the per-token gradient is -omega * grad log pi for a correct answer and +omega * r_hat/(1-r_hat)
* grad log pi for a wrong one. GRPO's is -A * grad log pi with A = (r - r_hat)/sigma, i.e. -(1-r_hat)/sigma and
+r_hat/sigma; the two are equal iff omega = (1 - r_hat)/sigma. So omega = 1 - r_hat is Dr. GRPO (no std scaling)
and omega = sqrt((1 - r_hat)/r_hat) is GRPO with the population std sigma = sqrt(r_hat (1 - r_hat)) of binary
rewards (TRL divides by the n-1 std + 1e-4 instead: a factor sqrt((K-1)/K) and an epsilon apart). The token
aggregation must match too: `sum_const` = TRL `dr_grpo`, `seq_mean` = TRL `grpo`, `token_mean` = TRL `bnpo`
(and `dapo` on one process without accumulation); `constant` is the official code's (dp_actor.py: the tokens of
each micro-batch summed and divided by 1000, the micro-batches summed, not averaged, per process). Every normaliser
counts all sequences/tokens of the batch, masked ones included, exactly as TRL counts zero-advantage ones. The
negative term carries `neg_weight` (the official code's float: 1 NFT, 0 RFT).
"""

from __future__ import annotations

from typing import Any

import torch


def group_correctness(
    rewards: torch.Tensor, num_generations: int, threshold: float, truncated: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion: correct (bool), the group's r_hat (unclamped fraction correct), and whether its group is
    informative (neither all correct nor all wrong). `rewards` is (B,) in group order; truncated answers count as
    wrong (the paper's verifier rejects an answer that never finished)."""
    correct = rewards >= threshold
    if truncated is not None:
        correct = correct & ~truncated.bool()
    grouped = correct.float().view(-1, num_generations)
    r_hat = grouped.mean(dim=1).repeat_interleave(num_generations)
    informative = (r_hat > 0) & (r_hat < 1)
    return correct, r_hat, informative


def omega(r_hat: torch.Tensor, weight: str) -> torch.Tensor:
    """omega(q) of Eq. 8: 1 - r_hat (Dr. GRPO), sqrt((1 - r_hat) / r_hat) (GRPO) or 1 (RFT)."""
    if weight == "one_minus_rhat":
        return 1.0 - r_hat
    if weight == "sqrt":
        return torch.sqrt((1.0 - r_hat) / r_hat)
    return torch.ones_like(r_hat)


def nft_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    correct: torch.Tensor,
    r_hat: torch.Tensor,
    informative: torch.Tensor,
    options: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NFT loss of one micro-batch (B sequences x T tokens) and detached stats (pos/neg parts, clip fraction).

    `options` is an `NFTOptions` (posttrain.trainers.nft: its fields and their meaning)."""
    mask = completion_mask.to(per_token_logps.dtype)
    r_hat = r_hat.clamp(options.rhat_clamp, 1.0 - options.rhat_clamp).unsqueeze(1).to(per_token_logps.dtype)
    pos = correct.bool().unsqueeze(1)
    keep = (informative.bool() if options.mask_uninformative else torch.ones_like(correct, dtype=torch.bool)).unsqueeze(
        1
    )

    log_ratio = (per_token_logps - old_per_token_logps).clamp(max=options.logratio_cap)
    ratio = torch.exp(log_ratio)
    # Eq. 9: the implicit negative policy's likelihood ratio. max_v keeps the value >= eps in the forward pass but
    # passes the unclipped gradient (straight-through, as the official code), so d log(v_st) = dv / max(v, eps):
    # a negative whose R exceeds 1/r_hat (v <= 0, log undefined) still gets pushed down instead of going silent.
    v = (1.0 - r_hat * ratio) / (1.0 - r_hat)
    v_floor = v.clamp(min=options.neg_clip_eps)
    v_st = v + (v_floor - v).detach()
    neg_term = torch.log(v_st)

    w = omega(r_hat, options.weight) * keep
    pos_tokens = -w * log_ratio * pos * mask * float(options.positives)
    neg_tokens = -w * neg_term * ~pos * mask * (float(options.negatives) * float(getattr(options, "neg_weight", 1.0)))

    def aggregate(tokens: torch.Tensor) -> torch.Tensor:
        if options.aggregation == "sum_const":
            const = options.loss_const or per_token_logps.size(1)
            return tokens.sum() / (tokens.size(0) * const)
        if options.aggregation == "constant":  # NVlabs/NFT: sum over tokens / 1000, not divided by the batch
            return tokens.sum() / (options.loss_const or 1000.0)
        if options.aggregation == "seq_mean":
            return (tokens.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        return tokens.sum() / mask.sum().clamp(min=1.0)

    pos_loss, neg_loss = aggregate(pos_tokens), aggregate(neg_tokens)
    stats = {"pos_loss": pos_loss.detach()}
    if options.negatives:  # RFT (no implicit-negative term) logs no negative-side stats: they would mean nothing
        neg_mask = (~pos & keep) * mask
        stats["neg_loss"] = neg_loss.detach()
        stats["neg_clip_frac"] = ((v < options.neg_clip_eps) * neg_mask).sum().detach() / neg_mask.sum().clamp(min=1.0)
    return pos_loss + neg_loss, stats


def constant_normaliser(options: object, processes: int) -> float:
    """C of the `constant` aggregation on a launch of `processes`: `loss_const` (default 1000, the official code's)
    scaled by `loss_const_processes / processes`. Gradients are averaged over processes, so a token of an optimizer
    step weighs 1 / (C x processes) = 1 / (loss_const x loss_const_processes): what it weighed in a run on
    `loss_const_processes` processes (the official 7B run: 32 GPUs), whatever this launch's count. Without
    `loss_const_processes`, C = loss_const and the per-token weight changes with the process count."""
    const = getattr(options, "loss_const", None) or 1000.0
    reference = getattr(options, "loss_const_processes", None)
    return float(const) if not reference else float(const) * reference / max(processes, 1)
