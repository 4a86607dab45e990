"""Run a validated recipe: the registry names the trainer module, the run dir is prepared, the trainer trains.

This layer names no trainer: what a run plans, trains and plots comes from the trainer module's `SPEC`, `plan` and
`train` (see docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.recipe import Recipe
from posttrain.registry import get_spec, load_and_validate, trainer_module
from posttrain.runs import RunDir, RunState

__all__ = ["dry_run_plan", "load_and_validate", "run_curves", "train_recipe"]


def train_recipe(recipe: Recipe, resume: bool = False):
    """Run `recipe` into its run dir, settled first (`RunDir.prepare`): a failed run starts again (its files moved
    aside), an interrupted one continues with resume=True, a finished one resumed returns what it recorded and
    changes nothing."""
    from posttrain.models.processes import confirm_shared_run_dir, process_state

    module = trainer_module(recipe.trainer, recipe.where)
    run = RunDir(recipe.run_dir())
    planned = planned_steps(recipe)
    # First in the process: a DeepSpeed launch on CPUs needs its backend named, and the process group its timeout.
    process = process_state(timeout_s=collective_timeout_s(recipe))
    confirm_shared_run_dir(run.path)  # every rank sees the same run dir (a node-local output_dir is refused)
    seen = run.state(planned)  # every process reads the dir before the main process changes it
    process.wait_for_everyone()
    state = run.prepare(recipe, resume=resume, planned_steps=planned, state=seen, is_main=process.is_main_process)
    process.wait_for_everyone()
    if state.kind == "finished":
        return finished_result(run, recipe, state)
    return module.train(recipe, run, resume=state.kind == "interrupted")


def collective_timeout_s(recipe: Recipe) -> float:
    """How long a rank waits for the others in a collective before the run fails: `training.ddp_timeout` when the
    recipe sets it, else posttrain's default (`processes.DDP_TIMEOUT_S`), not transformers' 1800 s."""
    from posttrain.models.processes import DDP_TIMEOUT_S

    return float(recipe.training.get("ddp_timeout", DDP_TIMEOUT_S))


def planned_steps(recipe: Recipe) -> int | None:
    """The optimizer steps the recipe plans (the trainer module's `planned_steps`, else `training.max_steps`), or
    None when it counts epochs."""
    module = trainer_module(recipe.trainer, recipe.where)
    if hasattr(module, "planned_steps"):
        return module.planned_steps(recipe)
    steps = recipe.settings.get("max_steps")
    return int(steps) if isinstance(steps, int) and steps > 0 else None


def finished_result(run: RunDir, recipe: Recipe, state: RunState):
    """The result a finished run recorded (its last before/after evaluations), for `--resume` of a finished run."""
    from posttrain.trainers.lifecycle import RunResult

    result = RunResult(run_dir=str(run.path), stage=recipe.name, train_seconds=0.0, global_step=state.final_step or 0,
                       finished=True)  # fmt: skip
    for row in run.read_metrics():
        tag = str(row.get("stage", ""))
        if tag in (f"{recipe.name}:before", f"{recipe.name}:after"):
            values = {k: v for k, v in row.items() if k.startswith("eval/")}
            setattr(result, tag.rsplit(":", 1)[1], values)
    return result


def dry_run_plan(recipe: Recipe, gpu_memory: str = "80GiB", accelerate_config: str | None = None) -> list[str]:
    """What `train` would do, without loading weights or importing the trainer's library."""
    module = trainer_module(recipe.trainer, recipe.where)
    spec = module.SPEC
    lines = [f"trainer: {spec.name} — {spec.description}", f"run dir: {recipe.run_dir()}", _model_line(recipe)]
    lines.extend(module.plan(recipe))
    budget = recipe.settings.get("time_budget_s")
    if budget is not None:
        lines.append(f"time budget: stops after {budget:.0f} s of training")
    lines.append(f"collective timeout: {collective_timeout_s(recipe):g} s (training.ddp_timeout): with several "
                 "processes, one that waits longer for another (a node that died or hangs) fails the run")  # fmt: skip
    return lines + memory_lines(recipe, gpu_memory, accelerate_config)


def memory_lines(recipe: Recipe, gpu_memory: str = "80GiB", accelerate_config: str | None = None) -> list[str]:
    """The recipe's memory plan per device on its accelerate config (posttrain.models.memory), or why there is
    none (a tiny or diffusion model, an unknown hub model)."""
    from posttrain.models.memory import model_shape, parse_size, plan_for, planned_launch, read_launch

    if recipe.model.tiny is not None:
        return ["memory plan: a tiny local model (a few MB); none needed"]
    config = accelerate_config or (recipe.resolve_path(recipe.accelerate_config) if recipe.accelerate_config else None)
    source = recipe.resolve_path(recipe.model.path or "")
    plan = plan_for(
        recipe,
        get_spec(recipe.trainer, recipe.where),
        planned_launch() or read_launch(config),
        parse_size(gpu_memory),
        model_shape(source),
    )
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
