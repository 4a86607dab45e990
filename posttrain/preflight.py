"""Pre-flight checks of a recipe that need more than its types: library option ranges and choices, the data it
will train and evaluate on, its rewards, its rollout backend and its run dir. All before any model loads.

`posttrain.registry.validate_recipe` calls these with a list that collects every problem (so that one message
lists them all); each check appends `PosttrainError`s naming the file and key, and never raises for a problem of
the recipe. Ranges and choices of library options come from the installed library where it states them (a
field's `choices` metadata, an Enum type, or a "Supported values are ..." help text); the numeric ranges it
leaves to runtime checks are written here (`LIBRARY_BOUNDS`), since TRL and transformers keep none as metadata.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import importlib.util
import re
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from posttrain.errors import DataError, PosttrainError, RecipeError, RewardError, suggest
from posttrain.recipe import Context, Recipe, bounds_problem

VALIDATION_ROWS = 256  # rows of a synthetic Markov source that validation checks

# Ranges of library (transformers TrainingArguments / TRL config) options that the library checks only at runtime,
# if at all: a negative learning rate trains "fine" in reverse, batch size 0 fails deep inside the dataloader.
LIBRARY_BOUNDS: dict[str, dict[str, float]] = {
    "learning_rate": {"gt": 0},
    "weight_decay": {"ge": 0},
    "adam_beta1": {"ge": 0, "lt": 1},
    "adam_beta2": {"ge": 0, "lt": 1},
    "adam_epsilon": {"gt": 0},
    "max_grad_norm": {"ge": 0},
    "num_train_epochs": {"gt": 0},
    "warmup_ratio": {"ge": 0, "le": 1},
    "warmup_steps": {"ge": 0},
    "per_device_train_batch_size": {"ge": 1},
    "per_device_eval_batch_size": {"ge": 1},
    "gradient_accumulation_steps": {"ge": 1},
    "logging_steps": {"gt": 0},
    "save_steps": {"gt": 0},
    "eval_steps": {"gt": 0},
    "save_total_limit": {"ge": 1},
    "dataloader_num_workers": {"ge": 0},
    "beta": {"ge": 0},
    "epsilon": {"ge": 0},
    "epsilon_high": {"ge": 0},
    "delta": {"gt": 0},
    "num_iterations": {"ge": 1},
    "steps_per_generation": {"ge": 1},
    "generation_batch_size": {"ge": 1},
    "max_length": {"ge": 1},
    "max_prompt_length": {"ge": 1},
    "repetition_penalty": {"gt": 0},
    "min_p": {"ge": 0, "le": 1},
    "top_entropy_quantile": {"ge": 0, "le": 1},
    "ref_model_mixup_alpha": {"ge": 0, "le": 1},
    "ref_model_sync_steps": {"ge": 1},
    "time_budget_s": {"gt": 0},
}
_CHOICES_TEXT = re.compile(r"(?:Supported|Possible|Allowed|Valid) values are:?\s*(.+?)(?:\.\s|\.$|$)", re.S)
_QUOTED = re.compile(r"`?'([\w\-]+)'`?")


def check_library_values(recipe: Recipe, config_class: str | None, problems: list) -> None:
    """Ranges (`LIBRARY_BOUNDS`; `max_steps` is -1 or >= 1) and choice lists of the library options a recipe sets
    under `training:` / `algorithm:`."""
    choices = library_choices(config_class) if config_class else {}
    ctx = Context(recipe.where, recipe.overridden)
    for section in ("training", "algorithm"):
        for key, value in getattr(recipe, section).items():
            dotted = f"{section}.{key}"
            wrong = bounds_problem(value, LIBRARY_BOUNDS.get(key, {}))
            if key == "max_steps" and isinstance(value, int) and (value == 0 or value < -1):
                wrong = f"must be -1 (train num_train_epochs) or >= 1, got {value}"
            if wrong:
                problems.append(ctx.error(dotted, f"'{dotted}' {wrong}"))
            allowed = choices.get(key)
            for item in value if isinstance(value, list) else [value]:
                if allowed and isinstance(item, str) and item not in allowed:
                    problems.append(
                        ctx.error(
                            dotted,
                            f"'{dotted}' got {item!r}{suggest(item, allowed)}; the installed library accepts: "
                            f"{', '.join(allowed)}",
                        )
                    )


@cache
def library_choices(config_class: str) -> dict[str, tuple[str, ...]]:
    """Field -> allowed strings, as the installed library states them: `choices` metadata, an Enum type (e.g.
    `lr_scheduler_type`), or a help text "Supported values are 'a', 'b' and 'c'." (e.g. TRL's `loss_type`)."""
    module, _, cls = config_class.partition(":")
    config = getattr(importlib.import_module(module), cls)
    hints = typing.get_type_hints(config)
    found: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(config):
        listed = f.metadata.get("choices")
        enums = [a for a in (typing.get_args(hints.get(f.name)) or (hints.get(f.name),)) if _is_enum(a)]
        if isinstance(listed, (list, tuple)) and listed:
            found[f.name] = tuple(str(c) for c in listed)
        elif enums:
            found[f.name] = tuple(str(m.value) for m in enums[0])
        else:
            match = _CHOICES_TEXT.search(str(f.metadata.get("help", "")))
            quoted = tuple(dict.fromkeys(_QUOTED.findall(match.group(1)))) if match else ()
            if len(quoted) >= 2:
                found[f.name] = quoted
    return found


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


# ---------------------------------------------------------------------------------------------------- data


class MachineError(RecipeError):
    """The recipe is valid but cannot run here as things are: no GPU, a missing optional package, an input file an
    earlier step has not written yet. `--dry-run` still prints the plan, then these, and exits 3."""


def is_hub_source(recipe: Recipe, spec: Mapping[str, Any]) -> bool:
    """A `path:` source that is not a local file or dir and reads like a hub id (fetched at train time only)."""
    from posttrain.data.sources import _looks_local

    path = spec.get("path")
    if path is None or Path(recipe.resolve_path(str(path))).exists() or Path(str(path)).expanduser().exists():
        return False
    return not _looks_local(str(path))


def check_data(recipe: Recipe, train_schema: str | None, eval_schema: str | None, problems: list) -> None:
    """Open each local/synthetic data source (hub datasets are fetched only when training starts): its rows, the
    schema the trainer needs, the prompt template, the columns the rewards read, the eval slice column."""
    from posttrain.data.schemas import SCHEMAS
    from posttrain.rollout import tools

    if train_schema is not None and recipe.data.train is not None:
        # The schema's fields and the columns the rewards read, each checked in every row (a missing answer would
        # otherwise surface at the first reward call, after generation); a column a reward reads that the data
        # lacks altogether is named with the reward.
        read = _reward_columns(recipe)
        fields = tuple(dict.fromkeys((*SCHEMAS[train_schema], *read)))
        found: list = []
        rows = _load(recipe, recipe.data.train, "data.train", fields, found)
        if rows is None and read and found:
            rows = _load(recipe, recipe.data.train, "data.train", train_schema, [])
            missing = [] if rows is None else [c for c in read if c not in rows.column_names]
            found = [_reward_column_error(recipe, rows, column) for column in missing] or found
            rows = None
        problems.extend(found)
        if rows is not None:
            _check_template(recipe, rows, "data.train", problems)
            check_chat(recipe, rows, problems)
            problems.extend(tools.row_problems(recipe, rows))
    held_out = recipe.eval.data or recipe.data.eval
    if eval_schema is None or held_out is None:
        return
    section = "eval.data" if recipe.eval.data else "data.eval"
    rows = _load(recipe, held_out, section, eval_schema, problems)
    if rows is None:
        return
    _check_template(recipe, rows, section, problems)
    column = recipe.eval.slice_column
    if column is not None and column not in rows.column_names:
        problems.append(
            RecipeError(
                f"{recipe.where}: eval.slice_column '{column}' is not a column of {section} "
                f"(columns: {', '.join(rows.column_names)})"
            )
        )


def dry_run_tokenizer(recipe: Recipe) -> Any:
    """The recipe's tokenizer when it can be had here without a download or a model (a tiny spec, a local dir),
    `data.chat_template` applied; None for a hub id or a dir not there yet."""
    from posttrain.data.chat import resolve_chat_template
    from posttrain.models.loading import load_tokenizer

    if recipe.model.tiny is not None:
        from posttrain.models.tiny import TinySpec, build_tokenizer

        try:
            spec = TinySpec(**recipe.model.tiny)
        except TypeError:
            return None  # check_model names the bad spec
        tokenizer = build_tokenizer(spec.task, spec.chat, spec.tools)
    else:
        source = recipe.resolve_path(recipe.model.path or "")
        if not (Path(source) / "tokenizer_config.json").is_file():
            return None
        tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    resolve_chat_template(recipe.data.chat_template, tokenizer, recipe.where)
    return tokenizer


def check_chat(recipe: Recipe, rows: Any, problems: list) -> None:
    """Conversations in data.train checked against the chat template they will be rendered with, before any model
    loads (a role the template drops, a tokenizer without a template; posttrain.data.chat)."""
    from posttrain.data.chat import check_chat_rows, is_conversation

    conversational = "messages" in rows.column_names or (
        "prompt" in rows.column_names and len(rows) and is_conversation(rows[0]["prompt"])
    )
    if not conversational and recipe.data.chat_template in (False, True):
        return
    try:
        tokenizer = dry_run_tokenizer(recipe)
        if tokenizer is not None and conversational:
            check_chat_rows(rows, tokenizer, f"{recipe.where}: data.train")
    except PosttrainError as err:
        problems.append(err)


def _load(recipe: Recipe, spec: Mapping[str, Any], section: str, schema: str | tuple[str, ...], problems: list):
    from posttrain.data import load_source

    limit = spec.get("limit") if isinstance(spec, Mapping) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 1:
        problems.append(DataError(f"{recipe.where}: {section}.limit must be >= 1 (rows to use), got {limit}"))
        return None
    from posttrain.data.mixture import is_mixture, mixture_entries

    parts = mixture_entries(spec) if is_mixture(spec) else [("", spec)]  # a mixture: each of its sources
    if any(isinstance(part, Mapping) and is_hub_source(recipe, part) for _, part in parts):
        return None
    base = recipe.source.parent if recipe.source else None
    for label, part in parts:
        missing = _missing_local_file(part, base)
        if missing:
            problems.append(
                MachineError(f"{recipe.where}: {section}{label}: file not found: {missing} (build or copy it first)")
            )
            return None
    if isinstance(spec, Mapping) and spec.get("synthetic") == "polar_markov" and isinstance(spec.get("n"), int):
        # Its rows come from one seeded stream, so the first ones are those training reads: checking a few spares
        # generating tens of thousands of triplets twice (here and when training starts).
        spec = {**spec, "n": min(spec["n"], VALIDATION_ROWS)}
    try:
        rows = load_source({**spec, "schema": schema}, base_dir=base, origin=f"{recipe.where}: {section}")
    except PosttrainError as err:
        problems.append(err)
        return None
    return rows


def _missing_local_file(spec: Any, base: Path | None) -> str | None:
    """The `path:` of a local source that is not there (yet: often an earlier pipeline step writes it)."""
    from posttrain.data.sources import _resolve

    if not isinstance(spec, Mapping) or not isinstance(spec.get("path"), str):
        return None
    path = spec["path"]
    if _resolve(path, base) is not None:
        return None
    looked = "" if Path(path).expanduser().is_absolute() else f"; looked in {base or '.'} and {Path.cwd()}"
    return f"{path}{looked}"


def _check_template(recipe: Recipe, rows: Any, section: str, problems: list) -> None:
    from posttrain.data import format_prompts

    if recipe.data.prompt_template is None and recipe.data.system_prompt is None:
        return
    try:
        format_prompts(rows.select(range(min(4, len(rows)))), template=recipe.data.prompt_template,
                       system_prompt=recipe.data.system_prompt, chat=False)  # fmt: skip
    except PosttrainError as err:
        message = str(err).removeprefix(f"{recipe.where}: ")
        problems.append(DataError(f"{recipe.where}: data.prompt_template on {section}: {message}"))
    except (KeyError, IndexError, ValueError) as err:  # str.format on a template naming a missing column
        problems.append(
            DataError(
                f"{recipe.where}: data.prompt_template {recipe.data.prompt_template!r} cannot be filled from "
                f"{section} rows ({type(err).__name__}: {err}; columns: {', '.join(rows.column_names)})"
            )
        )


def _reward_columns(recipe: Recipe) -> dict[str, str]:
    """Column -> the first reward reading it (`rewards[i] (name)`), as each reward declares (reward_models)."""
    from reward_models import reward_columns

    read: dict[str, str] = {}
    for i, reward in enumerate(recipe.rewards):
        try:
            columns = reward_columns(reward.name, reward.kwargs)
        except RewardError:
            continue  # an unknown reward or a user module that does not import: check_rewards names it
        for column in columns:
            read.setdefault(column, f"rewards[{i}] ({reward.name})")
    return read


def _reward_column_error(recipe: Recipe, rows: Any, column: str) -> DataError:
    reader = _reward_columns(recipe)[column]
    return DataError(
        f"{recipe.where}: {reader} reads the column '{column}': data.train has no column '{column}' (columns: "
        f"{', '.join(rows.column_names)}); add it, or map one with data.train.columns, e.g. columns: "
        f"{{{column}: <column>}}"
    )


# ---------------------------------------------------------------------------------------- rewards, rollout, run


def check_rewards(recipe: Recipe, problems: list) -> None:
    """Every reward resolves (user `module:function` imported) and its kwargs match its signature."""
    from reward_models import build_rewards

    for i, reward in enumerate(recipe.rewards):
        spec = {"name": reward.name, "weight": reward.weight, "kwargs": reward.kwargs}
        try:
            build_rewards([spec])
        except RewardError as err:
            message = str(err).replace("rewards[0]", f"rewards[{i}]", 1)
            problems.append(RecipeError(f"{recipe.where}: {message}"))


# The trackers posttrain has an extra for (pyproject.toml; each extra is named as report_to names the tracker), with
# the modules transformers' integration for it imports (any one will do: TensorBoard's writer also takes tensorboardX).
TRACKER_MODULES: dict[str, tuple[str, ...]] = {
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow",),
    "tensorboard": ("tensorboard", "tensorboardX"),
}


def trackers_named(report_to: Any) -> list[str]:
    """The trackers a `training.report_to` value (a name or a list of names) names, without "all" and "none"."""
    names = [report_to] if isinstance(report_to, str) else [n for n in report_to or [] if isinstance(n, str)]
    return [name for name in names if name not in ("all", "none")]


def missing_trackers(report_to: Any) -> list[str]:
    """The trackers `report_to` names that posttrain has an extra for and whose package is not installed here."""
    return [
        name
        for name in trackers_named(report_to)
        if name in TRACKER_MODULES and all(importlib.util.find_spec(m) is None for m in TRACKER_MODULES[name])
    ]


def check_trackers(recipe: Recipe, problems: list) -> None:
    """Each tracker `training.report_to` names is one transformers reports to, and its package is installed: without
    it the run would fail only when the trainer is built, after the model loaded. A missing one names the extra that
    brings it. "all" (the trackers installed) and "none" pass."""
    names = trackers_named(recipe.training.get("report_to"))
    if not names:
        return
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    known = list(INTEGRATION_TO_CALLBACK)
    ctx = Context(recipe.where, recipe.overridden)
    for name in names:
        if name not in known:
            problems.append(
                ctx.error(
                    "training.report_to",
                    f"training.report_to: unknown tracker {name!r}{suggest(name, known)}; the installed transformers "
                    f"reports to {', '.join(known)}; or 'all' (every one installed), 'none'",
                )
            )
    for name in missing_trackers(names):
        problems.append(
            MachineError(
                f"{recipe.where}: training.report_to: {name!r} needs the {name} package: pip install 'posttrain[{name}]'"
            )
        )


def check_rollout_backend(recipe: Recipe, problems: list) -> None:
    """`rollout.backend: vllm` needs vLLM installed and a CUDA GPU; say which is missing and what to do."""
    if recipe.rollout.backend != "vllm":
        return
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM is not installed (pip install 'posttrain[vllm]' on a Linux machine with CUDA)")
    if not _cuda_available():
        missing.append("no CUDA GPU is visible (vLLM does not run on CPU)")
    if missing:
        problems.append(
            MachineError(
                f"{recipe.where}: rollout.backend 'vllm' cannot run here: {'; '.join(missing)}. "
                "Use --set rollout.backend=hf to generate with transformers instead"
            )
        )


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_launch(recipe: Recipe, problems: list, spec: Any = None) -> None:
    """`accelerate_config` names a readable accelerate config file (the memory plan reads it), and the launch (this
    process's `accelerate launch`, else that config) suits the trainer: DeepSpeed only where its loop runs under
    it, LoRA only where the trainer applies it."""
    from posttrain.models.memory import launch_of_this_process, read_launch

    launch = launch_of_this_process()
    if recipe.accelerate_config is not None:
        path = Path(recipe.resolve_path(recipe.accelerate_config))
        if not path.is_file():
            problems.append(RecipeError(f"{recipe.where}: accelerate_config: file not found: {recipe.accelerate_config}"))  # fmt: skip
            return
        try:
            configured = read_launch(path)
        except Exception as err:  # YAML errors, non-numeric process counts: all mean the file is not a usable config
            problems.append(
                RecipeError(f"{recipe.where}: accelerate_config {path}: not a usable accelerate config ({err})")
            )
            return
        launch = launch or configured
    if spec is None:
        return
    if recipe.model.lora is not None and not spec.lora:
        problems.append(
            RecipeError(
                f"{recipe.where}: model.lora: trainer '{spec.name}' trains all weights and has no LoRA "
                "support; remove model.lora"
            )  # fmt: skip
        )
    if launch is not None and launch.sharded and not spec.deepspeed:
        problems.append(
            RecipeError(
                f"{recipe.where}: trainer '{spec.name}' cannot run under {launch.engine} "
                f"({launch.source}): its own accelerate loop (several models: frozen encoders, a reference copy, the "
                "trained one) is built and tested for DDP only; launch it with recipes/accelerate/ddp.yaml"
            )
        )


# What a model dir of each kind a trainer trains holds (TrainerSpec.model), and what to pass instead.
_MODEL_FILES = {
    "causal_lm": (("config.json",), "a transformers model dir (config.json and weights)"),
    "sequence_classifier": (("config.json",), "a transformers model dir (config.json and weights)"),
    "diffusion": (("unet", "text_encoder", "tokenizer", "scheduler"), "a diffusers pipeline dir (unet/, "
                  "text_encoder/, tokenizer/, scheduler/)"),
}  # fmt: skip


def check_model(recipe: Recipe, spec: Any, problems: list) -> None:
    """`model.path`, when it names a local path, is a dir of the kind the trainer trains (the run itself would
    refuse it a moment after start): a path not there yet is a MachineError (an earlier step often writes it), a
    file or a dir of another kind a RecipeError. Hub ids are fetched when training starts."""
    from posttrain.data.sources import _looks_local

    if recipe.model.tiny is not None or recipe.model.path is None:
        return
    source = Path(recipe.resolve_path(recipe.model.path)).expanduser()
    if not source.exists():
        if _looks_local(recipe.model.path):
            problems.append(
                MachineError(
                    f"{recipe.where}: model.path: model dir not found: {recipe.model.path} (an earlier step writes it? "
                    "run that first, or copy the model there)"
                )
            )
        return
    needs, what = _MODEL_FILES[spec.model]
    if not source.is_dir():
        problems.append(RecipeError(f"{recipe.where}: model.path {source} is a file; trainer '{spec.name}' needs {what}"))  # fmt: skip
        return
    missing = [name for name in needs if not (source / name).exists()]
    if missing:
        kind = next((k for k, (files, _) in _MODEL_FILES.items() if all((source / f).exists() for f in files)), None)
        found = f"it holds {_MODEL_FILES[kind][1].split(' (')[0]}" if kind else "it holds no model"
        problems.append(
            RecipeError(
                f"{recipe.where}: model.path {source} is not {what}: {found} (missing: {', '.join(missing)}); "
                f"trainer '{spec.name}' trains a {spec.model.replace('_', ' ')} model"
            )
        )


def check_run_dir(recipe: Recipe, problems: list) -> None:
    """The run dir (output_dir) must be a directory or not exist yet; a file in its place (or above it) is named."""
    path = recipe.run_dir()
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            what = "output_dir" if candidate == path else f"output_dir's parent {candidate}"
            problems.append(RecipeError(f"{recipe.where}: {what} is an existing file, not a directory: {path}"))
            return
