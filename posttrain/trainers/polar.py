"""`trainer: polar`: POLAR reward-model pretraining and fine-tuning (Dou et al. 2025) over transformers' Trainer.

Both stages minimise the same loss on (prompt, reference, chosen, rejected) rows:
    -log sigmoid(r(p, ref, chosen) - r(p, ref, rejected))
`stage: pretrain` rows come from `posttrain data polar-pretrain` (policy A wrote reference and chosen, B the
rejected); `stage: finetune` rows from human rankings A > B > C as (ref A, chosen B, rejected C). TRL's
RewardTrainer scores (prompt, response) pairs and has no place for a reference, so the collator and loss are
posttrain's; the loop, checkpointing, accelerate/DeepSpeed plumbing and logging are transformers' Trainer.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.errors import RewardError
from posttrain.recipe import Recipe
from posttrain.registry import TrainerSpec
from posttrain.runs import RunDir
from posttrain.trainers.base import (
    RunResult,
    config_kwargs,
    load_eval_data,
    load_train_data,
    policy_source,
    run_training,
    standard_plan,
)

STAGES = ("pretrain", "finetune")
HeadInit = Literal["zero", "normal"]


@dataclass(frozen=True)
class PolarOptions:
    """POLAR's own `algorithm:` keys."""

    stage: str = field(default="pretrain", metadata={"help": "pretrain (policy discrimination) or finetune (rankings)"})
    wrapper: str | None = field(
        default=None,
        metadata={"help": "pretrain (no newline between prompt and response) or sft; default: the stage's"},
    )
    max_length: int = field(default=4096, metadata={"help": "tokens per scored sequence"})
    max_response_length: int = field(default=1024, metadata={"help": "tokens kept of each response (its head)"})
    eval_batch_size: int = field(default=64, metadata={"help": "sequences per forward in held-out scoring"})
    head_init: HeadInit = field(
        default="zero",
        metadata={"help": "a new value head's weights: zero (the official trainer, xtuner's RewardModel) or normal "
                          "(transformers' initializer_range); a checkpoint's trained head is always kept"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.head_init not in typing.get_args(HeadInit):
            raise ValueError(f"algorithm.head_init must be zero or normal, got {self.head_init!r}")
        if self.stage not in STAGES:
            raise ValueError(f"algorithm.stage must be one of {', '.join(STAGES)}, got '{self.stage}'")
        try:
            self.layout()
        except RewardError as err:
            raise ValueError(f"algorithm: {err}") from err

    def layout(self):
        from reward_models.polar import DEFAULT_WRAPPER, PolarLayout

        wrapper = self.wrapper or ("pretrain" if self.stage == "pretrain" else DEFAULT_WRAPPER)
        return PolarLayout(wrapper, self.max_length, self.max_response_length)


SPEC = TrainerSpec(
    name="polar",
    description="POLAR reward model: policy-discriminative pretraining and fine-tuning on (prompt, reference, "
    "chosen, rejected) (Dou et al. 2025; over transformers Trainer)",
    options=PolarOptions,
    library_config="transformers.training_args:TrainingArguments",
    train_schema="polar_triplet",
    eval_schema="polar_triplet",
    curves=("loss",),
    lora=False,  # the value head and the new special-token embeddings train with all weights
    model="sequence_classifier",
    sequences_per_row=2,  # chosen and rejected, each prompt + reference + candidate (up to algorithm.max_length)
    paper="[Pre-Trained Policy Discriminators are General Reward Models](https://arxiv.org/abs/2507.05197)",
)


def plan(recipe: Recipe) -> list[str]:
    opts = recipe.options
    layout = opts.layout()
    s = recipe.settings
    pairs = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return standard_plan(
        recipe,
        [
            f"POLAR {opts.stage}: Bradley-Terry loss on (prompt, reference, chosen, rejected) rows; {pairs} "
            f"triplets ({2 * pairs} sequences) per optimizer step per process",
            f"layout: {layout.wrapper} wrapper, max_length {layout.max_length}, responses cut to "
            f"{layout.max_response_length} tokens (head kept), prompt keeps its tail",
            f"value head: a new one starts at {'zero (as the official trainer)' if opts.head_init == 'zero' else 'random normal'}; "
            "a checkpoint's trained head is kept",
        ],
    )


def triplet_metrics(model: Any, tokenizer: Any, rows, layout, batch_size: int = 64) -> dict[str, float]:
    """Held-out pairwise accuracy, BT loss, margin and mean scores of a POLAR RM on triplet rows."""
    from posttrain.evaluation.metrics import preference_metrics
    from reward_models.polar import PolarScorer

    was_training = model.training
    device = str(next(model.parameters()).device)
    scorer = PolarScorer(model, tokenizer, layout, batch_size=batch_size, device=device)
    chosen, rejected = scorer.score_triplets(rows)
    model.train(was_training)
    found = preference_metrics(chosen, rejected)
    return {k: found[k] for k in ("accuracy", "loss", "chosen_score", "rejected_score", "margin")}


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    from transformers import TrainingArguments

    from posttrain.models.loading import resolve_precision
    from posttrain.models.reward import load_reward_model
    from posttrain.trainers.polar_trainer import PolarTrainer, TripletCollator, encode_rows
    from reward_models.polar import PolarEncoder

    opts = recipe.options
    layout = opts.layout()
    precision = resolve_precision(recipe.settings.precision)
    model, tokenizer = load_reward_model(
        policy_source(recipe, run), recipe.model, precision, zero_new_head=opts.head_init == "zero"
    )
    encoder = PolarEncoder(tokenizer, layout)
    rows = load_train_data(recipe, schema="polar_triplet", run=run)
    train_set = encode_rows(rows, encoder, f"{recipe.where}: data.train")

    eval_rows = load_eval_data(recipe, schema="polar_triplet")

    kwargs = config_kwargs(recipe, run)
    kwargs["remove_unused_columns"] = False  # the collator reads chosen_ids/rejected_ids
    args = TrainingArguments(**kwargs)
    trainer = PolarTrainer(
        model=model, args=args, train_dataset=train_set, data_collator=TripletCollator(tokenizer.pad_token_id)
    )

    def evaluator(m: Any) -> dict[str, float]:
        if eval_rows is None:
            return {}
        found = triplet_metrics(m, tokenizer, eval_rows, layout, opts.eval_batch_size)
        return {f"eval/polar/{k}": v for k, v in found.items()}

    result = run_training(recipe, trainer, tokenizer, run, resume, evaluator=evaluator)
    if trainer.accelerator.is_main_process:
        import json

        from reward_models.polar import LAYOUT_FILE

        layout_json = {"wrapper": layout.wrapper, "max_length": layout.max_length,
                       "max_response_length": layout.max_response_length}  # fmt: skip
        (run.final / LAYOUT_FILE).write_text(json.dumps(layout_json, indent=1))
    return result
