"""On-policy distillation vs SFT on the teacher's outputs, same student, same wall time (docs/distill.md).

Per seed, the teacher is the quickstart's GRPO model (`posttrain quickstart --seed N --out QS/seedN`, its
`grpo/final`), and the student the 4x smaller tiny model of recipes/distill/arithmetic.yaml, from its random init:

(a) `distill`: the shipped recipe (on-policy distillation, reverse KL), its training time measured;
(b) `SFT on teacher outputs`: the teacher's greedy completions of the same 6,480 train prompts written to a jsonl,
    then recipes/sft/arithmetic.yaml on them with the same student spec, optimizer settings and batch, for (a)'s
    training seconds (`training.time_budget_s`); its step count is sized from a 100-step pilot's step time so that
    its cosine schedule ends at the budget, as the quickstart sizes its SFT baseline.

Held-out greedy accuracy (the same 1,000 eval problems, carry / no-carry slices) of the teacher (from the
quickstart's summary.json), (a) and (b), printed as a markdown table and written to OUT/results.json.

    python scripts/experiments/distill_vs_sft.py --qs /work/qs --seeds 0 1 --out runs/distill-exp
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

REPO = Path(__file__).resolve().parents[2]
DISTILL = REPO / "recipes" / "distill" / "arithmetic.yaml"
SFT = REPO / "recipes" / "sft" / "arithmetic.yaml"
SLICES = {"all": "eval/arithmetic/accuracy", "carry": "eval/arithmetic/accuracy[carry=True]",
          "no carry": "eval/arithmetic/accuracy[carry=False]"}  # fmt: skip


def teacher_outputs(teacher: Path, out: Path, max_new_tokens: int) -> Path:
    """The teacher's greedy completion of every train prompt, as SFT rows (prompt, completion)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data import load_source
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFGenerator

    prompts = load_source({"synthetic": "arithmetic", "split": "train"})["prompt"]
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    completions = HFGenerator(model, tokenizer, batch_size=512).generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": p, "completion": c[0]}) + "\n" for p, c in zip(prompts, completions)))
    return out


def run(recipe: Path, overrides: list[str]):
    from posttrain.registry import load_and_validate
    from posttrain.train import train_recipe

    return train_recipe(load_and_validate(recipe, overrides))


def one_seed(qs: Path, seed: int, out: Path) -> dict:
    import yaml

    teacher = qs / f"seed{seed}" / "grpo" / "final"
    summary = json.loads((qs / f"seed{seed}" / "summary.json").read_text())
    distill_raw = yaml.safe_load(DISTILL.read_text())
    student = json.dumps(distill_raw["model"]["tiny"]).replace('"', "")
    common = [f"seed={seed}", "eval.every_steps=null"]

    distill = run(DISTILL, [*common, f"algorithm.teacher={teacher}", f"output_dir={out / 'distill'}"])
    rows = teacher_outputs(teacher, out / "teacher_outputs.jsonl", distill_raw["rollout"]["max_new_tokens"])
    # SFT with the distill recipe's student and optimizer settings, on the teacher's outputs.
    training = distill_raw["training"]
    sft_common = [*common, f"model.tiny={student}", f"data.train={{path: {rows}}}",
                  f"training.learning_rate={training['learning_rate']}",
                  f"training.per_device_train_batch_size={training['per_device_train_batch_size']}",
                  f"training.warmup_steps={training['warmup_steps']}",
                  f"training.lr_scheduler_type={training['lr_scheduler_type']}"]  # fmt: skip
    pilot = run(SFT, [*sft_common, "training.max_steps=100", f"output_dir={out / 'sft_pilot'}", "eval.limit=10"])
    budget = distill.train_seconds
    steps = max(100, int(budget / (pilot.train_seconds / pilot.global_step)))
    sft = run(SFT, [*sft_common, f"training.max_steps={steps}", f"training.time_budget_s={budget:.1f}",
                    f"output_dir={out / 'sft'}", "name=sft-on-teacher-outputs"])  # fmt: skip
    return {
        "seed": seed,
        "teacher": summary["accuracy"]["SFT → GRPO"],
        "distill": {**distill.after, "seconds": distill.train_seconds, "steps": distill.global_step},
        "sft": {**sft.after, "seconds": sft.train_seconds, "steps": sft.global_step, "planned_steps": steps},
    }


def cell(metrics: dict) -> str:
    return f"{metrics[SLICES['all']]:.1%} ({metrics[SLICES['carry']]:.1%} / {metrics[SLICES['no carry']]:.1%})"


def table(results: list[dict]) -> str:
    lines = ["| seed | teacher: quickstart GRPO (carry / no carry) | (a) distill (carry / no carry) | steps, train s "
             "| (b) SFT on teacher outputs (carry / no carry) | steps, train s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        a, b = r["distill"], r["sft"]
        lines.append(f"| {r['seed']} | {cell(r['teacher'])} | {cell(a)} | {a['steps']}, {a['seconds']:.0f} s "
                     f"| {cell(b)} | {b['steps']}, {b['seconds']:.0f} s |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qs", type=Path, required=True, help="dir with the quickstart runs, QS/seedN/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("runs/distill-exp"))
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        begin = time.monotonic()
        results.append(one_seed(args.qs, seed, args.out / f"seed{seed}"))
        print(f"seed {seed}: {time.monotonic() - begin:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
