"""`trainer: dpo`: direct preference optimisation (Rafailov et al. 2023) over TRL's DPOTrainer.

On (prompt, chosen, rejected) rows DPO minimises, against a frozen reference policy pi_ref (the starting model),

    -log sigmoid( beta * [ (log pi(chosen) - log pi_ref(chosen)) - (log pi(rejected) - log pi_ref(rejected)) ] )

(Eq. 7 of the paper; `algorithm.loss_type` picks TRL's variants). TRL owns the loss, the reference model and the
log-prob bookkeeping; posttrain adds the recipe, the data, held-out generation before/after and the report.
A pair whose chosen and rejected texts are identical states no preference (its gradient is exactly zero), so such
rows are dropped before training, and the count is printed.
"""

from __future__ import annotations

from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import (
    RunResult,
    config_kwargs,
    load_policy_tokenizer_data,
    run_training,
    standard_plan,
)

SPEC = TrainerSpec(
    name="dpo",
    description="direct preference optimisation on (prompt, chosen, rejected) pairs against a frozen reference "
    "(Rafailov et al. 2023; TRL DPOTrainer)",
    library_config="trl.trainer.dpo_config:DPOConfig",
    train_schema="preference",
    eval_schema="prompt_answer",
    method_keys=frozenset(
        {
            "beta",
            "loss_type",
            "loss_weights",
            "label_smoothing",
            "use_weighting",
            "ld_alpha",
            "discopop_tau",
            "f_divergence_type",
            "f_alpha_divergence_coef",
            "sync_ref_model",
            "ref_model_sync_steps",
            "ref_model_mixup_alpha",
            "max_length",
            "truncation_mode",
        }
    ),  # fmt: skip
    curves=("loss", "rewards/margins", "rewards/accuracies"),
    sequences_per_row=2,  # TRL concatenates chosen and rejected into one batch
    reference_model=True,
    paper="[Direct Preference Optimization: Your Language Model is Secretly a Reward Model]"
    "(https://arxiv.org/abs/2305.18290)",
)


def plan(recipe: Recipe) -> list[str]:
    s = recipe.settings
    pairs = s.per_device_train_batch_size * s.gradient_accumulation_steps
    losses = " + ".join(s.loss_type)
    return standard_plan(
        recipe,
        [
            f"DPO ({losses} loss, beta {s.beta:g}) on data.train's (prompt, "
            f"chosen, rejected) rows against a frozen copy of the starting model; {pairs} pairs per optimizer step "
            "per process",
        ],
    )


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    from trl import DPOConfig, DPOTrainer

    from posttrain.data.schemas import distinct_pairs
    from posttrain.models.loading import peft_config

    model, tokenizer, rows = load_policy_tokenizer_data(recipe, run, schema="preference")
    rows = rows.select_columns(["prompt", "chosen", "rejected"])
    rows = distinct_pairs(rows, f"{recipe.where}: data.train", "DPO")
    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(**config_kwargs(recipe, run)),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config(recipe.model),
    )
    return run_training(recipe, trainer, tokenizer, run, resume)


