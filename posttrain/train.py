"""Run a validated recipe: pick the trainer from the registry, prepare the run dir, train."""

from __future__ import annotations

import importlib
from pathlib import Path

from posttrain.recipe import Recipe
from posttrain.registry import get_trainer
from posttrain.runs import RunDir


def train_recipe(recipe: Recipe, resume: bool = False):
    entry = get_trainer(recipe.trainer, recipe.where)
    module = importlib.import_module(entry.module)
    run = RunDir(recipe.run_dir())
    from accelerate import PartialState

    if PartialState().is_main_process:
        run.prepare(recipe, resume=resume)
    PartialState().wait_for_everyone()
    return module.train(recipe, run, resume=resume)


def dry_run_plan(recipe: Recipe) -> list[str]:
    """What `train` would do, without loading weights or importing the trainer."""
    entry = get_trainer(recipe.trainer, recipe.where)
    module = importlib.import_module(entry.module)
    lines = [f"trainer: {entry.name} — {entry.description}", f"run dir: {recipe.run_dir()}"]
    if recipe.model.tiny is not None:
        lines.append(f"model: tiny local model {recipe.model.tiny}")
    else:
        source = recipe.resolve_path(recipe.model.path or "")
        if Path(source).exists():
            kind = "local dir"
        elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
            kind = "hub id, loaded at train time"
        else:
            kind = "local dir, not there yet"
        lora = f"r={recipe.model.lora.r}" if recipe.model.lora else "off"
        lines.append(f"model: {source} ({kind}), dtype {recipe.model.dtype}, LoRA {lora}")
    for split in ("train", "eval"):
        spec = getattr(recipe.data, split)
        if spec is not None:
            lines.append(f"data.{split}: {_describe_source(recipe, spec, split)}")
    lines.extend(module.plan(recipe))
    t = recipe.training
    if recipe.trainer == "seppo":
        pass  # its plan states stages x updates
    elif t.get("max_steps", -1) > 0:
        lines.append(f"steps: {t['max_steps']} optimizer steps")
    else:
        lines.append(f"steps: {t.get('num_train_epochs', 3)} epoch(s) over data.train")
    if "time_budget_s" in t:
        lines.append(f"time budget: stops after {t['time_budget_s']:.0f} s of training")
    return lines


def _describe_source(recipe: Recipe, spec: dict, split: str) -> str:
    from posttrain.data import load_source

    if recipe.trainer == "seppo":  # image sources (prompt + image rows): posttrain.data.images
        from posttrain.data.images import describe_image_source

        base = recipe.source.parent if recipe.source else None
        return describe_image_source(spec, base_dir=base, origin=f"{recipe.where}: data.{split}")

    path = spec.get("path")
    if path is not None and not Path(recipe.resolve_path(path)).exists():
        return f"hub dataset '{path}' (not fetched by --dry-run)"
    base = recipe.source.parent if recipe.source else None
    rows = load_source(spec, base_dir=base, origin=f"{recipe.where}: data.{split}")
    return f"{len(rows)} rows, columns {', '.join(rows.column_names)}"
