"""What every TRL-backed posttrain trainer shares: recipe → config kwargs, data loading, the run lifecycle
(eval before, train with callbacks, atomic final save, eval after, report)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.models import load_policy, load_tokenizer, materialise_tiny, model_source, resolve_precision
from posttrain.recipe import Recipe
from posttrain.registry import POSTTRAIN_TRAINING_KEYS
from posttrain.runs import RunDir

# posttrain's defaults where TRL's don't suit a recipe-driven run (a recipe's `training:` still wins).
_DEFAULTS = {"logging_steps": 10, "save_strategy": "steps", "save_steps": 500, "report_to": "none"}


@dataclass
class RunResult:
    run_dir: str
    stage: str
    train_seconds: float
    global_step: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)


def config_kwargs(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    """Keyword arguments for the trainer's TRL config: recipe training + algorithm options and what posttrain owns."""
    import torch

    precision = resolve_precision(recipe.training.get("precision", "auto"))
    kwargs = dict(_DEFAULTS)
    kwargs.update({k: v for k, v in recipe.training.items() if k not in POSTTRAIN_TRAINING_KEYS})
    kwargs.update(recipe.algorithm)
    kwargs.update(
        output_dir=str(run.checkpoints),
        seed=recipe.seed,
        activation_checkpointing=recipe.model.gradient_checkpointing,  # transformers 5's name for it
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        disable_tqdm=True,  # posttrain's own Progress callback shows stage, reward and accuracy
    )
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    return kwargs


def quiet_library_progress() -> None:
    """Silence datasets'/transformers' per-map and per-save bars: the Progress callback is the one bar a run shows."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    # TRL 1.16 calls transformers 5's deprecated `is_gradient_checkpointing` on every save; nothing for users to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def load_model_and_tokenizer(recipe: Recipe, run: RunDir):
    """The policy and tokenizer (a tiny spec is built into the run dir first)."""
    quiet_library_progress()
    source = str(materialise_tiny(recipe, run.path)) if recipe.model.tiny else model_source(recipe)
    precision = resolve_precision(recipe.training.get("precision", "auto"))
    tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    model = load_policy(source, recipe.model, precision)
    return model, tokenizer


def load_train_data(recipe: Recipe, schema: str | None):
    from posttrain.data import format_prompts, load_source

    origin = f"{recipe.where}: data.train"
    # Validated inside load_source, so a bad row is named by its line in the file even after shuffle/limit.
    spec = {**recipe.data.train, "schema": schema} if schema else recipe.data.train
    rows = load_source(spec, base_dir=recipe.source.parent if recipe.source else None, origin=origin)
    return format_prompts(
        rows,
        template=recipe.data.prompt_template,
        system_prompt=recipe.data.system_prompt,
        chat=recipe.data.chat_template,
    )


def load_eval_data(recipe: Recipe, schema: str):
    """The recipe's `data.eval` rows validated against `schema` (capped at `eval.limit`), or None without one."""
    from posttrain.data import load_source

    if recipe.data.eval is None:
        return None
    spec = {**recipe.data.eval, "schema": schema}
    base_dir = recipe.source.parent if recipe.source else None
    rows = load_source(spec, base_dir=base_dir, origin=f"{recipe.where}: data.eval")
    if recipe.eval.limit:
        rows = rows.select(range(min(recipe.eval.limit, len(rows))))
    return rows


def run_training(
    recipe: Recipe,
    trainer: Any,
    tokenizer: Any,
    run: RunDir,
    resume: bool,
    evaluator: Callable[[Any], dict[str, float]] | None = None,
) -> RunResult:
    """Train with posttrain's callbacks, save the final model atomically, evaluate before and after.

    Held-out evaluation generates with the policy on the recipe's benchmarks, unless the trainer passes its own
    `evaluator(model) -> metrics` (reward models are scored, not sampled); its metrics go to eval/held_out.*.json.
    """
    from transformers import PrinterCallback

    from posttrain.evaluation import evaluate, recipe_benchmarks
    from posttrain.rollout.hf import HFGenerator
    from posttrain.rollout.sharded import ShardedGenerator
    from posttrain.trainers.callbacks import (
        CheckpointMarker,
        EvaluatorEval,
        HeldOutEval,
        MetricsJsonl,
        Progress,
        TimeBudget,
    )

    stage = recipe.name
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts when the default tqdm bar is off
    metrics = MetricsJsonl(run, stage)
    # First, so queued eval metrics reach the report_to integrations in the same log call.
    trainer.callback_handler.callbacks.insert(0, metrics)
    trainer.add_callback(CheckpointMarker())
    trainer.add_callback(Progress(stage))
    if "time_budget_s" in recipe.training:
        trainer.add_callback(TimeBudget(recipe.training["time_budget_s"]))
    benchmarks = recipe_benchmarks(recipe) if evaluator is None else []
    if evaluator is not None and recipe.eval.every_steps:
        trainer.add_callback(EvaluatorEval(evaluator, recipe.eval.every_steps, metrics))
    if benchmarks and recipe.eval.every_steps:
        every = recipe.eval.every_steps
        trainer.add_callback(HeldOutEval(benchmarks, tokenizer, every, metrics, recipe.eval.batch_size))

    checkpoint = None
    if resume:
        checkpoint = run.last_checkpoint()
        if checkpoint is None:
            raise PosttrainError(f"--resume: no complete checkpoint under {run.checkpoints}")

    is_main = trainer.accelerator.is_main_process
    result = RunResult(run_dir=str(run.path), stage=stage, train_seconds=0.0, global_step=0)

    def held_out(tag: str) -> dict[str, float]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        found: dict[str, float] = {}
        if evaluator is not None:
            found = evaluator(model)
            if is_main and found:
                run.eval_dir.mkdir(parents=True, exist_ok=True)
                (run.eval_dir / f"held_out.{tag}.json").write_text(json.dumps(found, indent=1))
        generator = ShardedGenerator(HFGenerator(model, tokenizer, recipe.eval.batch_size))  # 1/N of it per rank
        for benchmark in benchmarks:
            res = evaluate(generator, benchmark, tokenizer)
            if is_main:
                res.save(run.eval_dir / f"{benchmark.name}.{tag}.json")
            found.update(res.metrics())
        if is_main and found:
            run.append_metrics({"step": trainer.state.global_step, "stage": f"{stage}:{tag}", **found})
        return found

    if checkpoint is None:
        result.before = held_out("before")
    start = time.monotonic()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    result.train_seconds = time.monotonic() - start
    result.global_step = trainer.state.global_step

    # Every rank calls save_model (ZeRO-3 gathers shards); only the main process writes and swaps dirs.
    if is_main:
        shutil.rmtree(run.final_tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(run.final_tmp))
    if is_main:
        tokenizer.save_pretrained(str(run.final_tmp))
    trainer.accelerator.wait_for_everyone()
    if is_main:
        run.swap_in_final()
    result.after = held_out("after")
    if is_main:
        from posttrain.report import write_run_report

        write_run_report(run, recipe, result)
    return result
