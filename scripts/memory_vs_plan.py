"""A run's measured peak GPU memory beside its recipe's `--dry-run` memory plan (baseline: the plan).

    accelerate launch --config_file recipes/accelerate/zero2.yaml -m posttrain train \
        recipes/grpo/qwen2.5-math-1.5b-gsm8k.yaml --set training.max_steps=5 --set output_dir=runs/mem
    python scripts/memory_vs_plan.py recipes/grpo/qwen2.5-math-1.5b-gsm8k.yaml runs/mem

Training runs log `memory/peak_allocated_gib` and `memory/peak_reserved_gib` on a CUDA device (the main process's
peak so far, `posttrain.trainers.callbacks.PeakMemory`). This prints the plan's terms, its total, and the largest
logged peaks with their ratio to the plan. A colocated vLLM engine allocates its share outside torch's counters
when it sleeps between generations, so the total without it is printed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)


def measured_peaks(run_dir: str | Path) -> dict[str, float]:
    """The largest logged value of each memory/ metric of a run dir's metrics.jsonl ({} when none was logged)."""
    from posttrain.runs import RunDir

    peaks: dict[str, float] = {}
    for row in RunDir(run_dir).read_metrics():
        for key, value in row.items():
            if key.startswith("memory/") and isinstance(value, (int, float)):
                peaks[key] = max(peaks.get(key, 0.0), float(value))
    return peaks


def comparison(recipe_path: str, run_dir: str, gpu_memory: str = "80GiB", accelerate_config: str | None = None) -> list[str]:  # fmt: skip
    from posttrain.models.memory import GIB, model_shape, parse_size, plan_for, read_launch
    from posttrain.preflight import MachineError
    from posttrain.registry import get_spec, load_and_validate
    from posttrain.train import memory_lines

    try:
        recipe = load_and_validate(recipe_path)
    except MachineError as err:  # validated on a machine without the GPU it ran on
        recipe = err.recipe
    config = accelerate_config or (recipe.resolve_path(recipe.accelerate_config) if recipe.accelerate_config else None)
    plan = plan_for(recipe, get_spec(recipe.trainer), read_launch(config), parse_size(gpu_memory),
                    model_shape(recipe.resolve_path(recipe.model.path or "")))  # fmt: skip
    lines = list(memory_lines(recipe, gpu_memory, accelerate_config))
    peaks = measured_peaks(run_dir)
    if plan is None:
        return lines + ["no plan to compare with"]
    if not peaks:
        return lines + [f"{run_dir}: no memory/ metrics logged (a CPU run, or a run from before they were logged)"]
    without_vllm = sum(t.bytes for t in plan.terms if not t.name.startswith("vllm")) / GIB
    lines.append(f"plan total {plan.total / GIB:.2f} GiB; without the colocated vLLM share {without_vllm:.2f} GiB")
    for key in ("memory/peak_allocated_gib", "memory/peak_reserved_gib"):
        if key in peaks:
            lines.append(f"measured {key.split('/')[1]:<24s} {peaks[key]:8.2f} GiB  = {peaks[key] / (plan.total / GIB):.2f}x "
                         f"the plan ({peaks[key] / without_vllm:.2f}x without vLLM)")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("run_dir")
    parser.add_argument("--gpu-memory", default="80GiB")
    parser.add_argument("--accelerate-config", default=None)
    args = parser.parse_args(argv)
    print("\n".join(comparison(args.recipe, args.run_dir, args.gpu_memory, args.accelerate_config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
