"""`trainer: sft`: supervised fine-tuning over TRL's SFTTrainer (prompt/completion rows, or chat messages)."""

from __future__ import annotations

from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import (
    RunResult,
    config_kwargs,
    load_model_and_tokenizer,
    load_train_data,
    run_training,
    standard_plan,
)

SPEC = TrainerSpec(
    name="sft",
    description="supervised fine-tuning on prompt/completion or chat data (TRL SFTTrainer)",
    library_config="trl.trainer.sft_config:SFTConfig",
    train_schema="prompt_completion",
    eval_schema="prompt_answer",
    method_keys=frozenset({"completion_only_loss", "assistant_only_loss", "loss_type", "packing", "max_length"}),
    curves=("loss",),
)


def plan(recipe: Recipe) -> list[str]:
    s = recipe.settings
    batch = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return standard_plan(
        recipe, [f"SFT on data.train, loss on completions only; {batch} sequences per optimizer step per process"]
    )


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    from trl import SFTConfig, SFTTrainer

    from posttrain.models.loading import peft_config

    model, tokenizer = load_model_and_tokenizer(recipe, run)
    rows = load_train_data(recipe, schema="prompt_completion")
    # SFTTrainer tokenises every column it's given; keep only what it trains on.
    rows = rows.select_columns(["prompt", "completion"])
    config = SFTConfig(**config_kwargs(recipe, run))
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=rows, processing_class=tokenizer, peft_config=peft_config(recipe.model)
    )
    return run_training(recipe, trainer, tokenizer, run, resume)
