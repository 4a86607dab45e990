"""Run a validated recipe: the registry names the trainer module, the run dir is prepared, the trainer trains.

This layer names no trainer: what a run plans, trains and plots comes from the trainer module's `SPEC`, `plan` and
`train` (see docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.recipe import Recipe
from posttrain.registry import get_spec, load_and_validate, trainer_module
from posttrain.runs import RunDir

__all__ = ["dry_run_plan", "load_and_validate", "run_curves", "train_recipe"]


def train_recipe(recipe: Recipe, resume: bool = False):
    module = trainer_module(recipe.trainer, recipe.where)
    run = RunDir(recipe.run_dir())
    from accelerate import PartialState

    if PartialState().is_main_process:
        run.prepare(recipe, resume=resume)
    PartialState().wait_for_everyone()
    return module.train(recipe, run, resume=resume)


def dry_run_plan(recipe: Recipe, gpu_memory: str = "80GiB", accelerate_config: str | None = None) -> list[str]:
    """What `train` would do, without loading weights or importing the trainer's library."""
    module = trainer_module(recipe.trainer, recipe.where)
    spec = module.SPEC
    lines = [f"trainer: {spec.name} — {spec.description}", f"run dir: {recipe.run_dir()}", _model_line(recipe)]
    lines.extend(module.plan(recipe))
    budget = recipe.training.get("time_budget_s")
    if budget is not None:
        lines.append(f"time budget: stops after {budget:.0f} s of training")
    return lines + memory_lines(recipe, gpu_memory, accelerate_config)


def memory_lines(recipe: Recipe, gpu_memory: str = "80GiB", accelerate_config: str | None = None) -> list[str]:
    """The recipe's memory plan per device on its accelerate config (posttrain.models.memory), or why there is
    none (a tiny or diffusion model, an unknown hub model)."""
    from posttrain.models.memory import model_shape, parse_size, plan_for, read_launch

    if recipe.model.tiny is not None:
        return ["memory plan: a tiny local model (a few MB); none needed"]
    config = accelerate_config or (recipe.resolve_path(recipe.accelerate_config) if recipe.accelerate_config else None)
    source = recipe.resolve_path(recipe.model.path or "")
    plan = plan_for(recipe, read_launch(config), parse_size(gpu_memory), model_shape(source))
    if plan is None:
        return [f"memory plan: the shape of '{source}' is unknown here (not a causal LM with a readable config.json)"]
    return plan.lines()


def _model_line(recipe: Recipe) -> str:
    if recipe.model.tiny is not None:
        return f"model: tiny local model {recipe.model.tiny}"
    source = recipe.resolve_path(recipe.model.path or "")
    if Path(source).exists():
        kind = "local dir"
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        kind = "hub id, loaded at train time"
    else:
        kind = "local dir, not there yet"
    lora = f"r={recipe.model.lora.r}" if recipe.model.lora else "off"
    return f"model: {source} ({kind}), dtype {recipe.model.dtype}, LoRA {lora}"


def run_curves(run_path: Path) -> tuple[str, ...] | None:
    """The curves a run's trainer plots (from its recipe.resolved.yaml), or None when that can't be told."""
    import yaml

    try:
        trainer = (yaml.safe_load((Path(run_path) / "recipe.resolved.yaml").read_text()) or {}).get("trainer")
        return get_spec(str(trainer)).curves
    except Exception:  # a run dir from another version, a hand-made dir: the leaderboard falls back to its default
        return None
