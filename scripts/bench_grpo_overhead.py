"""posttrain's GRPO vs TRL's GRPOTrainer called directly: same tiny model, data, reward, config, steps.

Prints the median optimizer-step CPU time (process time: on a shared 2-core machine wall time varied +-20% between
identical runs) of each and the ratio posttrain / TRL (goal <= 1.03). Model loading,
dataset preparation and the held-out evaluation are outside the timed steps (posttrain's eval is off here).

    python scripts/bench_grpo_overhead.py [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

RECIPE = """
name: bench
trainer: grpo
seed: 0
output_dir: {out}
model: {{path: {model}}}
data:
  train: {{synthetic: arithmetic, split: train, n: 2048}}
rewards: [{{name: numeric_match}}]
rollout: {{num_generations: 8, max_new_tokens: 5}}
algorithm: {{loss_type: dapo, beta: 0.0}}
training: {{max_steps: {steps}, per_device_train_batch_size: 256, learning_rate: 5.0e-5, logging_steps: 5,
           save_strategy: "no"}}
"""


class StepTimer:
    """A TrainerCallback recording each optimizer step's CPU time (this process, all threads)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._t = 0.0

            def on_step_begin(self, args, state, control, **kw):
                self._t = time.process_time()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.process_time() - self._t)

        return _Timer()


def via_posttrain(model_dir: Path, steps: int, workdir: Path) -> list[float]:
    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.runs import RunDir
    from posttrain.trainers.base import run_training
    from posttrain.trainers.grpo import build_trainer

    path = workdir / "bench.yaml"
    path.write_text(RECIPE.format(out=workdir / "run", model=model_dir, steps=steps))
    recipe = load_recipe(path)
    run = RunDir(recipe.run_dir())
    run.prepare(recipe, resume=False)
    trainer, tokenizer = build_trainer(recipe, run)
    timer = StepTimer()
    trainer.add_callback(timer)
    run_training(recipe, trainer, tokenizer, run, resume=False)
    return timer.times


def via_trl(model_dir: Path, steps: int, workdir: Path) -> list[float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data import arithmetic_split
    from reward_models.math import numeric_match_reward

    rows = arithmetic_split("train", n=2048, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = GRPOConfig(
        output_dir=str(workdir / "trl"), max_steps=steps, per_device_train_batch_size=256, learning_rate=5e-5,
        logging_steps=5, save_strategy="no", num_generations=8, max_completion_length=5, temperature=1.0,
        top_p=1.0, top_k=0, loss_type="dapo", beta=0.0, seed=0, report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=numeric_match_reward, args=config, train_dataset=rows,
                          processing_class=tokenizer)  # fmt: skip
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # printing log dicts is not what is being compared
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from posttrain.models.tiny import TinySpec, save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny_model(tmp / "model", TinySpec())
        results: dict[str, list[float]] = {"posttrain": [], "trl": []}
        pair = [("trl", via_trl), ("posttrain", via_posttrain)]
        for rep in range(args.repeats):  # interleaved, order alternating, so warm-up and noise hit both alike
            for name, fn in pair if rep % 2 == 0 else pair[::-1]:
                work = tmp / f"{name}{rep}"
                work.mkdir()
                times = fn(model_dir, args.steps, work)[2:]  # drop warm-up steps
                results[name].extend(times)
                print(f"  run {rep} {name:9s} median step {statistics.median(times) * 1000:.1f} ms", flush=True)
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"baseline: TRL GRPOTrainer called directly; {args.steps} steps x {args.repeats} repeats, "
              f"256 completions/step, tiny 0.3M model, torch threads 1")  # fmt: skip
        print(f"median step CPU time  trl {med['trl'] * 1000:.1f} ms   posttrain {med['posttrain'] * 1000:.1f} ms")
        print(f"ratio posttrain/trl = {med['posttrain'] / med['trl']:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
