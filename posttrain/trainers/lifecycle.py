"""The run lifecycle every trainer shares, whatever runs its loop (a TRL/transformers Trainer or SePPO's own):

1. `start`: resume from the last complete checkpoint when asked (refused without one);
2. `record_evaluation`: held-out results before training (not on resume) and after, to eval/<name>.<tag>.json
   (and a sample grid .png where the result has one), the metrics to metrics.jsonl;
3. `save_final`: the trained model written to final.tmp/ and swapped in as final/ atomically;
4. `finish`: report.md with the trainer's own curves, then final/README.md, the model card (`posttrain.model_card`).

The run-dir contract itself is `posttrain.runs`.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import ModelError, PosttrainError
from posttrain.recipe import Recipe
from posttrain.registry import get_spec
from posttrain.runs import FINAL_INFO, RunDir


@dataclass
class RunResult:
    run_dir: str
    stage: str
    train_seconds: float
    global_step: int
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    finished: bool = False  # the run dir already held this run, finished: nothing was trained or changed


def model_source(recipe: Recipe) -> str:
    """The path or hub id `model.path` names (relative to the recipe file when it exists there)."""
    if recipe.model.path is None:
        raise ModelError(f"{recipe.where}: model.path is not set")
    return recipe.resolve_path(recipe.model.path)


def start(run: RunDir, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); `--resume` without a complete one is refused."""
    if not resume:
        return None
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        raise PosttrainError(f"--resume: no complete checkpoint under {run.checkpoints}")
    return checkpoint


def record_evaluation(
    run: RunDir,
    stage: str,
    tag: str,
    step: int,
    results: list[Any] = (),
    scored: dict[str, float] | None = None,
) -> dict[str, float]:
    """Save held-out results (main process only) and log their metrics as one `<stage>:<tag>` record.

    `results` are EvalResult-like (`name`, `save(path)`, `metrics()`, optional `grid` image); `scored` is a flat
    metrics dict from a trainer's own evaluator (reward models), saved as eval/held_out.<tag>.json.
    """
    found: dict[str, float] = {}
    if scored:
        run.eval_dir.mkdir(parents=True, exist_ok=True)
        (run.eval_dir / f"held_out.{tag}.json").write_text(json.dumps(scored, indent=1))
        found.update(scored)
    for res in results:
        res.save(run.eval_dir / f"{res.name}.{tag}.json")
        if getattr(res, "grid", None) is not None:
            res.grid.save(run.eval_dir / f"{res.name}.{tag}.png")
        found.update(res.metrics())
    if found:
        run.append_metrics({"step": step, "stage": f"{stage}:{tag}", **found})
    return found


def save_final(
    run: RunDir, write: Callable[[Path], None], is_main: bool, barrier: Callable[[], None], step: int
) -> Path:
    """final/ swapped in atomically: `write(dir)` runs on every process (ZeRO-3 gathers shards for it), between
    barriers; only the main process clears final.tmp/ before, records the step in it and swaps it in after."""
    if is_main:
        shutil.rmtree(run.final_tmp, ignore_errors=True)
    barrier()
    write(run.final_tmp)
    barrier()
    if is_main:
        (run.final_tmp / FINAL_INFO).write_text(json.dumps({"step": step, **launch_info()}))
        run.swap_in_final()
    return run.final


def launch_info() -> dict:
    """How the run was launched, recorded beside the final model: machines (nodes), processes over all of them, and
    accelerate's distributed type (with the ZeRO stage under DeepSpeed)."""
    import os

    from posttrain.models.processes import machines, process_state

    state = process_state()
    kind = str(state.distributed_type).rsplit(".", 1)[-1]
    if kind == "DEEPSPEED":
        kind += f" ZeRO-{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    return {"machines": machines(), "processes": state.num_processes, "distributed": kind}


def finish(run: RunDir, recipe: Recipe, result: RunResult) -> None:
    """report.md and curves.png of the run, with the curves its trainer names, then final/README.md, its Hub model
    card (main process only). final/ is saved by now: a card that can't be written costs a warning, not the run."""
    from posttrain.model_card import write_model_card
    from posttrain.report import write_run_report

    write_run_report(run, recipe, result, curves=get_spec(recipe.trainer, recipe.where).curves)
    try:
        write_model_card(run, recipe, result)
    except Exception as err:  # the run succeeded (its weights are in final/): a README must not fail it
        print(f"warning: no model card written to {run.final}/README.md ({type(err).__name__}: {err})", file=sys.stderr)
