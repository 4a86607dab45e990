"""`trainer: kto`: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) over TRL's KTOTrainer.

KTO learns from single completions labelled desirable or undesirable, no pairs needed. With the implied reward
r(x, y) = log pi(y|x) - log pi_ref(y|x) against a frozen reference pi_ref (the starting model) and a reference point
z0 = max(0, KL(pi || pi_ref)), estimated per batch from mismatched (prompt, another row's completion) pairs and
not differentiated through, each row's loss is (Eq. 7-8 of the paper; `algorithm.loss_type` picks TRL's variants)

    desirable:    lambda_D * (1 - sigmoid(beta * (r(x, y) - z0)))
    undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r(x, y))))

with lambda_D / lambda_U `algorithm.desirable_weight` / `undesirable_weight` (the paper keeps
lambda_D n_D / (lambda_U n_U) in [1, 4/3]). TRL owns the loss, the reference model and the KL estimate; posttrain
adds the recipe, the data, held-out generation before/after and the report.

Data: unpaired rows (prompt, completion, label: true = desirable), or preference pairs (prompt/chosen/rejected, or
chosen/rejected transcripts, which the data layer splits), each pair unpaired into one desirable and one undesirable
row by TRL's `unpair_preference_dataset`; pairs with chosen == rejected are dropped first (they would label one
completion both ways). Labels are checked (booleans, both kinds present) before any model loads. TRL trains the rows
in the order given (its KL estimate pairs each row with its batch neighbour's completion), so they are shuffled with
the recipe's seed first: every batch then mixes desirable with undesirable rows and the mismatched pairs are random.
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
    name="kto",
    description="Kahneman-Tversky optimisation on completions labelled desirable/undesirable (or unpaired preference "
    "pairs) against a frozen reference (Ethayarajh et al. 2024; TRL KTOTrainer)",
    library_config="trl.trainer.kto_config:KTOConfig",
    train_schema="unpaired",
    eval_schema="prompt_answer",
    method_keys=frozenset(
        {
            "beta",
            "loss_type",
            "desirable_weight",
            "undesirable_weight",
            "sync_ref_model",
            "ref_model_mixup_alpha",
            "ref_model_sync_steps",
            "max_length",
        }
    ),  # fmt: skip
    curves=("loss", "rewards/margins", "kl"),
    sequences_per_row=1,  # one completion per row trains; the KL pass over a neighbour's completion runs without grad
    reference_model=True,  # TRL loads one unless LoRA (the adapter is switched off) or precompute_ref_log_probs
    paper="[KTO: Model Alignment as Prospect Theoretic Optimization](https://arxiv.org/abs/2402.01306)",
)

COLUMNS = ("prompt", "completion", "label")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def problems(recipe: Recipe) -> list[str]:
    """TRL's KL estimate rotates completions within a micro-batch of the rows in their given order: it needs two or
    more rows per device and the sequential sampler (KTOConfig's default)."""
    s = recipe.settings
    if s.loss_type == "apo_zero_unpaired":  # no KL term
        return []
    found = []
    if s.per_device_train_batch_size < 2:
        found.append(
            f"training.per_device_train_batch_size must be >= 2 for loss_type '{s.loss_type}' (its KL reference "
            f"point pairs each row with another row's completion), got {s.per_device_train_batch_size}"
        )
    if s.get("train_sampling_strategy") != "sequential":
        found.append(
            f"training.train_sampling_strategy must be 'sequential' for loss_type '{s.loss_type}' (the KL pairs are "
            f"built in data order; posttrain shuffles the rows itself), got {s.get('train_sampling_strategy')!r}"
        )
    return found


def plan(recipe: Recipe) -> list[str]:
    s = recipe.settings
    rows = s.per_device_train_batch_size * s.gradient_accumulation_steps
    return standard_plan(
        recipe,
        [
            f"KTO ({s.loss_type} loss, beta {s.beta:g}, desirable weight {s.desirable_weight:g}, undesirable weight "
            f"{s.undesirable_weight:g}) on data.train's (prompt, completion, label) rows (a pair: one desirable and "
            f"one undesirable row), shuffled with seed {recipe.seed}, against a frozen copy of the starting model; "
            f"{rows} rows per optimizer step per process",
        ],
    )


def train(recipe: Recipe, run: RunDir, resume: bool = False) -> RunResult:
    from trl import KTOConfig, KTOTrainer

    from posttrain.models.loading import peft_config

    model, tokenizer, rows = load_policy_tokenizer_data(recipe, run, schema="unpaired")
    rows = unpaired_rows(rows, f"{recipe.where}: data.train").shuffle(seed=recipe.seed).flatten_indices()
    trainer = KTOTrainer(
        model=model,
        args=KTOConfig(**config_kwargs(recipe, run)),
        train_dataset=rows,
        processing_class=tokenizer,
        peft_config=peft_config(recipe.model),
    )
    return run_training(recipe, trainer, tokenizer, run, resume)


def unpaired_rows(rows, origin: str):
    """(prompt, completion, label) rows: unpaired rows as they are, pairs unpaired (chosen -> label true, rejected ->
    label false, the prompt shared) after dropping those whose two sides are identical."""
    from trl.data_utils import unpair_preference_dataset

    from posttrain.data.schemas import distinct_pairs

    if "label" in rows.column_names:
        return rows.select_columns(list(COLUMNS))
    kept = distinct_pairs(rows.select_columns(list(PAIR_COLUMNS)), origin, "KTO")
    return unpair_preference_dataset(kept).select_columns(list(COLUMNS))
