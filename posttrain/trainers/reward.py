"""`trainer: reward`: a classic Bradley-Terry reward model on (prompt, chosen, rejected), over TRL's RewardTrainer.

No reference answer: the baseline POLAR is compared against. The held-out metric is pairwise accuracy on
data.eval, scored exactly as RewardTrainer trains (prompt + response + EOS, right padding, the model's own head).
"""

from __future__ import annotations

from typing import Any

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

SPEC = TrainerSpec(
    name="reward",
    description="classic Bradley-Terry reward model on (prompt, chosen, rejected), no reference: POLAR's baseline "
    "(TRL RewardTrainer)",
    library_config="trl.trainer.reward_config:RewardConfig",
    train_schema="preference",
    eval_schema="preference",
    method_keys=frozenset({"center_rewards_coefficient", "max_length"}),
    curves=("loss",),
    model="sequence_classifier",
    sequences_per_row=2,
    paper="[Training language models to follow instructions with human feedback](https://arxiv.org/abs/2203.02155)",
)


def plan(recipe: Recipe) -> list[str]:
    s = recipe.settings
    pairs = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return standard_plan(recipe, [f"Bradley-Terry reward model on (prompt, chosen, rejected), no reference; {pairs} "
                                  "pairs per optimizer step per process (TRL RewardTrainer)"])  # fmt: skip


def pair_metrics(model: Any, tokenizer: Any, rows, batch_size: int = 64, max_length: int = 1024) -> dict[str, float]:
    """Pairwise accuracy and mean margin of a sequence-classifier RM on preference rows."""
    import torch

    from posttrain.evaluation.metrics import preference_metrics

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""

    def texts(column: str) -> list[str]:
        out = []
        for p, r in zip(rows["prompt"], rows[column]):
            t = p + r
            out.append(t if not eos or t.endswith(eos) else t + eos)  # as RewardTrainer appends EOS
        return out

    def score(batch: list[str]) -> list[float]:
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                        padding_side="right", add_special_tokens=False)  # fmt: skip
        with torch.no_grad():
            return model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().tolist()

    chosen_texts, rejected_texts = texts("chosen"), texts("rejected")
    chosen, rejected = [], []
    for start in range(0, len(chosen_texts), batch_size):
        chosen += score(chosen_texts[start : start + batch_size])
        rejected += score(rejected_texts[start : start + batch_size])
    model.train(was_training)
    found = preference_metrics(chosen, rejected)
    return {"accuracy": found["accuracy"], "margin": found["margin"]}


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    from trl import RewardConfig, RewardTrainer

    from posttrain.models.loading import peft_config, resolve_precision
    from posttrain.models.reward import load_reward_model

    precision = resolve_precision(recipe.settings.precision)
    model, tokenizer = load_reward_model(policy_source(recipe, run), recipe.model, precision, polar_tokens=False)
    rows = load_train_data(recipe, schema="preference", run=run).select_columns(["prompt", "chosen", "rejected"])
    eval_rows = load_eval_data(recipe, schema="preference")
    kwargs = config_kwargs(recipe, run)
    # posttrain passes strings; keep RewardTrainer from looking up chat templates the tiny tokenizers don't have.
    trainer = RewardTrainer(model=model, args=RewardConfig(**kwargs), train_dataset=rows, processing_class=tokenizer,
                            peft_config=peft_config(recipe.model))  # fmt: skip
    max_length = kwargs.get("max_length") or 1024

    def evaluator(m: Any) -> dict[str, float]:
        if eval_rows is None:
            return {}
        found = pair_metrics(m, tokenizer, eval_rows, max_length=max_length)
        return {f"eval/reward/{k}": v for k, v in found.items()}

    return run_training(recipe, trainer, tokenizer, run, resume, evaluator=evaluator)
