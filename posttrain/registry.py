"""Trainer registry: the one place that lists every `trainer:` name and what its recipe may contain.

Each entry names the module implementing it (imported only when training starts, so `posttrain recipes` and
validation stay fast) and the TRL config class whose fields `algorithm:` and `training:` map onto.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from posttrain.errors import RecipeError
from posttrain.recipe import Recipe, check_keys, coerce_scalar, suggest

# GRPOConfig fields that the recipe's `rollout` section owns (set them there, not under training/algorithm).
ROLLOUT_OWNED = frozenset(
    {
        "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "use_vllm", "vllm_mode",
        "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_server_host", "vllm_server_port",
    }
)  # fmt: skip
# Fields owned by other recipe sections.
RECIPE_OWNED = frozenset(
    {"output_dir", "seed", "gradient_checkpointing", "activation_checkpointing", "reward_weights", "bf16", "fp16"}
)
# posttrain's own training options (not in any TRL config).
POSTTRAIN_TRAINING_KEYS = {
    "time_budget_s": float,  # stop training after this many seconds of wall time (checkpoint kept)
    "precision": str,  # auto | fp32 | bf16 | fp16; auto = bf16 on a bf16-capable GPU, fp32 on CPU
}


# GRPOConfig fields that define a GRPO-family method (NFT and RFT reuse TRL's sampling, so they accept them too).
_GRPO_ALGORITHM_KEYS = frozenset(
    {
        "beta", "loss_type", "epsilon", "epsilon_high", "delta", "scale_rewards", "num_iterations",
        "importance_sampling_level", "mask_truncated_completions", "top_entropy_quantile", "steps_per_generation",
        "sync_ref_model", "ref_model_sync_steps", "ref_model_mixup_alpha", "repetition_penalty", "min_p",
    }
)  # fmt: skip
# NFT's own options (posttrain.trainers.nft_loss.NFTOptions); kept here so validation does not import torch.
_NFT_ALGORITHM_KEYS: tuple[tuple[str, type], ...] = (
    ("weight", str),  # one_minus_rhat | sqrt | one
    ("neg_clip_eps", float),
    ("rhat_clamp", float),
    ("logratio_cap", float),
    ("correct_threshold", float),
    ("aggregation", str),  # sum_const | seq_mean | token_mean
    ("loss_const", float),
    ("negatives", bool),
    ("positives", bool),
    ("mask_uninformative", bool),
)

# POLAR's options (posttrain.trainers.polar.PolarOptions).
_POLAR_ALGORITHM_KEYS: tuple[tuple[str, type], ...] = (
    ("stage", str),  # pretrain | finetune
    ("wrapper", str),  # pretrain | sft (default: the stage's)
    ("max_length", int),
    ("max_response_length", int),
    ("eval_batch_size", int),
)


@dataclass(frozen=True)
class TrainerEntry:
    """How to build one trainer and check its recipe."""

    name: str
    description: str
    module: str  # module with `plan(recipe, run_dir) -> list[str]` and `train(recipe, run) -> dict`
    config_class: str  # "module:Class" of the TRL config that algorithm/training map onto
    algorithm_keys: frozenset[str]  # config fields that define the method (must go under `algorithm:`)
    extra_algorithm_keys: tuple[tuple[str, type], ...] = ()  # posttrain-only algorithm options
    needs_rewards: bool = False
    uses_rollout: bool = False

    def config_type(self) -> type:
        module, _, cls = self.config_class.partition(":")
        return getattr(importlib.import_module(module), cls)


TRAINERS: dict[str, TrainerEntry] = {
    entry.name: entry
    for entry in (
        TrainerEntry(
            name="sft",
            description="supervised fine-tuning on prompt/completion or chat data (TRL SFTTrainer)",
            module="posttrain.trainers.sft",
            config_class="trl.trainer.sft_config:SFTConfig",
            algorithm_keys=frozenset(
                {"completion_only_loss", "assistant_only_loss", "loss_type", "packing", "max_length"}
            ),
        ),
        TrainerEntry(
            name="grpo",
            description="group-relative policy optimisation with verifiable or model rewards (TRL GRPOTrainer)",
            module="posttrain.trainers.grpo",
            config_class="trl.trainer.grpo_config:GRPOConfig",
            algorithm_keys=_GRPO_ALGORITHM_KEYS,
            needs_rewards=True,
            uses_rollout=True,
        ),
        TrainerEntry(
            name="nft",
            description="negative-aware fine-tuning: learn from wrong answers via an implicit negative policy "
            "(Chen et al. 2025; over TRL GRPOTrainer)",
            module="posttrain.trainers.nft",
            config_class="trl.trainer.grpo_config:GRPOConfig",
            algorithm_keys=_GRPO_ALGORITHM_KEYS,
            extra_algorithm_keys=_NFT_ALGORITHM_KEYS,
            needs_rewards=True,
            uses_rollout=True,
        ),
        TrainerEntry(
            name="polar",
            description="POLAR reward model: policy-discriminative pretraining and fine-tuning on (prompt, "
            "reference, chosen, rejected) (Dou et al. 2025; over transformers Trainer)",
            module="posttrain.trainers.polar",
            config_class="transformers.training_args:TrainingArguments",
            algorithm_keys=frozenset(),
            extra_algorithm_keys=_POLAR_ALGORITHM_KEYS,
        ),
        TrainerEntry(
            name="reward",
            description="classic Bradley-Terry reward model on (prompt, chosen, rejected), no reference: POLAR's "
            "baseline (TRL RewardTrainer)",
            module="posttrain.trainers.reward",
            config_class="trl.trainer.reward_config:RewardConfig",
            algorithm_keys=frozenset({"center_rewards_coefficient", "max_length"}),
        ),
        TrainerEntry(
            name="rft",
            description="rejection-sampling fine-tuning: SFT on the verifier-accepted samples, online (NFT without "
            "negatives)",
            module="posttrain.trainers.nft",
            config_class="trl.trainer.grpo_config:GRPOConfig",
            algorithm_keys=_GRPO_ALGORITHM_KEYS,
            extra_algorithm_keys=_NFT_ALGORITHM_KEYS,
            needs_rewards=True,
            uses_rollout=True,
        ),
        TrainerEntry(
            name="seppo",
            description="semi-policy preference optimisation for text-to-image diffusion from winning images only, "
            "with reference-pool samples and the anchor-based flipper (Zhang et al. 2024; diffusers + accelerate)",
            module="posttrain.trainers.seppo",
            config_class="posttrain.trainers.seppo:SePPOConfig",
            algorithm_keys=frozenset(
                {
                    "variant",
                    "reference",
                    "beta",
                    "num_stages",
                    "updates_per_stage",
                    "sample_steps",
                    "guidance_scale",
                    "pool_dtype",
                    "pool_in_memory",
                }
            ),
        ),
    )
}


def trainer_names() -> list[str]:
    return list(TRAINERS)


def get_trainer(name: str, where: str = "<recipe>") -> TrainerEntry:
    if name not in TRAINERS:
        raise RecipeError(
            f"{where}: unknown trainer '{name}'{suggest(name, TRAINERS)} (available: {', '.join(TRAINERS)})"
        )
    return TRAINERS[name]


@cache
def config_field_types(config_class: str) -> dict[str, Any]:
    """Field name → type annotation of a TRL config dataclass (imports TRL's config module, not its trainers)."""
    module, _, cls = config_class.partition(":")
    config = getattr(importlib.import_module(module), cls)
    hints = typing.get_type_hints(config)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config) if f.init}


def validate_recipe(recipe: Recipe) -> None:
    """Trainer-level checks: the trainer exists, algorithm/training keys exist on its config, rewards resolve."""
    where = recipe.where
    entry = get_trainer(recipe.trainer, where)
    fields = config_field_types(entry.config_class)
    extra_algo = dict(entry.extra_algorithm_keys)

    check_keys(recipe.algorithm, [*entry.algorithm_keys, *extra_algo], "algorithm", recipe)
    for key, value in recipe.algorithm.items():
        tp = extra_algo.get(key) or fields.get(key, Any)
        recipe.algorithm[key] = _coerce(tp, value, f"algorithm.{key}", where)

    training_keys = [k for k in fields if k not in entry.algorithm_keys | ROLLOUT_OWNED | RECIPE_OWNED]
    for key in recipe.training:
        if key in entry.algorithm_keys:
            raise RecipeError(f"{where}: '{key}' is an algorithm option: put it under 'algorithm', not 'training'")
        if key in ROLLOUT_OWNED:
            raise RecipeError(f"{where}: '{key}' is set in the 'rollout' section (see docs/recipes.md), not 'training'")
        if key in RECIPE_OWNED:
            raise RecipeError(f"{where}: 'training.{key}' is set elsewhere in the recipe (see docs/recipes.md)")
    check_keys(recipe.training, [*training_keys, *POSTTRAIN_TRAINING_KEYS], "training", recipe)
    for key, value in recipe.training.items():
        tp = POSTTRAIN_TRAINING_KEYS.get(key) or fields.get(key, Any)
        recipe.training[key] = _coerce(tp, value, f"training.{key}", where)

    if recipe.training.get("precision", "auto") not in ("auto", "fp32", "bf16", "fp16"):
        raise RecipeError(f"{where}: 'training.precision' must be one of auto, fp32, bf16, fp16")
    if entry.needs_rewards and not recipe.rewards:
        raise RecipeError(f"{where}: trainer '{entry.name}' needs at least one entry under 'rewards'")
    if recipe.data.train is None:
        raise RecipeError(f"{where}: missing 'data.train' (a data source: path, or synthetic)")
    _validate_rewards(recipe)


def _validate_rewards(recipe: Recipe) -> None:
    from posttrain.errors import RewardError
    from posttrain.evaluation.suite import GRADER_NAMES, load_suite
    from reward_models import resolve_reward

    if recipe.eval.grader not in GRADER_NAMES:
        raise RecipeError(
            f"{recipe.where}: unknown eval.grader '{recipe.eval.grader}'{suggest(recipe.eval.grader, GRADER_NAMES)} "
            f"(graders: {', '.join(GRADER_NAMES)})"
        )
    if recipe.eval.suite is not None:
        load_suite(recipe.resolve_path(recipe.eval.suite))  # fails early on a bad suite
    for name in [spec.name for spec in recipe.rewards]:
        if ":" in name:
            continue  # user code is imported when training starts; importing it here could be slow or side-effecting
        try:
            resolve_reward(name)
        except RewardError as err:
            raise RecipeError(f"{recipe.where}: {err}") from err


def _coerce(tp: Any, value: Any, dotted: str, where: str) -> Any:
    """Type-check a TRL config value against its annotation, leniently for unions and containers."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin is typing.Literal:
        if value not in args:
            raise RecipeError(f"{where}: '{dotted}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is not None and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else Any
    if tp is str and isinstance(value, bool):
        return value  # TRL maps booleans onto some string options (e.g. scale_rewards: false -> "none")
    if tp in (bool, int, float, str):
        return coerce_scalar(tp, value, lambda msg: RecipeError(f"{where}: '{dotted}' {msg}"))
    return value
