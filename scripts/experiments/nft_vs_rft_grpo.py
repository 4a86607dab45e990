"""NFT vs RFT vs Dr. GRPO vs NFT-on-negatives-only on the tiny arithmetic task, several seeds, same budget.

Per setting and seed: SFT warm start on the imperfect demonstrations (recipes/sft/arithmetic.yaml), then each arm
from that SFT model for the same number of steps with the same prompts per step. Writes a table (mean ± sd over
seeds of the final held-out accuracy, overall/carry/no-carry) and a held-out accuracy curve plot to --out, and
a markdown summary to print into docs/nft.md.

    python scripts/experiments/nft_vs_rft_grpo.py --seeds 0 1 2 --settings main hard --out runs/nft_experiment

Settings: `main` = the quickstart's (half of the carry demonstrations drop the carry); `hard` = 90% dropped, where
correct carry samples are rare and no method saturates within the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"main": {"carry_drop": 0.5}, "hard": {"carry_drop": 0.9}}
ARMS = {
    "Dr. GRPO": ("grpo/arithmetic.yaml", ["algorithm.loss_type=dr_grpo", "algorithm.scale_rewards=none"]),
    "NFT": ("nft/quickstart.yaml", []),
    "RFT": ("rft/quickstart.yaml", []),
    "NFT negatives only": ("nft/quickstart.yaml", ["algorithm.positives=false"]),
}
# `--ablations`: why NFT does not beat RFT here (run on the settings given, same SFT models as the main arms).
# lr: is NFT's smaller step (omega = 1 - r_hat <= 1) the gap?  sqrt: the GRPO-equivalent weight.  masked: does RFT
# gain from SFT on all-correct groups, which NFT masks?  mu=2: two optimizer steps per rollout batch, where NFT
# leaves the on-policy regime (its negative-term clip can act) -- compared with RFT given the same reuse.
ABLATIONS = {
    "NFT lr 1e-4": ("nft/quickstart.yaml", ["training.learning_rate=1e-4"]),
    "NFT omega sqrt": ("nft/quickstart.yaml", ["algorithm.weight=sqrt"]),
    "RFT masked": ("rft/quickstart.yaml", ["algorithm.mask_uninformative=true"]),
    "NFT mu=2": ("nft/quickstart.yaml", ["algorithm.num_iterations=2", "MU2"]),
    "RFT mu=2": ("rft/quickstart.yaml", ["algorithm.num_iterations=2", "MU2"]),
}
KEYS = ("eval/arithmetic/accuracy", "eval/arithmetic/accuracy[carry=True]", "eval/arithmetic/accuracy[carry=False]")


def data_overrides(setting: str) -> list[str]:
    drop = SETTINGS[setting]["carry_drop"]
    return [f"data.train.carry_drop={drop}"]


def run(recipe: str, out: Path, overrides: list[str]):
    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.runs import RunDir
    from posttrain.train import train_recipe

    if (out / "final" / "config.json").exists():  # finished earlier: the script is resumable arm by arm
        return RunDir(out).read_metrics()
    train_recipe(load_recipe(REPO / "recipes" / recipe, [*overrides, f"output_dir={out}"]))
    return RunDir(out).read_metrics()


def curve(records: list[dict], mu: int = 1) -> list[tuple[int, float]]:
    """Held-out accuracy against rollout batches (= optimizer steps / mu)."""
    return sorted({r["step"] // mu: r[KEYS[0]] for r in records if KEYS[0] in r}.items())


def final(records: list[dict]) -> dict[str, float]:
    after = [r for r in records if str(r.get("stage", "")).endswith(":after")]
    return {k: after[-1][k] for k in KEYS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=["main", "hard"], choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", default="runs/nft_experiment")
    parser.add_argument("--ablations", action="store_true", help="also run the ABLATIONS arms")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (names as in ARMS/ABLATIONS)")
    args = parser.parse_args()
    out = Path(args.out)
    results: dict = {}
    start = time.monotonic()
    for setting in args.settings:
        for seed in args.seeds:
            base = [f"seed={seed}", *data_overrides(setting)]
            sft_dir = out / setting / f"seed{seed}" / "sft"
            sft = run("sft/arithmetic.yaml", sft_dir, base)
            results.setdefault(setting, {}).setdefault("SFT", {})[seed] = {"final": final(sft), "curve": []}
            arms = {**ARMS, **(ABLATIONS if args.ablations else {})}
            if args.arms:
                unknown = [a for a in args.arms if a not in {**ARMS, **ABLATIONS}]
                if unknown:
                    parser.error(f"unknown arm {unknown[0]!r}; arms: {', '.join({**ARMS, **ABLATIONS})}")
                arms = {a: {**ARMS, **ABLATIONS}[a] for a in args.arms}
            for arm, (recipe, extra) in arms.items():
                arm_dir = out / setting / f"seed{seed}" / arm.lower().replace(" ", "_").replace(".", "")
                # mu=2 arms take two optimizer steps per rollout batch: same number of rollouts = twice the steps.
                mu = 2 if "MU2" in extra else 1
                extra = [e for e in extra if e != "MU2"]
                overrides = [*base, *extra, f"model.path={sft_dir / 'final'}", f"training.max_steps={args.steps * mu}",
                             f"eval.every_steps={20 * mu}", "training.save_steps=1000"]  # fmt: skip
                records = run(recipe, arm_dir, overrides)
                results[setting].setdefault(arm, {})[seed] = {"final": final(records), "curve": curve(records, mu)}
            print(f"[{time.monotonic() - start:.0f}s] {setting} seed {seed} done", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(summary(results, args))
    plot(results, out / "nft_curves.png")


def summary(results: dict, args) -> str:
    lines = [f"seeds {args.seeds}, {args.steps} rollout batches per arm, 48 prompts x 8 samples per step; final held-out "
             "greedy accuracy, mean ± sd over seeds (per-seed values in brackets)", ""]  # fmt: skip
    for setting, arms in results.items():
        lines += [f"**{setting}** ({SETTINGS[setting]['carry_drop']:.0%} of carry demonstrations drop the carry)", "",
                  "| arm | all | carry | no carry |", "|---|---|---|---|"]  # fmt: skip
        for arm, seeds in arms.items():
            cells = []
            for key in KEYS:
                vals = [s["final"][key] for s in seeds.values()]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f} [{', '.join(f'{v:.3f}' for v in vals)}]")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (setting, arms) in zip(axes[0], results.items()):
        for arm, seeds in arms.items():
            curves = [s["curve"] for s in seeds.values() if s["curve"]]
            if not curves:
                continue
            steps = [p[0] for p in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, marker=".", label=arm)
        ax.set_title(f"{setting}: held-out accuracy (mean over seeds)", fontsize=10)
        ax.set_xlabel("rollout batch (= optimizer step, except mu=2 arms)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
