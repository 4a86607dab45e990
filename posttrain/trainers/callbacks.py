"""Trainer callbacks shared by every posttrain trainer: metrics.jsonl, progress bar, time budget, held-out eval,
checkpoint completion markers. They use transformers' callback hooks only, so they work under accelerate/DeepSpeed.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from posttrain.models.processes import process_state, stop_after_checkpoint
from posttrain.runs import RunDir, mark_complete

# Short names for the progress bar, first match wins.
_PROGRESS_KEYS = (
    ("loss", "loss"), ("reward", "reward"), ("mean_token_accuracy", "tok_acc"),
    ("tools/call_frequency", "calls"), ("tools/failure_frequency", "tool_fail"), ("tools/turns", "turns"),
)  # fmt: skip


class MetricsJsonl(TrainerCallback):
    """Append every log record to metrics.jsonl with `step` and `stage` (main process only).

    Also merges metrics that other posttrain callbacks queued (held-out eval) into the log dict before the
    report_to integrations see it, which is why the trainer puts this callback first.
    """

    def __init__(self, run: RunDir, stage: str):
        self.run = run
        self.stage = stage
        self.pending: dict[str, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        logs.update(self.pending)
        self.pending = {}
        if state.is_world_process_zero:
            self.run.append_metrics({"step": state.global_step, "stage": self.stage, **logs})


class CheckpointMarker(TrainerCallback):
    """Mark a checkpoint complete once the Trainer finished writing it; resume only trusts marked ones."""

    def on_save(self, args, state, control, **kwargs):
        process_state().wait_for_everyone()  # every rank has written its rng_state_<rank>.pth: the marker lists it
        if state.is_world_process_zero:
            from pathlib import Path

            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                mark_complete(ckpt)
        stop_after_checkpoint(state.global_step)  # a rehearsal's planned stop (every rank; a no-op otherwise)


class NothingLeftToTrain(Exception):
    """Raised by `StopAtMaxSteps` to leave `Trainer.train` before a step that would go past max_steps."""


class StopAtMaxSteps(TrainerCallback):
    """Resuming from a checkpoint already at max_steps, transformers' loop still takes one more step before it
    checks the count (it writes checkpoint-<max_steps+1>). This stops it once the checkpoint is loaded: the model
    then holds the checkpoint's weights and `run_training` goes on to final/ and the "after" evaluation."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            raise NothingLeftToTrain(f"checkpoint at step {state.global_step} of {state.max_steps}")


class TimeBudget(TrainerCallback):
    """Stop training after `seconds` of wall time (counted from the first step, so model loading is excluded).

    Every process stops at the same step: each one's clock decides only its own trigger, and accelerate's
    `set_trigger`/`check_trigger` (a reduce over the processes, every step) stops them all when any one is out of
    time. Decided per process, the first rank out of time went on to final/ while the others entered the next
    step's gradient all-reduce: a hang, or gloo aborting on mismatched collectives."""

    def __init__(self, seconds: float, accelerator: Any = None):
        self.seconds = seconds
        self.accelerator = accelerator  # None: one process, its own clock decides
        self.start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.start is None:
            self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        out_of_time = self.start is not None and time.monotonic() - self.start >= self.seconds
        if self.accelerator is not None:
            if out_of_time:
                self.accelerator.set_trigger()
            out_of_time = self.accelerator.check_trigger()
        if out_of_time:
            control.should_training_stop = True
            control.should_log = True


class Progress(TrainerCallback):
    """One tqdm bar per stage showing step, loss/reward and the latest held-out accuracy."""

    def __init__(self, stage: str):
        self.stage = stage
        self.bar: Any = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.stage, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        for key, short in _PROGRESS_KEYS:
            if isinstance(logs.get(key), (int, float)):
                self.postfix[short] = f"{logs[key]:.3g}"
        for key, value in logs.items():
            if key.startswith("eval/") and key.endswith("/accuracy"):
                self.postfix["acc"] = f"{value:.3f}"
        self.bar.set_postfix(self.postfix, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class PeakMemory(TrainerCallback):
    """On a CUDA device, log this process's peak memory so far (`memory/peak_allocated_gib`, what tensors held, and
    `memory/peak_reserved_gib`, what the caching allocator took) with each log: the measured number to set beside
    the `--dry-run` memory plan (scripts/memory_vs_plan.py). The main process writes it; DDP and ZeRO ranks hold
    the same share. Nothing on CPU."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        import torch

        if logs is None or not torch.cuda.is_available():
            return
        gib = 1024**3
        logs["memory/peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / gib, 3)
        logs["memory/peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / gib, 3)


class EvaluatorEval(TrainerCallback):
    """Every `every_steps` steps, log a trainer's own `evaluator(model) -> metrics` (reward models: held-out pairs)."""

    def __init__(self, evaluator, every_steps: int, metrics: MetricsJsonl):
        self.evaluator = evaluator
        self.every_steps = every_steps
        self.metrics = metrics

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_steps != 0:
            return
        self.metrics.pending.update(self.evaluator(getattr(model, "module", model)))
        control.should_log = True


class HeldOutEval(TrainerCallback):
    """Evaluate the recipe's benchmarks every `every_steps` steps with the model being trained.

    Every process takes part (generation under ZeRO-3 needs all ranks), each generating its shard of the prompts
    (`ShardedGenerator`); the samples are gathered, every rank grades them, only the main one writes.
    """

    def __init__(self, benchmarks, tokenizer, every_steps: int, metrics: MetricsJsonl, batch_size: int = 256,
                 trainer: Any = None):  # fmt: skip
        self.benchmarks = benchmarks
        self.tokenizer = tokenizer
        self.every_steps = every_steps
        self.metrics = metrics
        self.batch_size = batch_size
        self.trainer = trainer  # a trainer rolling out with vLLM evaluates through that engine

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or state.global_step % self.every_steps != 0:
            return
        from posttrain.evaluation import evaluate
        from posttrain.rollout.trainer_vllm import held_out_generator

        generator = held_out_generator(getattr(model, "module", model), self.tokenizer, self.batch_size, self.trainer)
        for benchmark in self.benchmarks:
            self.metrics.pending.update(evaluate(generator, benchmark, self.tokenizer).metrics())
        control.should_log = True


def tracker_callbacks(callbacks: list, args: Any) -> list:
    """The report_to integrations (wandb, trackio, mlflow, tensorboard, ...) among a Trainer's callbacks: those that
    transformers made from `args.report_to`."""
    from transformers.integrations import get_reporting_integration_callbacks

    kinds = tuple(get_reporting_integration_callbacks(args.report_to))  # () for none: isinstance is then False
    return [callback for callback in callbacks if isinstance(callback, kinds)]


def finish_tracker_runs(callbacks: list) -> None:
    """End the runs the report_to integrations leave open at train end. transformers' WandbCallback finishes
    nothing (trackio and MLflow end theirs), so the next recipe trained in the same process (a quickstart's stages,
    a script) would log into this run: wandb's run is finished here, after every callback's on_train_end."""
    from transformers.integrations import WandbCallback

    for callback in callbacks:
        wandb = getattr(callback, "_wandb", None) if isinstance(callback, WandbCallback) else None
        if wandb is not None and wandb.run is not None:
            wandb.finish()


class HeldOutToTrackers(TrainerCallback):
    """posttrain's held-out metrics from before and after training, sent to the report_to integrations as one log
    each, at the step they were measured at (0 and the last). The Trainer's own logging never carries them: they are
    measured outside its loop (`run_training`; `record_evaluation` writes them to metrics.jsonl). The ones measured
    during training ride on the Trainer's log record (`MetricsJsonl`).

    Only the integrations get them, through their `on_log` (metrics.jsonl has them already). Two moments matter: the
    integrations open their runs at on_train_begin (this callback is added after them, so "before" goes out then)
    and some close them at on_train_end (MLflow ends its run, trackio finishes), so `send` the "after" metrics
    before that: `run_training` measures them in `AtTrainEnd`, a callback that comes before the integrations."""

    def __init__(self, trainer: Any, before: dict[str, float] | None = None):
        self.trainer = trainer
        self.before = before or {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.send(self.before)

    def send(self, metrics: dict[str, float]) -> None:
        """Log `metrics` to every integration at the Trainer's current step (a no-op for none, as on other ranks)."""
        trainer = self.trainer
        if not metrics:
            return
        for integration in tracker_callbacks(trainer.callback_handler.callbacks, trainer.args):
            integration.on_log(trainer.args, trainer.state, trainer.control, logs=dict(metrics), model=trainer.model)


class AtTrainEnd(TrainerCallback):
    """Runs `conclude()` once when training ends: put first among the callbacks, it runs before the report_to
    integrations close their runs at on_train_end. `run_training` calls `conclude` itself when the Trainer left without
    reaching on_train_end (resumed at max_steps: `NothingLeftToTrain`)."""

    def __init__(self, conclude):
        self.conclude = conclude
        self.done = False

    def on_train_end(self, args, state, control, **kwargs):
        self.run()

    def run(self) -> None:
        if not self.done:
            self.done = True
            self.conclude()
