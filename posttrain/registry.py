"""Trainer registry: the one place that lists every `trainer:` name, and the validation of the recipe sections
that depend on the trainer (`algorithm`, `training`).

Each line of `TRAINERS` names the module implementing a trainer. Modules are imported by name (importlib) when a
recipe needs them, so this floor sits below the trainers and `posttrain recipes` stays fast; trainer modules are
torch-free at import time. A trainer module declares `SPEC = TrainerSpec(...)`: its options dataclass (the keys
posttrain owns under `algorithm:`), the library config its `training:` and method keys map onto (e.g. TRL's
GRPOConfig), and the curves its report draws. The allowed keys and their types are derived from those two
dataclasses, never copied by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from posttrain.errors import RecipeError, RewardError, suggest
from posttrain.recipe import Context, Recipe, coerce, load_recipe

# trainer name -> module with SPEC, plan(recipe) and train(recipe, run, resume). Adding a trainer = one line here.
TRAINERS: dict[str, str] = {
    "sft": "posttrain.trainers.sft",
    "grpo": "posttrain.trainers.grpo",
    "nft": "posttrain.trainers.nft",
    "rft": "posttrain.trainers.rft",
    "polar": "posttrain.trainers.polar",
    "reward": "posttrain.trainers.reward",
    "seppo": "posttrain.trainers.seppo",
    "dpo": "posttrain.trainers.dpo",
}

# Library-config fields that the recipe's `rollout` section owns (set them there, not under training/algorithm).
ROLLOUT_OWNED = frozenset(
    {
        "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "use_vllm", "vllm_mode",
        "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_server_host", "vllm_server_port",
    }
)  # fmt: skip
# Library-config fields owned by other recipe sections (model, seed, output_dir, rewards, training.precision).
RECIPE_OWNED = frozenset(
    {"output_dir", "seed", "gradient_checkpointing", "activation_checkpointing", "reward_weights", "bf16", "fp16"}
)


@dataclass
class PosttrainTraining:
    """`training:` keys posttrain owns for every trainer (no library config has them)."""

    time_budget_s: float | None = field(
        default=None, metadata={"help": "stop training after this many seconds of wall time (checkpoint kept)"}
    )
    precision: typing.Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto = bf16 on a bf16-capable GPU, fp32 on CPU"}
    )


@dataclass(frozen=True)
class TrainerSpec:
    """What a trainer module declares about itself (module attribute `SPEC`)."""

    name: str
    description: str
    options: type | None = None  # torch-free dataclass: posttrain's own `algorithm:` keys of this trainer
    library_config: str | None = None  # "module:Class" whose fields `training:` (and method_keys) map onto
    method_keys: frozenset[str] = frozenset()  # library-config fields that define the method: under `algorithm:`
    needs_rewards: bool = False
    curves: tuple[str, ...] = ("loss",)  # logged metrics the run report plots, one panel each

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options)) if self.options else ()


def trainer_names() -> list[str]:
    return list(TRAINERS)


def trainer_module(name: str, where: str = "<recipe>") -> types.ModuleType:
    """The module implementing trainer `name` (imported on first use)."""
    if name not in TRAINERS:
        if not name:
            raise RecipeError(f"{where}: missing required key 'trainer' (one of: {', '.join(TRAINERS)})")
        raise RecipeError(
            f"{where}: unknown trainer '{name}'{suggest(name, TRAINERS)} (available: {', '.join(TRAINERS)})"
        )
    return importlib.import_module(TRAINERS[name])


def get_spec(name: str, where: str = "<recipe>") -> TrainerSpec:
    return trainer_module(name, where).SPEC


@cache
def library_field_types(config_class: str) -> dict[str, Any]:
    """Field name -> type of a library config dataclass (imports the config's module, not its trainer)."""
    module, _, cls = config_class.partition(":")
    config = getattr(importlib.import_module(module), cls)
    hints = typing.get_type_hints(config)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config) if f.init}


def allowed_keys(spec: TrainerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(algorithm key -> type, training key -> type) a recipe of this trainer may set."""
    library = library_field_types(spec.library_config) if spec.library_config else {}
    options = typing.get_type_hints(spec.options) if spec.options else {}
    algorithm = {**{k: library.get(k, Any) for k in spec.method_keys}, **{k: options[k] for k in spec.option_names()}}
    owned = spec.method_keys | ROLLOUT_OWNED | RECIPE_OWNED | set(algorithm)
    training = {k: tp for k, tp in library.items() if k not in owned}
    training.update(typing.get_type_hints(PosttrainTraining))
    return algorithm, training


# ------------------------------------------------------------------------------------------------ validation


def load_and_validate(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (`extends:`, `--set`) and validate all of it, trainer sections included, before any model
    or dataset is loaded. What `posttrain train` and every caller that runs a recipe use."""
    recipe = load_recipe(path, overrides)
    validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: Recipe) -> None:
    """Trainer-level checks: the trainer exists, algorithm/training keys exist with the right types, the trainer's
    options accept their values, rewards and the eval grader/suite resolve."""
    spec = get_spec(recipe.trainer, recipe.where)
    algorithm_types, training_types = allowed_keys(spec)
    ctx = Context(recipe.where, recipe.overridden)
    misplaced = set(spec.method_keys) | set(spec.option_names())
    for key in recipe.training:
        if key in misplaced:
            raise RecipeError(
                f"{recipe.where}: '{key}' is an algorithm option: put it under 'algorithm', not 'training'"
            )
        if key in ROLLOUT_OWNED:
            raise RecipeError(f"{recipe.where}: '{key}' is set in the 'rollout' section (see docs/recipes.md), not 'training'")  # fmt: skip
        if key in RECIPE_OWNED:
            raise RecipeError(f"{recipe.where}: 'training.{key}' is set elsewhere in the recipe (see docs/recipes.md)")
    own_training = tuple(f.name for f in dataclasses.fields(PosttrainTraining))
    recipe.algorithm = _coerce_section(recipe.algorithm, algorithm_types, "algorithm", ctx, spec.option_names())
    recipe.training = _coerce_section(recipe.training, training_types, "training", ctx, own_training)
    trainer_options(recipe)  # the options dataclass checks its own values
    if spec.needs_rewards and not recipe.rewards:
        raise RecipeError(f"{recipe.where}: trainer '{spec.name}' needs at least one entry under 'rewards'")
    if recipe.data.train is None:
        raise RecipeError(f"{recipe.where}: missing 'data.train' (a data source: path, or synthetic)")
    _validate_eval_and_rewards(recipe)


def _coerce_section(
    values: dict[str, Any], types_: dict[str, Any], section: str, ctx: Context, own: tuple[str, ...]
) -> dict[str, Any]:
    """Unknown keys named with the nearest valid one; posttrain's own options typed strictly, library fields
    leniently (the library's __post_init__ has the last word on those)."""
    out = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in types_:
            raise ctx.error(dotted, f"unknown key '{key}' in {section}{suggest(key, types_)}")
        lenient = key not in own
        out[key] = None if value is None and lenient else coerce(types_[key], value, dotted, ctx, lenient)
    return out


def trainer_options(recipe: Recipe) -> Any:
    """The trainer's options dataclass built from the recipe's `algorithm:` (None for a trainer without one).

    Its own checks (`__post_init__` raising ValueError naming the key, e.g. "algorithm.stage must be ...") become
    a RecipeError naming the file."""
    spec = get_spec(recipe.trainer, recipe.where)
    if spec.options is None:
        return None
    names = spec.option_names()
    try:
        return spec.options(**{k: v for k, v in recipe.algorithm.items() if k in names})
    except ValueError as err:
        raise RecipeError(f"{recipe.where}: {err}") from err


def library_kwargs(recipe: Recipe) -> dict[str, Any]:
    """`training:` and `algorithm:` values for the library config: the keys posttrain owns (the trainer's options
    and `PosttrainTraining`) are stripped here, in one place for every trainer."""
    spec = get_spec(recipe.trainer, recipe.where)
    own = set(spec.option_names()) | {f.name for f in dataclasses.fields(PosttrainTraining)}
    return {k: v for k, v in {**recipe.training, **recipe.algorithm}.items() if k not in own}


def _validate_eval_and_rewards(recipe: Recipe) -> None:
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
