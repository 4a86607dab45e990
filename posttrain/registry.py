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

from posttrain.errors import PosttrainError, RecipeError, unknown_key
from posttrain.recipe import Context, Recipe, Settings, bounds_problem, coerce, load_recipe, problems_error

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
    "rloo": "posttrain.trainers.rloo",
    "kto": "posttrain.trainers.kto",
    "distill": "posttrain.trainers.distill",
}

# Library-config fields that the recipe's `rollout` section owns (set them there, not under training/algorithm).
ROLLOUT_OWNED = frozenset(
    {
        "num_generations", "max_completion_length", "temperature", "top_p", "top_k", "use_vllm", "vllm_mode",
        "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_server_host", "vllm_server_port",
        "max_tool_calling_iterations",
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
        default=None,
        metadata={"help": "stop training after this many seconds of wall time (checkpoint kept)", "gt": 0},
    )
    precision: typing.Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "auto = bf16 on a bf16-capable GPU, fp32 on CPU"}
    )


ModelKind = typing.Literal["causal_lm", "sequence_classifier", "diffusion"]


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
    # Row schemas (posttrain.data.schemas) checked before any model loads: data.train, and the held-out set
    # (eval.data or data.eval). None: the trainer reads that data its own way (e.g. images) and checks it itself.
    train_schema: str | None = None
    eval_schema: str | None = None
    # What the trainer's training loop can run under: DeepSpeed ZeRO (accelerate's DeepSpeed plugin) and peft LoRA.
    deepspeed: bool = True
    lora: bool = True
    # What the shared layers ask about the method (the memory plan, --rehearse, the dry-run plan, validation):
    model: ModelKind = "causal_lm"  # what it trains: a causal LM, a scalar-head reward model, a diffusion stack
    generates: bool = False  # samples completions from the policy while it trains (rollouts, rewards)
    # Runs multi-turn rollouts with tools and environments (rollout.tools / rollout.environment: TRL's tool loop).
    tools: bool = False
    sequences_per_row: int = 1  # sequences one training row becomes (chosen + rejected: 2; POLAR's triplet: 3)
    reference_model: bool = False  # holds a frozen copy of the policy when the library's `beta` is > 0
    # The options field naming a frozen teacher model (a dir or hub id) the trainer holds beside the policy: the
    # memory plan counts its weights (read from the teacher's own config.json).
    teacher_option: str | None = None
    length_key: str | None = "max_length"  # the setting bounding a row's tokens (a generating trainer: the rollout's)
    paper: str = ""  # the method's paper as a markdown link ("[title](arXiv URL)"): the run's model card cites it

    def option_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.options)) if self.options else ()


def trainer_names() -> list[str]:
    return list(TRAINERS)


def trainer_module(name: str, where: str = "<recipe>") -> types.ModuleType:
    """The module implementing trainer `name` (imported on first use)."""
    if name not in TRAINERS:
        if not name:
            raise RecipeError(f"{where}: missing required key 'trainer' (one of: {', '.join(TRAINERS)})")
        raise RecipeError(f"{where}: {unknown_key(name, TRAINERS, noun='trainer')}")
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
    """Read a recipe file (`extends:`, `--set`) and validate all of it, trainer sections, data, rewards and run dir
    included, before any model is loaded. Every problem found is reported in one error (`RecipeProblems` when
    there are several). What `posttrain train`, `--dry-run` and every caller that runs a recipe use."""
    problems: list = []
    recipe = load_recipe(path, overrides, problems=problems)
    validate_recipe(recipe, problems)
    return recipe


def validate_recipe(recipe: Recipe, problems: list | None = None) -> None:
    """Trainer-level checks: the trainer exists; algorithm/training keys exist with the right types and ranges and
    the library's choices; the trainer's options accept their values; the trainer's own cross-checks (its
    module's `problems(recipe)`); data sources open with the trainer's schema; rewards import with valid kwargs;
    the eval grader/suite resolve; the rollout backend can run here; the report_to trackers are installed; the run
    dir is not a file.

    Problems go into `problems` when given, and are raised together at the end (also when some came earlier)."""
    from posttrain import preflight

    found: list = [] if problems is None else problems
    spec = None
    try:
        spec = get_spec(recipe.trainer, recipe.where)
    except RecipeError as err:
        found.append(err)
    if spec is not None:
        _validate_trainer_sections(recipe, spec, found)
        preflight.check_model(recipe, spec, found)
        preflight.check_data(recipe, spec.train_schema, spec.eval_schema, found)
    if recipe.data.train is None:
        found.append(RecipeError(f"{recipe.where}: missing 'data.train' (a data source: path, or synthetic)"))
    _validate_eval(recipe, found)
    _check_prompt_length(recipe, spec, found)
    preflight.check_rewards(recipe, found)
    preflight.check_rollout_backend(recipe, found)
    _check_tools(recipe, spec, found)
    preflight.check_trackers(recipe, found)
    preflight.check_run_dir(recipe, found)
    preflight.check_launch(recipe, found, spec)
    if not found:
        return
    err = problems_error(recipe.where, found)
    if all(isinstance(p, preflight.MachineError) for p in found):
        err = preflight.MachineError(str(err))
        err.recipe = recipe  # `--dry-run` still prints the plan of a recipe this machine can't run
    raise err


def _check_prompt_length(recipe: Recipe, spec: TrainerSpec | None, found: list) -> None:
    """data.max_prompt_length / overlong_prompts: read where a causal LM's prompts meet its tokenizer
    (trainers.base.load_policy_tokenizer_data), so other trainers would ignore them."""
    data = recipe.data
    if data.max_prompt_length is None:
        if data.overlong_prompts != "error":
            found.append(RecipeError(f"{recipe.where}: data.overlong_prompts: {data.overlong_prompts} needs "
                                     "data.max_prompt_length (the token limit it applies)"))  # fmt: skip
        return
    if spec is not None and spec.model != "causal_lm":
        found.append(RecipeError(f"{recipe.where}: data.max_prompt_length applies to the prompts of a causal LM's "
                                 f"trainers; trainer {spec.name} trains a {spec.model}"))  # fmt: skip


def _check_tools(recipe: Recipe, spec: TrainerSpec | None, found: list) -> None:
    """Multi-turn rollouts and tool-loop evaluation (posttrain.rollout.tools): the trainer runs them, the code is
    well-formed, and the chat template can render and parse a tool-calling conversation."""
    from posttrain import preflight
    from posttrain.rollout import tools

    if spec is None or not tools.wanted(recipe):
        return
    able = [name for name in TRAINERS if get_spec(name).tools] if not spec.tools else []
    problems = tools.recipe_problems(recipe, spec, able)
    found.extend(problems)
    try:
        tokenizer = None if problems and tools.REFUSED in str(problems[0]) else preflight.dry_run_tokenizer(recipe)
    except PosttrainError as err:
        tokenizer = found.append(err)
    wrong = tokenizer is not None and tools.template_problem(tokenizer)
    if wrong:
        found.append(RecipeError(f"{recipe.where}: {'rollout' if tools.uses_tools(recipe) else 'eval'}.tools: {wrong}"))


def _validate_trainer_sections(recipe: Recipe, spec: TrainerSpec, found: list) -> None:
    from posttrain import preflight

    algorithm_types, training_types = allowed_keys(spec)
    ctx = Context(recipe.where, recipe.overridden, problems=found)
    misplaced = set(spec.method_keys) | set(spec.option_names())
    for key in list(recipe.training):
        if key in misplaced:
            found.append(RecipeError(f"{recipe.where}: '{key}' is an algorithm option: put it under 'algorithm', not 'training'"))  # fmt: skip
        elif key in ROLLOUT_OWNED:
            found.append(RecipeError(f"{recipe.where}: '{key}' is set in the 'rollout' section (see docs/recipes.md), not 'training'"))  # fmt: skip
        elif key in RECIPE_OWNED:
            found.append(RecipeError(f"{recipe.where}: 'training.{key}' is set elsewhere in the recipe (see docs/recipes.md)"))  # fmt: skip
        else:
            continue
        recipe.training.pop(key)
    own_training = {f.name: f for f in dataclasses.fields(PosttrainTraining)}
    own_options = {f.name: f for f in dataclasses.fields(spec.options)} if spec.options else {}
    recipe.algorithm = _coerce_section(recipe.algorithm, algorithm_types, "algorithm", ctx, own_options)
    recipe.training = _coerce_section(recipe.training, training_types, "training", ctx, own_training)
    try:
        recipe.options = trainer_options(recipe)  # the options dataclass checks its own values
    except RecipeError as err:
        found.append(err)
    recipe.settings = resolved_settings(recipe, spec)
    preflight.check_library_values(recipe, spec.library_config, found)
    if spec.needs_rewards and not recipe.rewards and not recipe.raw.get("rewards"):
        found.append(RecipeError(f"{recipe.where}: trainer '{spec.name}' needs at least one entry under 'rewards'"))
    own_checks = getattr(trainer_module(spec.name), "problems", None)
    if own_checks is not None:
        # A message is a problem of the recipe; an error (e.g. preflight's MachineError: an input an earlier step
        # writes) is kept as its own kind, so `--dry-run` and `--rehearse` treat it as they treat a missing model.path.
        for problem in own_checks(recipe):
            found.append(problem if isinstance(problem, PosttrainError) else RecipeError(f"{recipe.where}: {problem}"))


def _coerce_section(
    values: dict[str, Any], types_: dict[str, Any], section: str, ctx: Context, own: dict[str, dataclasses.Field]
) -> dict[str, Any]:
    """Unknown keys named with the nearest valid one; posttrain's own options typed strictly and range-checked
    (bounds in their field metadata), library fields leniently (the library's __post_init__ and
    `preflight.check_library_values` judge those). A bad key is reported and left out, so checks go on."""
    out = {}
    for key, value in values.items():
        dotted = f"{section}.{key}"
        if key not in types_:
            ctx.report(ctx.error(dotted, unknown_key(key, types_, section)))
            continue
        lenient = key not in own
        try:
            out[key] = None if value is None and lenient else coerce(types_[key], value, dotted, ctx, lenient)
            wrong = None if lenient else bounds_problem(out[key], own[key].metadata)
            if wrong:
                raise ctx.error(dotted, f"'{dotted}' {wrong}")
        except RecipeError as err:
            out.pop(key, None)
            ctx.report(err)
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


@cache
def library_defaults(config_class: str) -> dict[str, Any]:
    """Field -> default of a library config dataclass, as the library declares it (a default_factory is called)."""
    module, _, cls = config_class.partition(":")
    config = getattr(importlib.import_module(module), cls)
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def resolved_settings(recipe: Recipe, spec: TrainerSpec) -> Settings:
    """Every `training:`/`algorithm:` setting the trainer takes: the library config's defaults (read from its
    dataclass, never copied), posttrain's own training keys' and options' defaults, under the recipe's values."""
    algorithm_types, training_types = allowed_keys(spec)
    library = library_defaults(spec.library_config) if spec.library_config else {}
    defaults = {k: library.get(k) for k in (*training_types, *algorithm_types) if k in library}
    defaults.update({f.name: f.default for f in dataclasses.fields(PosttrainTraining)})
    if recipe.options is not None:
        defaults.update({k: getattr(recipe.options, k) for k in spec.option_names()})
    return Settings({**defaults, **recipe.training, **recipe.algorithm})


def library_kwargs(recipe: Recipe) -> dict[str, Any]:
    """`training:` and `algorithm:` values for the library config: the keys posttrain owns (the trainer's options
    and `PosttrainTraining`) are stripped here, in one place for every trainer."""
    spec = get_spec(recipe.trainer, recipe.where)
    own = set(spec.option_names()) | {f.name for f in dataclasses.fields(PosttrainTraining)}
    return {k: v for k, v in {**recipe.training, **recipe.algorithm}.items() if k not in own}


def _validate_eval(recipe: Recipe, found: list) -> None:
    from posttrain.evaluation.suite import GRADER_NAMES, load_suite

    if recipe.eval.grader not in GRADER_NAMES:
        found.append(
            RecipeError(f"{recipe.where}: eval.grader: {unknown_key(recipe.eval.grader, GRADER_NAMES, noun='grader')}")
        )
    if recipe.eval.suite is not None:
        try:
            load_suite(recipe.resolve_path(recipe.eval.suite))  # fails early on a bad suite
        except PosttrainError as err:
            found.append(RecipeError(f"{recipe.where}: eval.suite: {err}"))
