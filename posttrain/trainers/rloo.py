"""`trainer: rloo`: REINFORCE Leave-One-Out over TRL's RLOOTrainer (Ahmadian et al. 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs").

For each prompt x the policy samples k completions y_1..y_k (`rollout.num_generations`). Each is scored by the
recipe's rewards, and with `algorithm.beta` > 0 a sequence-level KL penalty against a frozen reference policy (the
starting model) is folded into the reward, as in the paper:

    r_i = R(x, y_i) - beta * sum_t [log pi_old(y_i,t | .) - log pi_ref(y_i,t | .)]

The baseline of sample i is the mean reward of the *other* k - 1 samples of its prompt (leave-one-out), so it is
independent of y_i and the estimator stays unbiased without a learned value function:

    A_i = r_i - 1/(k-1) * sum_{j != i} r_j

and the policy gradient is 1/k * sum_i A_i * grad log pi(y_i | x), on whole sequences (one action per completion,
not per token). TRL writes it as a PPO-style clipped objective over the sequence likelihood ratio
rho_i = pi_theta(y_i | x) / pi_old(y_i | x): loss = -mean_i min(rho_i A_i, clip(rho_i, 1 - epsilon,
1 + epsilon_high) A_i); with one optimizer step per generation rho_i = 1 and it is the paper's REINFORCE estimator.
Unlike GRPO, rewards are not divided by the group's standard deviation (`normalize_advantages` instead standardises
over the whole generation batch), and the KL term sits in the reward rather than in the per-token loss.

TRL owns the sampling, the reward/KL bookkeeping, the advantages and the loss; posttrain adds the recipe (the
`rollout` section maps onto RLOOConfig's generation fields, `algorithm:` onto its method fields), the data, the
rewards from `reward_models`, dynamic sampling (`algorithm.dynamic_sampling`, groups whose verifier rewards do not
vary are dropped), held-out evaluation before and after, and the report. The model, data, rewards and config are
built by GRPO's `build_trainer` (RLOO batches completions exactly as GRPO does, and RLOOConfig's batch rules are
GRPOConfig's), with RLOOConfig as the library config.
"""

from __future__ import annotations

from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers import grpo
from posttrain.trainers.base import RunResult, run_training, standard_plan
from posttrain.trainers.dynamic_sampling import DynamicSamplingOptions

# GRPOConfig method fields RLOOConfig does not have: RLOO has one loss and no per-group reward scaling.
GRPO_ONLY_KEYS = frozenset({"loss_type", "delta", "scale_rewards", "importance_sampling_level", "top_entropy_quantile"})
RLOO_METHOD_KEYS = (grpo.GRPO_METHOD_KEYS - GRPO_ONLY_KEYS) | {"normalize_advantages", "reward_clip_range"}

SPEC = TrainerSpec(
    name="rloo",
    description="REINFORCE leave-one-out: each sample's baseline is its siblings' mean reward "
    "(Ahmadian et al. 2024; TRL RLOOTrainer)",
    options=DynamicSamplingOptions,
    library_config="trl.trainer.rloo_config:RLOOConfig",
    method_keys=RLOO_METHOD_KEYS,
    needs_rewards=True,
    # Not the loss: on-policy, leave-one-out advantages sum to zero in each group, so the logged loss is ~0 by
    # construction; the policy's entropy shows it sharpening.
    curves=("reward", "entropy"),
    train_schema="prompt",
    eval_schema="prompt_answer",
    generates=True,
    reference_model=True,  # with beta > 0 (RLOOConfig's default is 0.05: a frozen reference is loaded)
    paper="[Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs]"
    "(https://arxiv.org/abs/2402.14740)",
)


def problems(recipe: Recipe) -> list[str]:
    """GRPO's batch rules (RLOOConfig.__post_init__ checks the same ones), and a reward clip range that is a range."""
    found = grpo.problems(recipe)
    clip = recipe.settings.reward_clip_range
    if clip is not None and (len(clip) != 2 or not clip[0] < clip[1]):
        found.append(f"algorithm.reward_clip_range must be [min, max] with min < max, got {list(clip)}")
    return found


rehearse = grpo.rehearse  # `--rehearse`: RLOO's batch is GRPO's (whole generation groups per micro-batch)


def kl_line(recipe: Recipe) -> str:
    beta = recipe.settings.beta
    if not beta:
        return "KL: beta 0, no KL penalty and no reference model (r_i is the reward alone)"
    reference = (
        "the base model with the LoRA adapter off" if recipe.model.lora else "a frozen copy of the starting model"
    )
    return (
        f"KL: beta {beta:g}, r_i = reward - {beta:g} x sum_t (log pi_old - log pi_ref) over the completion's tokens, "
        f"in the reward (not the loss); pi_ref is {reference}"
    )


def plan(recipe: Recipe) -> list[str]:
    g = grpo.batch_geometry(recipe, grpo.plan_processes(recipe))
    s = recipe.settings
    k = g["num_generations"]
    shaping = [
        "advantages standardised over the generation batch" if s.normalize_advantages else "advantages not rescaled",
        f"rewards clipped to {list(s.reward_clip_range)}" if s.reward_clip_range is not None else "rewards unclipped",
    ]
    return standard_plan(
        recipe,
        [
            f"RLOO: each generation batch holds {g['generation_batch']} completions = "
            f"{g['prompts_per_generation']} prompts x {k} samples "
            f"(per_device_train_batch_size {g['per_device']} x {g['processes']} process(es) x "
            f"{g['micro_steps']} micro-batch(es)); TRL counts completions, not prompts, in the batch size",
            f"advantage: A_i = r_i - mean_{{j != i}} r_j, the mean of the other {k - 1} samples of the prompt "
            f"(leave-one-out baseline); {', '.join(shaping)}",
            "loss: -mean_i min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon_high) A_i), rho_i the whole "
            f"completion's likelihood ratio (epsilon {s.epsilon:g}, epsilon_high "
            f"{s.epsilon_high if s.epsilon_high is not None else s.epsilon:g})",
            kl_line(recipe),
            grpo.group_rule_line(recipe),
            grpo.steps_line(recipe),
            grpo.dynamic_line(recipe, "groups whose rewards do not vary, their A_i 0 but for the KL term,"),
            f"rollout backend: {recipe.rollout.backend}"
            + (f" ({recipe.rollout.vllm.mode})" if recipe.rollout.backend == "vllm" else ""),
            grpo.rewards_line(recipe),
        ],
    )


def trainer_class():
    """TRL's RLOOTrainer with dynamic sampling (a pass-through unless `algorithm.dynamic_sampling` is on); imports
    TRL, so only when training."""
    from trl import RLOOTrainer

    from posttrain.trainers.dynamic_sampling import DynamicSamplingMixin

    class PosttrainRLOOTrainer(DynamicSamplingMixin, RLOOTrainer):
        pass

    return PosttrainRLOOTrainer


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    trainer, tokenizer = grpo.build_trainer(recipe, run, trainer_class=trainer_class())
    trainer.dynamic_options = recipe.options
    return run_training(recipe, trainer, tokenizer, run, resume)
