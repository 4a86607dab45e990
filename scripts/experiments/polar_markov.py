"""What limits the tiny POLAR RM on the Markov world: held-out pairwise accuracy and within-reference Spearman
against the number of training policies, the number of triplets, the model size and the step budget.

Every row trains `recipes/polar/quickstart.yaml` with overrides and is scored on the same held-out chains:
pairwise accuracy on 1,000 held-out triplets (training's own eval) and the mean within-reference Spearman with
the ideal reward (100 references x 16 candidates). Two ceilings are printed beside them, computed without any
training: the pool-knowing ideal reward, and the best scorer that, like the RM, sees only the reference (the
Bayes posterior predictive under the world's Dirichlet prior, `reference_bayes_score`).

    python scripts/experiments/polar_markov.py --out runs/polar_experiment            # the grid in GRID
    python scripts/experiments/polar_markov.py --only policies --out runs/polar_experiment

Rows already finished in --out are read back, so the script resumes row by row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "polar" / "quickstart.yaml"
QUICKSTART = {"policies": 12, "n": 20000, "hidden": 128, "layers": 2, "steps": 600, "lr": 1e-3, "batch": 32}
# Each group varies one factor from the quickstart's settings (or from the group's own base).
GRID = {
    "policies": [{"policies": p} for p in (12, 48, 200, 1000)],
    "data": [{"policies": 1000, "n": n} for n in (5000, 20000, 60000)],
    "steps": [{"policies": 1000, "n": 60000, "steps": s} for s in (600, 1500)],
    "model": [
        {"policies": 1000, "n": 60000, "steps": 1500, "hidden": h, "layers": n}
        for h, n in ((128, 2), (256, 2), (128, 4))
    ],
}


def overrides(cfg: dict, out: Path, seed: int) -> list[str]:
    hidden = cfg["hidden"]
    return [
        f"seed={seed}",
        f"output_dir={out}",
        f"data.train.policies={cfg['policies']}",
        f"data.train.n={cfg['n']}",
        f"model.tiny.hidden_size={hidden}",
        f"model.tiny.intermediate_size={2 * hidden}",
        f"model.tiny.num_layers={cfg['layers']}",
        f"training.max_steps={cfg['steps']}",
        f"training.learning_rate={cfg['lr']}",
        f"training.per_device_train_batch_size={cfg['batch']}",
        f"eval.every_steps={max(cfg['steps'] // 3, 1)}",
        f"training.save_steps={cfg['steps']}",
    ]


def train_row(cfg: dict, out: Path, seed: int) -> dict:
    from posttrain.data.markov import MarkovWorld, reference_spearman
    from posttrain.registry import load_and_validate
    from posttrain.train import train_recipe
    from reward_models.polar import PolarScorer

    done = out / "row.json"
    if done.exists():
        return json.loads(done.read_text())
    start, cpu = time.monotonic(), time.process_time()
    train_recipe(load_and_validate(RECIPE, overrides(cfg, out, seed)))
    seconds, cpu = time.monotonic() - start, time.process_time() - cpu
    after = json.loads((out / "eval" / "held_out.after.json").read_text())
    scorer = PolarScorer.from_pretrained(str(out / "final"), wrapper="pretrain", max_length=128,
                                         max_response_length=32, batch_size=64, device="cpu")  # fmt: skip
    rhos = reference_spearman(MarkovWorld(), scorer.score, split="heldout", n_refs=100)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = sorted({r["step"]: r["eval/polar/accuracy"] for r in records if "eval/polar/accuracy" in r}.items())
    row = {**cfg, "seed": seed, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
           "accuracy": after["eval/polar/accuracy"],
           "spearman": statistics.mean(rhos), "curve": curve}  # fmt: skip
    done.write_text(json.dumps(row))
    return row


def ceilings() -> dict[str, float]:
    """Accuracy and within-reference Spearman of the scorers that need no training, on the held-out chains."""
    from posttrain.data.markov import MarkovWorld, reference_bayes_score, reference_spearman

    world = MarkovWorld()
    rows = world.triplets("heldout", 1000, 0)  # the quickstart's eval rows (data.eval seed 0)

    def accuracy(score) -> float:
        chosen = score([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["reference"] for r in rows])
        rejected = score([r["prompt"] for r in rows], [r["rejected"] for r in rows], [r["reference"] for r in rows])
        return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)

    def bayes(prompts, cands, refs):
        return [reference_bayes_score(world, p, r, c) for p, c, r in zip(prompts, cands, refs)]

    ideal_acc = sum(world.ideal_reward(r["policy_a"], r["prompt"], r["chosen"])
                    > world.ideal_reward(r["policy_a"], r["prompt"], r["rejected"]) for r in rows) / len(rows)  # fmt: skip
    return {
        "ideal_accuracy": ideal_acc,
        "bayes_accuracy": accuracy(bayes),
        "bayes_spearman": statistics.mean(reference_spearman(world, bayes, split="heldout", n_refs=100)),
    }


def table(rows: list[dict], ceiling: dict[str, float]) -> str:
    lines = ["| group | policies | triplets | hidden x layers | steps x batch | held-out acc | Spearman | time |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        # CPU time of the run (other jobs shared the machine); rows run before it was recorded give wall time
        cpu = f"{r['cpu_seconds'] / 60:.1f} min CPU" if r.get("cpu_seconds") else f"{r['seconds'] / 60:.1f} min wall"
        lines.append(f"| {r['group']} | {r['policies']} | {r['n']} | {r['hidden']} x {r.get('layers', 2)} | "
                     f"{r['steps']} x {r.get('batch', 32)} | {r['accuracy']:.3f} | {r['spearman']:.2f} | "
                     f"{cpu} |")  # fmt: skip
    lines += ["", f"Ceilings on the same held-out chains: a scorer that sees only the reference (Bayes, Dirichlet "
              f"prior) {ceiling['bayes_accuracy']:.3f} accuracy and Spearman {ceiling['bayes_spearman']:.2f}; "
              f"the pool-knowing ideal reward {ceiling['ideal_accuracy']:.3f} accuracy (Spearman 1 by definition)."]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], ceiling: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = {"policies": "training policies", "data": "training triplets", "steps": "optimizer steps (2 layers)",
               "model": "hidden size x layers", "depth": "optimizer steps (4 layers)"}  # fmt: skip
    keys = {"policies": "policies", "data": "n", "model": "hidden", "steps": "steps", "depth": "steps"}
    groups = [g for g in factors if any(r["group"] == g for r in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        sel = sorted((r for r in rows if r["group"] == group), key=lambda r: (r[keys[group]], r.get("layers", 2)))
        xs = [r[keys[group]] for r in sel] if group != "model" else list(range(len(sel)))
        if group == "model":
            ax.set_xticks(xs, [f"{r['hidden']}x{r.get('layers', 2)}" for r in sel])
        ax.plot(xs, [r["accuracy"] for r in sel], marker="o", label="held-out pairwise accuracy")
        ax.plot(xs, [r["spearman"] for r in sel], marker="s", label="within-reference Spearman")
        ax.axhline(ceiling["bayes_accuracy"], ls="--", color="C0", alpha=0.5, label="reference-only Bayes acc")
        ax.axhline(ceiling["bayes_spearman"], ls="--", color="C1", alpha=0.5, label="reference-only Bayes Spearman")
        ax.axhline(0.9, ls=":", color="grey")
        ax.axhline(0.5, ls=":", color="grey")
        if group in ("policies", "data"):
            ax.set_xscale("log")
        ax.set_xlabel(factors[group])
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/polar_experiment")
    parser.add_argument("--only", nargs="+", choices=list(GRID), default=list(GRID))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="one more row, e.g. policies=1000 n=60000 steps=3000 lr=2e-3")  # fmt: skip
    parser.add_argument("--report", action="store_true", help="train nothing: table and plot of every row in --out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(out)
    configs = [(g, {**QUICKSTART, **c}) for g in args.only for c in GRID[g]]
    if args.extra:
        configs.append(("extra", {**QUICKSTART, **{k: float(v) if k == "lr" else int(v)
                                                  for k, v in (e.split("=", 1) for e in args.extra)}}))  # fmt: skip
    rows = []
    for group, cfg in configs:
        name = "_".join(
            f"{k}{v}" for k, v in cfg.items() if (k, v) not in (("layers", 2), ("batch", 32))
        )  # older rows: defaults
        row = train_row(cfg, out / f"{name}_seed{args.seed}", args.seed)
        rows.append({**row, "group": group})
        print(f"{group}: {name}: acc {row['accuracy']:.3f} spearman {row['spearman']:.2f} "
              f"({row['seconds']:.0f}s)", flush=True)  # fmt: skip
    ceiling = ceilings()
    (out / "results.json").write_text(json.dumps({"rows": rows, "ceilings": ceiling}, indent=1))
    print(table(rows, ceiling))
    plot(rows, ceiling, out / "polar_markov.png")


def report(out: Path) -> None:
    """Every finished row in `out` (the GRID's and any --extra ones), grouped as the GRID names them."""
    configs = {g: [json.dumps({**QUICKSTART, **c}, sort_keys=True) for c in cs] for g, cs in GRID.items()}
    rows = []
    for path in sorted(out.glob("*/row.json")):
        row = json.loads(path.read_text())
        cfg = {k: row.get(k, QUICKSTART[k]) for k in QUICKSTART}
        key = json.dumps(cfg, sort_keys=True)
        groups = [g for g, keys in configs.items() if key in keys]
        if cfg["layers"] == 4:
            groups.append("depth")  # 4 layers against steps: the rows that reach the targets
        for group in groups or ["extra"]:
            rows.append({**row, **cfg, "group": group})
    ceiling = ceilings()
    (out / "results.json").write_text(json.dumps({"rows": rows, "ceilings": ceiling}, indent=1))
    print(table(rows, ceiling))
    plot(rows, ceiling, out / "polar_markov.png")


if __name__ == "__main__":
    main()
