"""What holds the quickstart's GRPO at ~0.93 held-out: a one-factor-at-a-time sweep from the shipped recipe.

Per seed: the quickstart's SFT stage once (recipes/sft/arithmetic.yaml), then each GRPO variant from that SFT model
(recipes/grpo/arithmetic.yaml plus the variant's --set overrides), each as its own `posttrain train` process, one
at a time. Prints (and writes to --out/table.md) a markdown table: variant, seed, held-out accuracy after GRPO
(overall / carry / no-carry), the held-out curve every 20 steps, mean training reward over the last 20 steps, and
GRPO's training seconds (held-out evals during training included, model loading excluded).

    python scripts/experiments/quickstart_grpo_sweep.py --seeds 0 --out /tmp/qs-sweep            # the sweep
    python scripts/experiments/quickstart_grpo_sweep.py --seeds 1 --variants recipe "temperature 0.7" \
        --out /tmp/qs-sweep                                                                       # confirm once
    python scripts/experiments/quickstart_grpo_sweep.py --seeds 0 1 --table-only --out /tmp/qs-sweep

Resumable: a stage whose final/ exists is not run again. Seconds depend on what else shares the cores; compare
them only within one sweep (docs/quickstart.md says what the machine was doing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYS = ("eval/arithmetic/accuracy", "eval/arithmetic/accuracy[carry=True]", "eval/arithmetic/accuracy[carry=False]")

# One factor at a time from recipes/grpo/arithmetic.yaml (temperature 1.0, lr 5e-5 constant after 5 warm-up steps,
# 48 prompts x 8 samples = 384 completions per step, loss_type dapo, scale_rewards group, beta 0, 120 steps).
# Every variant keeps 384 completions per step and 120 steps, so each costs the recipe's wall time.
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "temperature 0.7": ["rollout.temperature=0.7"],
    "lr 2e-5": ["training.learning_rate=2e-5"],
    "lr cosine decay": ["training.lr_scheduler_type=cosine"],
    "24 prompts x 16": ["rollout.num_generations=16"],
    "96 prompts x 4": ["rollout.num_generations=4"],
    # TRL's dr_grpo differs from dapo only by a constant divisor (max_completion_length instead of the batch's
    # token count; here 5 vs ~4 tokens per answer), so Dr. GRPO's other half, no std scaling, is the factor.
    "Dr. GRPO (dr_grpo, scale none)": ["algorithm.loss_type=dr_grpo", "algorithm.scale_rewards=none"],
    "beta 0.04 (KL)": ["algorithm.beta=0.04"],
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", OMP_WAIT_POLICY="PASSIVE")
    return e


def train(recipe: str, out: Path, overrides: list[str]) -> None:
    if (out / "final" / "config.json").exists():
        return
    cmd = ["posttrain", "train", str(REPO / "recipes" / recipe), *(a for o in overrides for a in ("--set", o)),
           "--set", f"output_dir={out}"]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def slug(variant: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in variant.lower()).strip("-")


def read(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    after = next(r for r in reversed(records) if r.get("stage", "").endswith(":after"))
    curve = [r[KEYS[0]] for r in records if KEYS[0] in r and r.get("step") and ":" not in r.get("stage", "")]
    rewards = [r["reward"] for r in records if "reward" in r and r.get("step", 0) > after["step"] - 20]
    # Where the errors are: accuracy by the sum of the units digits (9: the largest without a carry; 10: the
    # smallest with one) against every other problem.
    by_sum: dict[str, list[bool]] = {"9": [], "10": [], "other": []}
    for sample in json.loads((run / "eval" / "arithmetic.after.json").read_text())["samples"]:
        a, b = (int(x) for x in sample["prompt"].rstrip("=").split("+"))
        units = a % 10 + b % 10
        by_sum[str(units) if units in (9, 10) else "other"].append(bool(sample["correct"]))
    report = (run / "report.md").read_text()
    seconds = float(report.split(" steps in ")[1].split(" s")[0])
    return {"after": [after[k] for k in KEYS], "curve": curve, "reward": sum(rewards) / max(len(rewards), 1),
            "seconds": seconds, "steps": after["step"],
            "by_sum": {k: sum(v) / max(len(v), 1) for k, v in by_sum.items()}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"from: {list(VARIANTS)}")
    p.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further override for a combined variant (its name is then 'VARIANT + KEY=VALUE')",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart_grpo_sweep"))
    p.add_argument("--table-only", action="store_true", help="tabulate the runs already under --out")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        sft = args.out / f"sft-s{seed}"
        if not args.table_only:
            train("sft/arithmetic.yaml", sft, [f"seed={seed}"])
        for variant in args.variants:
            name = " + ".join([variant, *args.extra])
            run = args.out / f"grpo-s{seed}-{slug(name)}"
            if not args.table_only:
                overrides = [f"seed={seed}", f"model.path={sft / 'final'}", *VARIANTS[variant], *args.extra]
                train("grpo/arithmetic.yaml", run, overrides)
            if (run / "report.md").exists():
                rows.append((name, seed, read(run)))
    lines = ["| variant | seed | held-out | carry | no-carry | units sum 9 / 10 / other | held-out every 20 steps "
             "| reward (last 20 steps) | GRPO train s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, seed, r in rows:
        a, c, n = r["after"]
        curve = " ".join(f"{x:.3f}" for x in r["curve"])
        units = " / ".join(f"{r['by_sum'][k]:.2f}" for k in ("9", "10", "other"))
        lines.append(f"| {name} | {seed} | {a:.3f} | {c:.3f} | {n:.3f} | {units} | {curve} | {r['reward']:.3f} "
                     f"| {r['seconds']:.0f} |")  # fmt: skip
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
