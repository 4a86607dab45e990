"""NFTTrainer: TRL's GRPOTrainer with the NFT loss (posttrain.trainers.nft_loss). Imported only when an NFT/RFT
run starts (importing TRL costs seconds; `--dry-run` must not pay it).

TRL samples, scores and computes pi_old's log-probs exactly as for GRPO; the overrides attach each completion's
correctness and group r_hat to the batch and swap the loss. The private TRL methods overridden here
(`_calculate_rewards`, `_generate_and_score_completions`, `_compute_loss`) are pinned by TRL's minor version and
guarded by tests/test_nft.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from trl import GRPOTrainer

from posttrain.trainers.nft_loss import constant_normaliser, group_correctness, nft_loss

# Batch keys the wrapper adds (per completion, so TRL's split/shuffle of the generation batch carries them along).
CORRECT, RHAT, INFORMATIVE = "nft_correct", "nft_rhat", "nft_informative"


class NFTTrainer(GRPOTrainer):
    """GRPOTrainer with the NFT loss. Set `nft_options` (an NFTOptions) after construction; train() does."""

    nft_options: Any = None

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns rewards gathered over all processes but keeps only advantages: capture them for r_hat.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._nft_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        k = self.num_generations if mode == "train" else self.num_generations_eval
        rewards = (self._nft_rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        # Truncated = no EOS inside the completion mask (TRL's own test, on the padded tensor).
        eos = torch.isin(output["completion_ids"], torch.tensor(self.eos_token_ids, device=device))
        truncated = self.accelerator.gather(~(eos & output["completion_mask"].bool()).any(dim=1))
        correct, r_hat, informative = group_correctness(rewards, k, self.nft_options.correct_threshold, truncated)
        n = len(inputs)
        local = slice(self.accelerator.process_index * n, (self.accelerator.process_index + 1) * n)
        output.update({CORRECT: correct[local], RHAT: r_hat[local], INFORMATIVE: informative[local]})
        grouped = r_hat.view(-1, k)[:, 0]
        self._metrics[mode]["nft/rhat_mean"].append(grouped.mean().item())
        self._metrics[mode]["nft/rhat_min"].append(grouped.min().item())
        self._metrics[mode]["nft/rhat_max"].append(grouped.max().item())
        self._metrics[mode]["nft/masked_group_frac"].append(((grouped == 0) | (grouped == 1)).float().mean().item())
        return output

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, _, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
        )
        # TRL skips pi_old's forward when the batch is used once on-policy; then pi_old = pi_theta (detached).
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        options = self.nft_options
        if options.aggregation == "sum_const" and options.loss_const is None:
            options = dataclasses.replace(options, loss_const=float(self.max_completion_length))
        if options.aggregation == "constant" and getattr(options, "loss_const_processes", None):
            options = dataclasses.replace(
                options, loss_const=constant_normaliser(options, self.accelerator.num_processes)
            )
        loss, stats = nft_loss(per_token_logps, old, mask, inputs[CORRECT], inputs[RHAT], inputs[INFORMATIVE], options)
        mode = "train" if self.model.training else "eval"
        # Trainer's own loss scaling is off for GRPOTrainer: each micro-batch loss is divided here, as TRL does;
        # `constant` sums the micro-batches instead, as the official code does (its normaliser is the constant).
        if mode == "train" and options.aggregation != "constant":
            loss = loss / self.current_gradient_accumulation_steps
        for name, value in stats.items():
            self._metrics[mode][f"nft/{name}"].append(self.accelerator.gather(value).mean().item())
        return loss
