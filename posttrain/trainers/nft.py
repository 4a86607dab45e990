"""`trainer: nft` and `trainer: rft`: negative-aware fine-tuning (Chen et al. 2025) over TRL's GRPOTrainer.

TRL samples, scores and computes pi_old's log-probs exactly as for GRPO; this subclass only swaps the loss
(`posttrain.trainers.nft_loss`) and attaches each completion's correctness and group r_hat to the batch. RFT is the
same trainer with the negative term off and omega = 1 (SFT on the verifier-accepted answers).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from posttrain.errors import RecipeError
from posttrain.recipe import Recipe
from posttrain.registry import TRAINERS
from posttrain.runs import RunDir
from posttrain.trainers.base import RunResult, run_training

if TYPE_CHECKING:
    from posttrain.trainers.nft_loss import NFTOptions
from posttrain.trainers.grpo import batch_geometry, build_trainer

# RFT = NFT without the negative term and with omega = 1; all-correct groups are still SFT data for it.
RFT_DEFAULTS = {"weight": "one", "negatives": False, "mask_uninformative": False}
# Batch keys the wrapper adds (per completion, so TRL's split/shuffle of the generation batch carries them along).
CORRECT, RHAT, INFORMATIVE = "nft_correct", "nft_rhat", "nft_informative"


def _nft_keys() -> set[str]:
    return {name for name, _ in TRAINERS["nft"].extra_algorithm_keys}


def nft_options(recipe: Recipe) -> NFTOptions:
    from posttrain.trainers.nft_loss import NFTOptions  # torch: only when training or planning this trainer

    defaults = RFT_DEFAULTS if recipe.trainer == "rft" else {}
    names = _nft_keys()
    try:
        return NFTOptions(**{**defaults, **{k: v for k, v in recipe.algorithm.items() if k in names}})
    except ValueError as err:
        raise RecipeError(f"{recipe.where}: algorithm: {err}") from err


def _make_trainer_class():
    from trl import GRPOTrainer

    from posttrain.trainers.nft_loss import NFTOptions, group_correctness, nft_loss

    class NFTTrainer(GRPOTrainer):
        """GRPOTrainer with the NFT loss. Set `nft_options` after construction (train() does)."""

        nft_options: NFTOptions = NFTOptions()

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            # TRL returns rewards gathered over all processes but keeps only advantages: capture them for r_hat.
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self._nft_rewards_per_func = rewards_per_func
            return rewards_per_func

        def _generate_and_score_completions(self, inputs):
            import torch

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
            import torch

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
            loss, stats = nft_loss(
                per_token_logps, old, mask, inputs[CORRECT], inputs[RHAT], inputs[INFORMATIVE], options
            )
            mode = "train" if self.model.training else "eval"
            # Trainer's own loss scaling is off for GRPOTrainer: each micro-batch loss is divided here, as TRL does.
            if mode == "train":
                loss = loss / self.current_gradient_accumulation_steps
            for name, value in stats.items():
                self._metrics[mode][f"nft/{name}"].append(self.accelerator.gather(value).mean().item())
            return loss

    return NFTTrainer


def trainer_class():
    """The NFTTrainer class (built lazily: importing TRL costs seconds, and `--dry-run` must not pay it)."""
    global _TRAINER_CLASS
    if _TRAINER_CLASS is None:
        _TRAINER_CLASS = _make_trainer_class()
    return _TRAINER_CLASS


_TRAINER_CLASS = None


def plan(recipe: Recipe) -> list[str]:
    g = batch_geometry(recipe)
    o = nft_options(recipe)
    ok = g["generation_batch"] % g["num_generations"] == 0
    kind = "RFT" if recipe.trainer == "rft" else "NFT"
    return [
        f"{kind}: each generation batch holds {g['generation_batch']} completions = "
        f"{g['prompts_per_generation']} prompts x {g['num_generations']} samples (TRL counts completions)",
        "rule: the generation batch must be a multiple of num_generations so every prompt's group is whole"
        + ("" if ok else "  <-- VIOLATED: change per_device_train_batch_size or num_generations"),
        f"loss: omega={o.weight}, positives={o.positives}, negatives={o.negatives}, eps={o.neg_clip_eps:g}, "
        f"r_hat clamp={o.rhat_clamp:g}, aggregation={o.aggregation}, reward >= {o.correct_threshold:g} is correct, "
        f"{'all-correct/all-wrong groups masked' if o.mask_uninformative else 'no group masking'}",
        "rewards: " + ", ".join(f"{r.name} x{r.weight:g}" for r in recipe.rewards),
    ]


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    options = nft_options(recipe)
    if recipe.algorithm.get("beta", 0.0):
        raise RecipeError(f"{recipe.where}: trainer '{recipe.trainer}' has no KL term: set algorithm.beta to 0")
    names = _nft_keys()
    # GRPOConfig must not see NFT's own keys.
    grpo_recipe = dataclasses.replace(recipe, algorithm={k: v for k, v in recipe.algorithm.items() if k not in names})
    trainer, tokenizer = build_trainer(grpo_recipe, run, trainer_class=trainer_class())
    trainer.nft_options = options
    return run_training(recipe, trainer, tokenizer, run, resume)
