"""NFT vs RFT vs Dr. GRPO vs NFT-on-negatives-only on the tiny arithmetic task, several seeds, same budget.

Per setting and seed: SFT warm start on the imperfect demonstrations (recipes/sft/arithmetic.yaml), then each arm
from that SFT model for the same number of steps with the same prompts per step. Writes a table (mean ± sd over
seeds of the final held-out accuracy, overall/carry/no-carry) and a held-out accuracy curve plot to --out, and
a markdown summary to print into docs/nft.md.

    python scripts/experiments/nft_vs_rft_grpo.py --seeds 0 1 2 --settings main hard --out runs/nft_experiment

Settings: `main` = the quickstart's (half of the carry demonstrations drop the carry); `hard` = 90% dropped, where
correct carry samples are rare and no method saturates within the budget; `hard3` = `hard` on 3-digit operands.

The paper's regime, several optimizer steps per generation with dynamic sampling (`--mu`):

    python scripts/experiments/nft_vs_rft_grpo.py --seeds 0 1 2 --settings hard hard3 --mu 2 4 8 \
        --out runs/nft_offpolicy

Every arm then takes the same number of optimizer steps of the same size (48 prompts x 8 samples each); one
generation of 48·mu prompts feeds mu of them (pi_old's log-probs recomputed, so ratios leave 1 and the clips can
bind), and groups whose rewards do not vary are dropped and regenerated. Same optimizer steps and same kept samples
in every arm; what differs is how stale the samples are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"main": {"carry_drop": 0.5}, "hard": {"carry_drop": 0.9}, "hard3": {"carry_drop": 0.9, "digits": 3}}
ARMS = {
    "Dr. GRPO": ("grpo/arithmetic.yaml", ["algorithm.loss_type=dr_grpo", "algorithm.scale_rewards=none"]),
    "NFT": ("nft/quickstart.yaml", []),
    "RFT": ("rft/quickstart.yaml", []),
    "NFT negatives only": ("nft/quickstart.yaml", ["algorithm.positives=false"]),
}
# `--mu`: the four methods of the paper's comparison; GRPO is TRL's original loss (per-sequence mean, std-scaled).
OFFPOLICY_ARMS = {
    "Dr. GRPO": ARMS["Dr. GRPO"],
    "GRPO": ("grpo/arithmetic.yaml", ["algorithm.loss_type=grpo"]),
    "NFT": ARMS["NFT"],
    "RFT": ARMS["RFT"],
}
# `--mu ... --ablations`: is NFT's gap to RFT its smaller weight omega = 1 - r_hat (RFT's is 1), not the negatives?
OFFPOLICY_ABLATIONS = {"NFT omega=1": ("nft/quickstart.yaml", ["algorithm.weight=one"])}
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
    opts = SETTINGS[setting]
    out = [f"data.train.carry_drop={opts['carry_drop']}"]
    if "digits" in opts:  # 3-digit: 648k training pairs; 100k of them are plenty for the budgets here
        out += [f"data.train.digits={opts['digits']}", "data.train.n=100000", f"data.eval.digits={opts['digits']}"]
    return out


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
    parser.add_argument("--mu", type=int, nargs="+", default=None,
                        help="optimizer steps per generation, dynamic sampling on: the OFFPOLICY_ARMS at each mu")  # fmt: skip
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="with --mu: every arm at each of these learning rates (default: each recipe's 5e-5); "
                             "the summary then picks each arm's best lr by its mean over seeds")  # fmt: skip
    args = parser.parse_args()
    if args.mu:
        return offpolicy(args)
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


def offpolicy(args) -> None:
    """The `--mu` sweep: every OFFPOLICY_ARMS arm at each mu, dynamic sampling on, same optimizer steps."""
    out = Path(args.out)
    results: dict = {}
    start = time.monotonic()
    for setting in args.settings:
        for seed in args.seeds:
            base = [f"seed={seed}", *data_overrides(setting)]
            sft_dir = out / setting / f"seed{seed}" / "sft"
            sft = run("sft/arithmetic.yaml", sft_dir, base)
            results.setdefault(setting, {}).setdefault("SFT", {})[seed] = {"final": final(sft), "curve": []}
            for mu, lr in [(mu, lr) for mu in args.mu for lr in (args.lrs or [None])]:
                arms = {**OFFPOLICY_ARMS, **(OFFPOLICY_ABLATIONS if args.ablations else {})}
                for arm, (recipe, extra) in arms.items():
                    if args.arms and arm not in args.arms:
                        continue
                    name = f"{arm.lower().replace(' ', '_').replace('.', '').replace('=', '')}_mu{mu}"
                    lr_extra = [] if lr is None else [f"training.learning_rate={lr}"]
                    overrides = [*base, *extra, *lr_extra, f"model.path={sft_dir / 'final'}",
                                 f"training.max_steps={args.steps}", f"algorithm.steps_per_generation={mu}",
                                 "algorithm.dynamic_sampling=true", "eval.every_steps=20", "training.save_steps=1000"]  # fmt: skip
                    label = f"{arm} mu={mu}" + ("" if lr is None else f" lr={lr:g}")
                    t0 = time.monotonic()
                    records = run(recipe, out / setting / f"seed{seed}" / (name + ("" if lr is None else f"_lr{lr:g}")),
                                  overrides)  # fmt: skip
                    entry = {"final": final(records), "curve": curve(records), "stats": dynamic_stats(records),
                             "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
                    results[setting].setdefault(label, {})[seed] = entry
                    print(f"[{time.monotonic() - start:.0f}s] {setting} seed {seed} {label}: "
                          f"{entry['final'][KEYS[0]]:.3f}", flush=True)  # fmt: skip
                    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(summary(results, args))
    print(stats_table(results))
    if args.lrs:
        print(lr_sweep_tables(results))
    plot_offpolicy(results, args.mu, out / "nft_offpolicy_curves.png")


def best_lrs(results: dict) -> dict[str, dict[str, str]]:
    """Per setting, per arm (name and mu): the run label whose mean final held-out accuracy over seeds is highest."""
    best: dict[str, dict[str, str]] = {}
    for setting, arms in results.items():
        for label, seeds in arms.items():
            if " lr=" not in label:
                continue
            arm = label.split(" lr=")[0]
            mean = statistics.mean(s["final"][KEYS[0]] for s in seeds.values())
            held = best.setdefault(setting, {}).get(arm)
            if held is None or mean > statistics.mean(s["final"][KEYS[0]] for s in arms[held].values()):
                best[setting][arm] = label
    return best


def lr_sweep_tables(results: dict) -> str:
    """The lr x arm grid of mean final accuracy, then each arm at its best lr and the paired per-seed differences."""
    lines = []
    best = best_lrs(results)
    for setting, arms in results.items():
        labels = [label for label in arms if " lr=" in label]
        lrs = sorted({float(label.split(" lr=")[1]) for label in labels})
        names = list(dict.fromkeys(label.split(" lr=")[0] for label in labels))
        lines += [f"**{setting}**: mean held-out accuracy over seeds, per lr (best per arm in bold)", "",
                  "| arm | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]  # fmt: skip
        for name in names:
            cells = []
            for lr in lrs:
                seeds = arms.get(f"{name} lr={lr:g}", {})
                cell = f"{statistics.mean(s['final'][KEYS[0]] for s in seeds.values()):.3f}" if seeds else "–"
                cells.append(f"**{cell}**" if best[setting].get(name) == f"{name} lr={lr:g}" else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| arm at its best lr | all | carry | no carry |", "|---|---|---|---|"]
        for name in names:
            seeds = arms[best[setting][name]]
            cells = []
            for key in KEYS:
                vals = [s["final"][key] for s in seeds.values()]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.3f} ± {sd:.3f} [{', '.join(f'{v:.3f}' for v in vals)}]")
            lines.append(f"| {best[setting][name]} | " + " | ".join(cells) + " |")
        lines += ["", "| paired per-seed difference (each at its best lr) | mean ± sd | per seed | seeds ahead |",
                  "|---|---|---|---|"]  # fmt: skip
        nft = [n for n in names if n.startswith("NFT")]
        for a in nft:
            for b in [n for n in names if n not in nft]:
                sa, sb = arms[best[setting][a]], arms[best[setting][b]]
                diffs = [sa[k]["final"][KEYS[0]] - sb[k]["final"][KEYS[0]] for k in sa if k in sb]
                sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                lines.append(f"| {a} − {b} | {statistics.mean(diffs):+.3f} ± {sd:.3f} | "
                             f"{', '.join(f'{d:+.3f}' for d in diffs)} | {sum(d > 0 for d in diffs)} of {len(diffs)} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_offpolicy(results: dict, mus: list[int], path: Path) -> None:
    """One panel per (setting, mu): held-out accuracy against optimizer steps, one line per arm (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), len(mus), figsize=(4.2 * len(mus), 3.4 * len(results)), squeeze=False)
    best = best_lrs(results)
    for row, (setting, arms) in zip(axes, results.items()):
        for ax, mu in zip(row, mus):
            for arm in {**OFFPOLICY_ARMS, **OFFPOLICY_ABLATIONS}:
                label = best.get(setting, {}).get(f"{arm} mu={mu}", f"{arm} mu={mu}")  # an lr sweep: its best lr
                plot_mean_curve(ax, arms.get(label, {}), label.replace(f" mu={mu}", ""))
            ax.set_title(f"{setting}, {mu} optimizer steps per generation", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylim(0.2, 1.0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dynamic_stats(records: list[dict]) -> dict[str, float]:
    """Means over logged steps of the dynamic-sampling and clip metrics that are present."""
    out = {}
    for key in ("dynamic_sampling/rounds", "dynamic_sampling/fill_rate", "dynamic_sampling/dropped_groups",
                "dynamic_sampling/kept_groups", "nft/neg_clip_frac", "clip_ratio/region_mean"):  # fmt: skip
        vals = [r[key] for r in records if key in r]
        if vals:
            out[key] = statistics.mean(vals)
    return out


def stats_table(results: dict) -> str:
    keys = sorted({k for arms in results.values() for seeds in arms.values() for s in seeds.values()
                   for k in s.get("stats", {})})  # fmt: skip
    lines = ["| setting | arm | " + " | ".join(keys) + " | minutes per run |", "|---|---|" + "---|" * (len(keys) + 1)]
    for setting, arms in results.items():
        for arm, seeds in arms.items():
            runs = [s for s in seeds.values() if "stats" in s]
            if not runs:
                continue
            cells = [f"{statistics.mean(r['stats'].get(k, float('nan')) for r in runs):.3f}" for k in keys]
            minutes = statistics.mean(r["seconds"] for r in runs) / 60
            lines.append(f"| {setting} | {arm} | " + " | ".join(cells) + f" | {minutes:.1f} |")
    return "\n".join(lines)


def summary(results: dict, args) -> str:
    budget = (f"{args.steps} optimizer steps per arm (mu of them per generation), dynamic sampling on" if args.mu
              else f"{args.steps} rollout batches per arm")  # fmt: skip
    lines = [f"seeds {args.seeds}, {budget}, 48 prompts x 8 samples per step; final held-out greedy accuracy, mean ± "
             "sd over seeds (per-seed values in brackets)", ""]  # fmt: skip
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


def plot_mean_curve(ax, seeds: dict, label: str) -> None:
    """One line: the held-out accuracy curve averaged over the seeds that have one."""
    curves = [s["curve"] for s in seeds.values() if s["curve"]]
    if curves:
        steps = [p[0] for p in curves[0]]
        ax.plot(steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))], marker=".", label=label)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (setting, arms) in zip(axes[0], results.items()):
        for arm, seeds in arms.items():
            plot_mean_curve(ax, seeds, arm)
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
