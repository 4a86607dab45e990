"""`trainer: polar`: POLAR reward-model pretraining and fine-tuning (Dou et al. 2025) over transformers' Trainer.

Both stages minimise the same loss on (prompt, reference, chosen, rejected) rows:
    -log sigmoid(r(p, ref, chosen) - r(p, ref, rejected))
`stage: pretrain` rows come from `posttrain data polar-pretrain` (policy A wrote reference and chosen, B the
rejected); `stage: finetune` rows from human rankings A > B > C as (ref A, chosen B, rejected C). TRL's
RewardTrainer scores (prompt, response) pairs and has no place for a reference, so the collator and loss are
posttrain's; the loop, checkpointing, accelerate/DeepSpeed plumbing and logging are transformers' Trainer.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from posttrain.errors import RecipeError
from posttrain.recipe import Recipe
from posttrain.runs import RunDir
from posttrain.trainers.base import (
    RunResult,
    config_kwargs,
    load_eval_data,
    load_train_data,
    quiet_library_progress,
    run_training,
)

STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class PolarOptions:
    """Recipe `algorithm:` keys of `trainer: polar`."""

    stage: str = "pretrain"
    wrapper: str | None = None  # None = the stage's: "pretrain" (no "\n" between prompt and response) or "sft"
    max_length: int = 4096
    max_response_length: int = 1024
    eval_batch_size: int = 64

    def layout(self):
        from reward_models.polar import PolarLayout

        wrapper = self.wrapper or ("pretrain" if self.stage == "pretrain" else "sft")
        return PolarLayout(wrapper, self.max_length, self.max_response_length)


def options_from(recipe: Recipe) -> PolarOptions:
    opts = PolarOptions(**recipe.algorithm)
    if opts.stage not in STAGES:
        raise RecipeError(f"{recipe.where}: algorithm.stage must be one of {', '.join(STAGES)}, got '{opts.stage}'")
    try:
        opts.layout()
    except Exception as err:  # RewardError from the layout check, with the recipe named
        raise RecipeError(f"{recipe.where}: algorithm: {err}") from err
    return opts


def plan(recipe: Recipe) -> list[str]:
    opts = options_from(recipe)
    layout = opts.layout()
    t = recipe.training
    pairs = t.get("per_device_train_batch_size", 8) * t.get("gradient_accumulation_steps", 1)
    return [
        f"POLAR {opts.stage}: Bradley-Terry loss on (prompt, reference, chosen, rejected) rows; {pairs} triplets "
        f"({2 * pairs} sequences) per optimizer step per process",
        f"layout: {layout.wrapper} wrapper, max_length {layout.max_length}, responses cut to "
        f"{layout.max_response_length} tokens (head kept), prompt keeps its tail",
    ]


def load_reward_model(recipe: Recipe, run: RunDir, polar_tokens: bool = True):
    """A sequence classifier (one bias-free scalar head) over the recipe's model, with POLAR's tokens added."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.errors import ModelError
    from posttrain.models import load_kwargs, load_tokenizer, materialise_tiny, model_source, resolve_precision
    from reward_models.polar import add_polar_tokens

    quiet_library_progress()
    source = str(materialise_tiny(recipe, run.path)) if recipe.model.tiny else model_source(recipe)
    tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    precision = resolve_precision(recipe.training.get("precision", "auto"))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=1, **load_kwargs(recipe.model, precision)
        )
    except (OSError, ValueError) as err:
        raise ModelError(f"could not load '{source}' as a reward model (sequence classifier): {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if polar_tokens:
        add_polar_tokens(model, tokenizer)
    return model, tokenizer


def encode_rows(rows, encoder, origin: str):
    """Pre-tokenise each triplet into chosen/rejected id lists (datasets.map: cached, parallel on big sets)."""

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return {
            "chosen_ids": encoder.encode(row["prompt"], row["reference"], row["chosen"]),
            "rejected_ids": encoder.encode(row["prompt"], row["reference"], row["rejected"]),
        }

    return rows.map(encode, remove_columns=rows.column_names, desc=f"tokenising {origin}")


class TripletCollator:
    """Right-pads [chosen..., rejected...] of a batch into one (2B, T) tensor, so one forward scores both."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from reward_models.polar import pad_batch

        seqs = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        input_ids, attention_mask = pad_batch(seqs, self.pad_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def _make_trainer_class():
    import torch
    from transformers import Trainer

    from reward_models.polar import bt_loss, sequence_scores

    class PolarTrainer(Trainer):
        """transformers' Trainer with the POLAR pairwise loss and its accuracy/score/margin metrics."""

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            # compute_loss returns a per-micro-batch mean, so let Trainer divide by the accumulation steps.
            self.model_accepts_loss_kwargs = False
            self._polar_metrics: dict[str, list[float]] = defaultdict(list)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
            chosen, rejected = scores.chunk(2)
            loss = bt_loss(chosen, rejected)
            with torch.no_grad():
                stats = torch.stack(
                    [(chosen > rejected).float().mean(), chosen.mean(), rejected.mean(), (chosen - rejected).mean()]
                )
                stats = self.accelerator.gather_for_metrics(stats.unsqueeze(0)).mean(0).tolist()
            for name, value in zip(("accuracy", "chosen_score", "rejected_score", "margin"), stats):
                self._polar_metrics[name].append(value)
            return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._polar_metrics:
                logs.update({k: sum(v) / len(v) for k, v in self._polar_metrics.items()})
                self._polar_metrics.clear()
            super().log(logs, start_time)

    return PolarTrainer


def triplet_metrics(model: Any, tokenizer: Any, rows, layout, batch_size: int = 64) -> dict[str, float]:
    """Held-out pairwise accuracy, BT loss and mean scores of a POLAR RM on triplet rows."""
    import math

    from reward_models.polar import PolarScorer

    was_training = model.training
    device = str(next(model.parameters()).device)
    scorer = PolarScorer(model, tokenizer, layout, batch_size=batch_size, device=device)
    n = len(rows)
    chosen, rejected = scorer.score_triplets(rows)
    model.train(was_training)
    margins = [c - r for c, r in zip(chosen, rejected)]
    # -log sigmoid(m) = log(1 + e^-m), computed without overflow for large |m|.
    losses = [max(-m, 0.0) + math.log1p(math.exp(-abs(m))) for m in margins]
    return {
        "accuracy": sum(m > 0 for m in margins) / n,
        "loss": sum(losses) / n,
        "chosen_score": sum(chosen) / n,
        "rejected_score": sum(rejected) / n,
        "margin": sum(margins) / n,
    }


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    from transformers import TrainingArguments

    from reward_models.polar import PolarEncoder

    opts = options_from(recipe)
    layout = opts.layout()
    model, tokenizer = load_reward_model(recipe, run)
    encoder = PolarEncoder(tokenizer, layout)
    rows = load_train_data(recipe, schema="polar_triplet")
    train_set = encode_rows(rows, encoder, f"{recipe.where}: data.train")

    eval_rows = load_eval_data(recipe, schema="polar_triplet")

    kwargs = config_kwargs(recipe, run)
    for key in ("stage", "wrapper", "max_length", "max_response_length", "eval_batch_size"):
        kwargs.pop(key, None)  # posttrain's options, not TrainingArguments fields
    kwargs["remove_unused_columns"] = False  # the collator reads chosen_ids/rejected_ids
    args = TrainingArguments(**kwargs)
    trainer = _make_trainer_class()(
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
