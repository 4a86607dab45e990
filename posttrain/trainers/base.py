"""What the trainers over a transformers/TRL Trainer share: recipe -> library config kwargs, model and data loading,
the dry-run plan lines, and `run_training` (callbacks, then the shared run lifecycle of `trainers.lifecycle`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.models.loading import load_policy, load_tokenizer, materialise_tiny, resolve_precision
from posttrain.models.processes import DDP_TIMEOUT_S
from posttrain.recipe import Recipe
from posttrain.registry import library_kwargs
from posttrain.runs import RunDir
from posttrain.trainers.lifecycle import RunResult, finish, model_source, record_evaluation, save_final, start

# posttrain's defaults where TRL's don't suit a recipe-driven run (a recipe's `training:` still wins). ddp_timeout:
# minutes, not transformers' half hour, for a dead node's survivors (processes.DDP_TIMEOUT_S says why).
_DEFAULTS = {"logging_steps": 10, "save_strategy": "steps", "save_steps": 500, "report_to": "none",
             "ddp_timeout": DDP_TIMEOUT_S}  # fmt: skip


def config_kwargs(recipe: Recipe, run: RunDir) -> dict[str, Any]:
    """Keyword arguments for the trainer's library config: the recipe's training + algorithm values (posttrain's own
    keys stripped by the registry) and the fields other recipe sections own."""
    import torch

    precision = resolve_precision(recipe.settings.precision)
    kwargs = dict(_DEFAULTS)
    kwargs.update(library_kwargs(recipe))
    kwargs.update(
        output_dir=str(run.checkpoints),
        seed=recipe.seed,
        **{checkpointing_key(): recipe.model.gradient_checkpointing},
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        disable_tqdm=True,  # posttrain's own Progress callback shows stage, reward and accuracy
    )
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    return kwargs


def checkpointing_key() -> str:
    """TrainingArguments' name for gradient checkpointing: `activation_checkpointing` from transformers 5.24 (the
    old name is deprecated there), `gradient_checkpointing` before (the window starts at 5.17, vLLM 0.31's)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def policy_source(recipe: Recipe, run: RunDir) -> str:
    """Where the policy (or reward model) loads from: `model.path`, or a tiny spec built into the run dir first."""
    from posttrain.models.loading import quiet_library_progress

    quiet_library_progress()
    return str(materialise_tiny(recipe.model.tiny, run.path)) if recipe.model.tiny else model_source(recipe)


def load_model_and_tokenizer(recipe: Recipe, run: RunDir):
    """The policy and tokenizer (a tiny spec is built into the run dir first)."""
    source = policy_source(recipe, run)
    precision = resolve_precision(recipe.settings.precision)
    tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    from posttrain.data.chat import resolve_chat_template

    resolve_chat_template(recipe.data.chat_template, tokenizer, recipe.where)
    model = load_policy(source, recipe.model, precision)
    return model, tokenizer


def load_policy_tokenizer_data(recipe: Recipe, run: RunDir, schema: str | tuple[str, ...] | None):
    """(policy, tokenizer, data.train rows): the tokenizer first, with `data.chat_template` applied, then the rows,
    their conversations checked against its template, and only then the model, so bad chat data fails fast."""
    from posttrain.data.chat import check_chat_rows, resolve_chat_template

    source = policy_source(recipe, run)
    tokenizer = load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code)
    resolve_chat_template(recipe.data.chat_template, tokenizer, recipe.where)
    rows = load_train_data(recipe, schema, run)
    check_chat_rows(rows, tokenizer, f"{recipe.where}: data.train")
    if recipe.data.max_prompt_length is not None:
        from posttrain.data.templates import limit_prompt_length

        rows = limit_prompt_length(rows, tokenizer, recipe.data.max_prompt_length, recipe.data.overlong_prompts,
                                   f"{recipe.where}: data.train")  # fmt: skip
    model = load_policy(source, recipe.model, resolve_precision(recipe.settings.precision))
    return model, tokenizer, rows


def chat_example_lines(recipe: Recipe) -> list[str]:
    """For the dry-run plan: the first conversation of data.train rendered as SFT trains on it, the span the loss
    covers in [[ ]]; nothing for plain rows or when the data or tokenizer is not at hand (a hub id)."""
    from posttrain.data.chat import marked_example
    from posttrain.preflight import _load, dry_run_tokenizer

    if recipe.data.train is None:
        return []
    try:
        rows = _load(recipe, {**recipe.data.train, "limit": 1}, "data.train", "prompt_completion", [])
        if rows is None or "messages" not in rows.column_names:
            return []
        tokenizer = dry_run_tokenizer(recipe)
        if tokenizer is None:
            return ["conversations: rendered with the model's chat template at train time (tokenizer not local)"]
        example = marked_example(rows[0]["messages"], tokenizer)
    except Exception as err:  # the checks report data problems; the plan only shows what renders
        return [f"conversations: no example rendered ({type(err).__name__}: {err})"]
    return ["one conversation as trained (loss on [[...]] only):", *("  | " + line for line in example.splitlines())]


def load_train_data(recipe: Recipe, schema: str | tuple[str, ...] | None, run: RunDir | None = None):
    """data.train's rows, validated against `schema`, prompts shaped; a mixture's realised shares are printed and,
    with `run`, written to its mixture.json (the report shows them)."""
    from posttrain.data import format_prompts, load_source
    from posttrain.data.mixture import realised_shares, write_summary
    from posttrain.models.processes import process_state
    from posttrain.report import mixture_table

    origin = f"{recipe.where}: data.train"
    # Validated inside load_source, so a bad row is named by its line in the file even after shuffle/limit.
    spec = {**recipe.data.train, "schema": schema} if schema else recipe.data.train
    rows = load_source(spec, base_dir=recipe.source.parent if recipe.source else None, origin=origin)
    rows, mixture = realised_shares(rows, spec, "data.train")
    if mixture is not None:
        print("\n".join(mixture_table(mixture)))
        if run is not None and process_state().is_main_process:  # one writer: the ranks' atomic writes would race
            write_summary(run.path, mixture)
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
    """Train with posttrain's callbacks through the shared lifecycle: eval before, train, atomic final/, eval after,
    report.

    Held-out evaluation generates with the policy on the recipe's benchmarks, unless the trainer passes its own
    `evaluator(model) -> metrics` (reward models are scored, not sampled); its metrics go to eval/held_out.*.json.
    The report_to trackers get the held-out metrics too: before training at step 0, during it with the Trainer's log
    records, after it at the last step (final/ and the evaluation after run as training ends, before the trackers
    close their runs).
    """
    from posttrain.evaluation import recipe_benchmarks
    from posttrain.trainers.callbacks import AtTrainEnd, HeldOutToTrackers, NothingLeftToTrain, finish_tracker_runs

    benchmarks = recipe_benchmarks(recipe) if evaluator is None else []
    _add_callbacks(recipe, trainer, tokenizer, run, benchmarks, evaluator)
    checkpoint = start(run, resume)
    is_main = trainer.accelerator.is_main_process
    result = RunResult(run_dir=str(run.path), stage=recipe.name, train_seconds=0.0, global_step=0)

    def held_out(tag: str) -> dict[str, float]:
        model = trainer.accelerator.unwrap_model(trainer.model)
        scored = evaluator(model) if evaluator is not None else None
        results = _evaluate_policy(model, tokenizer, benchmarks, recipe.eval.batch_size, trainer)
        if not is_main:
            return {}
        return record_evaluation(run, recipe.name, tag, trainer.state.global_step, results, scored)

    if checkpoint is None:
        result.before = held_out("before")
    trackers = HeldOutToTrackers(trainer, result.before)  # after the report_to integrations: they open runs first
    trainer.add_callback(trackers)
    begin = time.monotonic()

    def conclude() -> None:
        """final/ and the evaluation after, while the report_to integrations' runs are still open (see AtTrainEnd)."""
        result.train_seconds = time.monotonic() - begin
        result.global_step = trainer.state.global_step
        _save_final(run, trainer, tokenizer, is_main)
        result.after = held_out("after")
        trackers.send(result.after)

    end = AtTrainEnd(conclude)
    trainer.callback_handler.callbacks.insert(0, end)  # before the integrations, which close their runs at train end
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NothingLeftToTrain:  # resumed at max_steps (killed before final/): the checkpoint's weights are loaded
        pass
    end.run()  # a no-op when on_train_end ran it
    finish_tracker_runs(trainer.callback_handler.callbacks)
    if is_main:
        finish(run, recipe, result)
    return result


def _save_final(run: RunDir, trainer: Any, tokenizer: Any, is_main: bool) -> None:
    """final/ from the trained model (`lifecycle.save_final`): every rank saves, as ZeRO-3 gathers the shards; the
    main process adds the tokenizer."""

    def write(target: Path) -> None:
        trainer.save_model(str(target))
        if is_main:
            tokenizer.save_pretrained(str(target))

    save_final(run, write, is_main, trainer.accelerator.wait_for_everyone, trainer.state.global_step)


def _evaluate_policy(model: Any, tokenizer: Any, benchmarks: list, batch_size: int, trainer: Any = None) -> list:
    """Greedy held-out results of the policy (`held_out_generator`)."""
    from posttrain.evaluation import evaluate
    from posttrain.evaluation.kinds.generate import with_benchmark_tools
    from posttrain.rollout.trainer_vllm import held_out_generator

    generator = held_out_generator(model, tokenizer, batch_size, trainer)
    return [evaluate(with_benchmark_tools(generator, b, tokenizer), b, tokenizer) for b in benchmarks]


def _add_callbacks(recipe: Recipe, trainer: Any, tokenizer: Any, run: RunDir, benchmarks: list, evaluator) -> None:
    from transformers import PrinterCallback

    from posttrain.trainers.callbacks import (
        CheckpointMarker,
        EvaluatorEval,
        HeldOutEval,
        MetricsJsonl,
        PeakMemory,
        Progress,
        StopAtMaxSteps,
        TimeBudget,
    )

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts when the default tqdm bar is off
    metrics = MetricsJsonl(run, recipe.name)
    # First, so queued eval metrics reach the report_to integrations in the same log call (PeakMemory before it,
    # so its numbers are in the row MetricsJsonl writes).
    trainer.callback_handler.callbacks.insert(0, metrics)
    trainer.callback_handler.callbacks.insert(0, PeakMemory())
    trainer.add_callback(StopAtMaxSteps())  # before Progress: no bar for a run with nothing left to train
    trainer.add_callback(CheckpointMarker())
    trainer.add_callback(Progress(recipe.name))
    if recipe.settings.time_budget_s is not None:
        trainer.add_callback(TimeBudget(recipe.training["time_budget_s"], trainer.accelerator))
    if benchmarks:
        from posttrain.rollout.tools import eval_tools

        trainer.eval_tools = eval_tools(recipe)  # (tools, round cap, environments): the held-out tool loop
    every = recipe.eval.every_steps
    if evaluator is not None and every:
        trainer.add_callback(EvaluatorEval(evaluator, every, metrics))
    if benchmarks and every:
        trainer.add_callback(HeldOutEval(benchmarks, tokenizer, every, metrics, recipe.eval.batch_size, trainer))


# ------------------------------------------------------------------------------------------------ dry-run plan


def describe_text_data(recipe: Recipe) -> list[str]:
    """One line per data split: row count and columns of a local source (a hub dataset is not fetched)."""
    from posttrain.data import load_source

    lines = []
    base = recipe.source.parent if recipe.source else None
    for split in ("train", "eval"):
        spec = getattr(recipe.data, split)
        if spec is None:
            continue
        path = spec.get("path")
        if path is not None and not Path(recipe.resolve_path(path)).exists():
            lines.append(f"data.{split}: hub dataset '{path}' (not fetched by --dry-run)")
            continue
        if spec.get("synthetic") == "polar_markov" and isinstance(spec.get("n"), int):
            # n rows of one seeded stream: the columns are read from a few, the count is n (generating tens of
            # thousands of triplets would make --dry-run as slow as the start of training)
            rows = load_source({**spec, "n": 1}, base_dir=base, origin=f"{recipe.where}: data.{split}")
            lines.append(f"data.{split}: {spec['n']} rows, columns {', '.join(rows.column_names)}")
            continue
        rows = load_source(spec, base_dir=base, origin=f"{recipe.where}: data.{split}")
        lines.append(f"data.{split}: {len(rows)} rows, columns {', '.join(rows.column_names)}")
    limit = recipe.data.max_prompt_length
    if limit is not None:
        longer = {"error": "stop the run before training, the first one named",
                  "filter": "are dropped before training (verl's filter_overlong_prompts)",
                  "left": f"are cut to their last {limit} tokens (verl's truncation='left')"}  # fmt: skip
        lines.append(f"prompts: at most {limit} tokens with the chat template (data.max_prompt_length); longer ones "
                     f"{longer[recipe.data.overlong_prompts]}")  # fmt: skip
    return lines


def steps_line(recipe: Recipe) -> str:
    s = recipe.settings
    if (s.get("max_steps") or -1) > 0:
        return f"steps: {s.max_steps} optimizer steps"
    return f"steps: {s.get('num_train_epochs'):g} epoch(s) over data.train"


def standard_plan(recipe: Recipe, method: list[str]) -> list[str]:
    """A library-backed trainer's plan: its data, the method lines it states, and the step count."""
    return [*describe_text_data(recipe), *method, steps_line(recipe)]
