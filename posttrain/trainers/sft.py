"""`trainer: sft`: supervised fine-tuning over TRL's SFTTrainer (prompt/completion rows, or chat messages)."""

from __future__ import annotations

from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import (
    RunResult,
    chat_example_lines,
    config_kwargs,
    load_policy_tokenizer_data,
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
    paper="[Training language models to follow instructions with human feedback](https://arxiv.org/abs/2203.02155)",
)


def plan(recipe: Recipe) -> list[str]:
    s = recipe.settings
    batch = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return standard_plan(
        recipe,
        [
            f"SFT on data.train, loss on completions (conversations: assistant turns) only; {batch} sequences per "
            "optimizer step per process",
            *chat_example_lines(recipe),
        ],
    )


def build_trainer(recipe: Recipe, run: RunDir):
    """The configured SFTTrainer and tokenizer: prompt/completion rows, or `messages` conversations rendered by the
    chat template with the loss on the assistant turns (TRL's assistant-only loss)."""
    from trl import SFTConfig, SFTTrainer

    from posttrain.models.loading import peft_config

    model, tokenizer, rows = load_policy_tokenizer_data(recipe, run, schema="prompt_completion")
    chat = "messages" in rows.column_names and "completion" not in rows.column_names
    # SFTTrainer tokenises every column it's given; keep only what it trains on (a conversation's `tools`: the JSON
    # schemas its template renders, as TRL's SFT reads them).
    keep = ["messages", *(["tools"] if "tools" in rows.column_names else [])] if chat else ["prompt", "completion"]
    rows = rows.select_columns(keep)
    kwargs = config_kwargs(recipe, run)
    if chat:  # conversations: the loss covers the assistant turns only, unless the recipe says otherwise
        kwargs.setdefault("assistant_only_loss", True)
    trainer = SFTTrainer(model=model, args=SFTConfig(**kwargs), train_dataset=rows, processing_class=tokenizer,
                         peft_config=peft_config(recipe.model))  # fmt: skip
    return trainer, tokenizer


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    trainer, tokenizer = build_trainer(recipe, run)
    return run_training(recipe, trainer, tokenizer, run, resume)
