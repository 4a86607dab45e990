"""`trainer: nft`: negative-aware fine-tuning (Chen et al. 2025) over TRL's GRPOTrainer.

TRL samples, scores and computes pi_old's log-probs exactly as for GRPO; `posttrain.trainers.nft_trainer` swaps the
loss for `posttrain.trainers.nft_loss` and attaches each completion's correctness and group r_hat to the batch.
RFT (`posttrain.trainers.rft`) is the same trainer with the negative term off and omega = 1.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Literal

from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import RunResult, run_training, standard_plan
from posttrain.trainers.dynamic_sampling import DynamicSamplingOptions
from posttrain.trainers.grpo import (
    GRPO_METHOD_KEYS,
    batch_geometry,
    build_trainer,
    dynamic_line,
    group_rule_line,
    plan_processes,
    rewards_line,
    steps_line,
    tools_line,
)
from posttrain.trainers.grpo import problems as grpo_problems
from posttrain.trainers.grpo import rehearse as grpo_rehearse

# NFT's choice lists, written once (the options, RFT's options and the checks read these types).
Weight = Literal["one_minus_rhat", "sqrt", "one"]
Aggregation = Literal["sum_const", "seq_mean", "token_mean", "constant"]


@dataclass(frozen=True)
class NFTOptions(DynamicSamplingOptions):
    """NFT's own `algorithm:` keys (the loss of posttrain.trainers.nft_loss). RFT is `negatives=False, weight="one"`."""

    weight: Weight = field(
        default="one_minus_rhat",
        metadata={"help": "omega(q): 1-r_hat (Dr. GRPO), sqrt((1-r_hat)/r_hat) (GRPO), one (RFT)"},
    )
    neg_clip_eps: float = field(
        default=1.0, metadata={"help": "eps in max_v(., eps): the negative likelihood ratio's floor (forward pass)"}
    )
    rhat_clamp: float = field(
        default=0.02, metadata={"help": "r_hat clamped to [c, 1 - c] so omega and 1/(1 - r_hat) stay finite"}
    )
    logratio_cap: float = field(
        default=10.0, metadata={"help": "log R capped before exp so one token cannot overflow the negative term"}
    )
    correct_threshold: float = field(
        default=0.5, metadata={"help": "reward >= threshold counts as correct (binary verifiers give 0 or 1)"}
    )
    aggregation: Aggregation = field(
        default="sum_const",
        metadata={"help": "token aggregation: TRL dr_grpo, grpo, bnpo respectively; constant = the sum of the "
                          "optimizer step's tokens on each process / loss_const (NVlabs/NFT's dp_actor: / 1000)"},
    )  # fmt: skip
    loss_const: float | None = field(
        default=None,
        metadata={"help": "C: sum_const divides by B x C (None = max completion length, Dr. GRPO's); constant by C "
                          "alone (None = 1000, the official code's)"},
    )  # fmt: skip
    loss_const_processes: int | None = field(
        default=None,
        metadata={"help": "constant aggregation: the process count loss_const was set for (the official 7B run: 32 "
                          "GPUs); C is scaled by it / this launch's processes so each token weighs what it did there "
                          "(gradients are averaged over processes). None: C as given, per process", "ge": 1},
    )  # fmt: skip
    negatives: bool = field(default=True, metadata={"help": "the implicit-negative term; False with weight one = RFT"})
    neg_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the implicit-negative term (the official neg_weight: 1 NFT, 0 RFT; its README "
                          "suggests 0.5 for 32B)", "ge": 0.0},
    )  # fmt: skip
    positives: bool = field(default=True, metadata={"help": "False = the 'negatives only' ablation"})
    mask_uninformative: bool = field(
        default=True, metadata={"help": "drop all-correct / all-wrong groups (RFT keeps all-correct: SFT data)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, choices in (("weight", typing.get_args(Weight)), ("aggregation", typing.get_args(Aggregation))):
            if getattr(self, key) not in choices:
                raise ValueError(f"algorithm.{key} must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        if self.neg_weight < 0:
            raise ValueError(f"algorithm.neg_weight must be >= 0, got {self.neg_weight}")
        if self.loss_const is not None and self.loss_const <= 0:
            raise ValueError(f"algorithm.loss_const must be > 0, got {self.loss_const}")
        if not 0.0 <= self.rhat_clamp < 0.5:
            raise ValueError(f"algorithm.rhat_clamp must be in [0, 0.5), got {self.rhat_clamp}")
        if self.neg_clip_eps <= 0:
            raise ValueError(
                f"algorithm.neg_clip_eps must be > 0 (it is the floor inside a log), got {self.neg_clip_eps}"
            )


SPEC = TrainerSpec(
    name="nft",
    description="negative-aware fine-tuning: learn from wrong answers via an implicit negative policy "
    "(Chen et al. 2025; over TRL GRPOTrainer)",
    options=NFTOptions,
    library_config="trl.trainer.grpo_config:GRPOConfig",
    method_keys=GRPO_METHOD_KEYS,
    needs_rewards=True,
    curves=("reward", "loss"),
    train_schema="prompt",
    eval_schema="prompt_answer",
    generates=True,
    tools=True,
    paper="[Bridging Supervised Learning and Reinforcement Learning in Math Reasoning]"
    "(https://arxiv.org/abs/2505.18116)",
)


def problems(recipe: Recipe) -> list[str]:
    """GRPO's batch rules (NFT samples through TRL's GRPO machinery), and no KL term: NFT's loss has none."""
    found = grpo_problems(recipe)
    if recipe.settings.get("beta"):
        found.append(
            f"trainer '{recipe.trainer}' has no KL term: set algorithm.beta to 0 (got {recipe.settings.beta:g})"
        )
    return found


rehearse = grpo_rehearse  # and the same rehearsal shape


def _constant_line(o: NFTOptions, processes: int) -> str:
    c = o.loss_const or 1000
    if not o.loss_const_processes:
        return f" (sum / {c:g} per process)"
    scaled = c * o.loss_const_processes / processes
    return (f" (sum / {scaled:g} per process = {c:g} x {o.loss_const_processes} / {processes} process(es): each token "
            f"weighs 1 / {c * o.loss_const_processes:g}, as on {o.loss_const_processes} processes)")  # fmt: skip


def trainer_class():
    """The NFTTrainer class with dynamic sampling on top (its module imports TRL, which costs seconds: only when
    training)."""
    from posttrain.trainers.dynamic_sampling import DynamicSamplingMixin
    from posttrain.trainers.nft_trainer import INFORMATIVE, NFTTrainer
    from posttrain.trainers.tool_rollouts import ToolRolloutMixin

    class DynamicNFTTrainer(ToolRolloutMixin, DynamicSamplingMixin, NFTTrainer):  # outermost: it filters what NFT's wrapper returns
        def _dynamic_keep(self, output, n):
            return output[INFORMATIVE].bool()  # NFT's own notion: some answers right, some wrong

    return DynamicNFTTrainer


def plan(recipe: Recipe) -> list[str]:
    g = batch_geometry(recipe, plan_processes(recipe))
    o = recipe.options
    kind = recipe.trainer.upper()
    return standard_plan(
        recipe,
        [
            f"{kind}: each generation batch holds {g['generation_batch']} completions = "
            f"{g['prompts_per_generation']} prompts x {g['num_generations']} samples ({g['processes']} process(es); "
            "TRL counts completions)",
            group_rule_line(recipe),
            steps_line(recipe),
            dynamic_line(recipe, which="groups whose answers are all right or all wrong"),
            tools_line(recipe),
            f"loss: omega={o.weight}, positives={o.positives}, negatives={o.negatives} x neg_weight {o.neg_weight:g}, "
            f"eps={o.neg_clip_eps:g}, r_hat clamp={o.rhat_clamp:g}, aggregation={o.aggregation}"
            f"{_constant_line(o, g['processes']) if o.aggregation == 'constant' else ''}, "
            f"reward >= {o.correct_threshold:g} is "
            f"correct, {'all-correct/all-wrong groups masked' if o.mask_uninformative else 'no group masking'}",
            rewards_line(recipe),
        ],
    )


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    options = recipe.options
    trainer, tokenizer = build_trainer(recipe, run, trainer_class=trainer_class())
    trainer.nft_options = options
    trainer.dynamic_options = options
    return run_training(recipe, trainer, tokenizer, run, resume)
