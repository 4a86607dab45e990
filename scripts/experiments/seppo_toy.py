"""SePPO vs its baselines on the coloured-squares toy (issue 6), several seeds, the same budget per arm.

Per seed: pretrain a pixel-space base (16x16, UNet channels (32, 64)) on a 30/70 saturated/dull mix so that it
mostly draws dull squares; then from that base train each arm for the same number of updates and batch:
SFT on winners, SePPO (uniform reference, AAF), SePPO without AAF, the indicator variant, SePPO with reference =
initial and = latest, and Diffusion-DPO on real (saturated, dull) pairs. Each model, and the base, draws the same
seeded evaluation images (same prompts, same initial noise); metrics: mean analytic saturation reward, win rate
against the base's image for the same prompt and noise (ties count half), and the AAF flip rate over training.

    python scripts/experiments/seppo_toy.py --seeds 0 1 2 --out runs/seppo_toy

Resumable arm by arm: an arm (or base) whose run dir has a finished final/ is not trained again, and its eval is
cached in <arm>/eval.json. Writes results.json, results.md (mean ± sd over seeds, per-seed values) and
seppo_toy.png (saturation per arm; flip rate curves) and seppo_toy_samples.png (evaluation samples of seed
SEEDS[0], one row per model) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import posttrain  # noqa: F401  (OMP_WAIT_POLICY before torch)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "seppo" / "toy_colors.yaml"
ARMS = {
    "SFT on winners": {"variant": "sft_winner"},
    "SePPO (uniform, AAF)": {"variant": "seppo", "reference": "uniform"},
    "SePPO no AAF": {"variant": "seppo_no_aaf", "reference": "uniform"},
    "SePPO indicator": {"variant": "seppo_indicator", "reference": "uniform"},
    "SePPO ref=initial": {"variant": "seppo", "reference": "initial"},
    "SePPO ref=latest": {"variant": "seppo", "reference": "latest"},
    "Diffusion-DPO (real pairs)": {"variant": "diffusion_dpo"},
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def finished(run_dir: Path) -> bool:
    return (run_dir / "final" / "unet" / "config.json").exists()


def train(recipe: dict, run_dir: Path) -> float:
    """Train `recipe` into `run_dir` unless it finished earlier; the seconds training took (recorded beside it)."""
    import yaml

    from posttrain.registry import load_and_validate as load_recipe
    from posttrain.train import train_recipe

    seconds_file = run_dir.parent / f"{run_dir.name}.seconds"
    if finished(run_dir):
        return float(seconds_file.read_text()) if seconds_file.exists() else 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(run_dir)}, sort_keys=False))
    start = time.monotonic()
    train_recipe(load_recipe(path))
    seconds = time.monotonic() - start
    seconds_file.write_text(f"{seconds:.1f}")
    return seconds


def write_pretrain_data(folder: Path, n: int, seed: int) -> None:
    """The base's data: `n` prompt/image pairs, 30% saturated squares and 70% dull ones, as PNG + caption files."""
    from posttrain.data.toy_images import toy_pretrain_rows
    from reward_models.image import to_pil

    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rows = toy_pretrain_rows(n, win_fraction=0.3, seed=seed, resolution=16)
    for i, row in enumerate(rows):
        to_pil(row.winner.unsqueeze(0))[0].save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(row.prompt)
    (folder / "done").write_text(str(n))


def set_clip_sample(model: Path, value: bool) -> None:
    """Set DDPM's x0 clipping to [-1, 1] in a pipeline dir's scheduler config. The tiny pixel stack clips by default
    (posttrain.models.tiny_diffusion: without it DDIM draws saturated noise that the saturation reward scores as colourful);
    --no-clip-sample turns it off to reproduce that. The arms copy the base's scheduler dir, so they inherit it."""
    path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    if bool(config.get("clip_sample")) != value:
        path.write_text(json.dumps({**config, "clip_sample": value}, indent=1))


def base_recipe(args, seed: int, data: Path, init: Path | None, steps: int, lr: float) -> dict:
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.pop("eval", None)  # the script evaluates every model itself, on its own images
    recipe["name"] = f"seppo-toy-base-s{seed}"
    recipe["seed"] = seed
    # The script pretrains its bases itself (two phases, on PNG data): the recipe's own base pretraining is left out.
    tiny = {k: v for k, v in recipe["model"]["tiny"].items() if k != "pretrain"}
    recipe["model"]["tiny"] = {**tiny, "seed": seed}
    if init is not None:  # continue pretraining a base trained earlier
        recipe["model"] = {"path": str(Path(init).resolve())}
    recipe["data"]["train"] = {"path": str(data), "format": "prompt_images"}
    recipe["algorithm"].update(variant="sft_winner", num_stages=1, updates_per_stage=steps)
    recipe["training"].update(learning_rate=lr, per_device_train_batch_size=32)
    return recipe


def arm_recipe(args, seed: int, base: Path, arm: dict) -> dict:
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.pop("eval", None)
    recipe["name"] = f"seppo-toy-{arm['variant']}-s{seed}"
    recipe["seed"] = seed
    recipe["model"] = {"path": str(base)}
    recipe["data"]["train"] = {"synthetic": "toy_colors", "n": 2048, "seed": seed}
    recipe["algorithm"].update(
        beta=args.beta, num_stages=args.stages, updates_per_stage=args.updates, sample_steps=args.sample_steps,
        guidance_scale=args.cfg, **arm,
    )  # fmt: skip
    recipe["training"].update(learning_rate=args.lr, per_device_train_batch_size=args.batch)
    return recipe


def evaluate(model: Path, args, cache: Path) -> list[float]:
    """Per-image saturation of the model's evaluation images (cached: the noise is fixed, so is the result)."""
    if cache.exists():
        return json.loads(cache.read_text())["scores"]
    from posttrain.models.diffusion import load_stack
    from posttrain.rollout.diffusion import sample_images
    from reward_models.image import image_scorer

    prompts = eval_prompts(args)
    images = sample_images(load_stack(model), prompts, args.eval_steps, args.cfg, seed=args.eval_seed, batch_size=64)
    scores = image_scorer("saturation").score(images, prompts)
    cache.write_text(json.dumps({"prompts": prompts, "scores": scores}))
    return scores


def eval_prompts(args) -> list[str]:
    return [c for c in ("red", "green", "blue") for _ in range(args.eval_per_color)]


def flip_curve(run_dir: Path) -> list[float]:
    from posttrain.runs import RunDir

    values = [r.get("flip_rate") for r in RunDir(run_dir).read_metrics()]
    values = [v for v in values if isinstance(v, float) and v == v]  # None/NaN: variants without a flipper
    return values


def base_dir(args, seed: int) -> Path:
    out = Path(args.out)
    return out / "base" if args.shared_base else out / f"seed{seed}" / "base"


def base_seed(args, seed: int) -> int:
    return args.seeds[0] if args.shared_base else seed


def build_base(args, seed: int) -> float:
    """Pretrain the seed's base: `--base-steps` updates at `--base-lr`, then `--anneal-steps` at `--anneal-lr`
    (continued from the first phase with a fresh optimizer). Returns the seconds spent over both phases."""
    base, own_seed = base_dir(args, seed), base_seed(args, seed)
    data = base.parent / "pretrain_data"
    write_pretrain_data(data, 2048, own_seed)
    init = Path(args.base_init) if args.base_init else None
    seconds = 0.0
    if args.anneal_steps:
        warm = base.parent / "base_warm"
        seconds += train(base_recipe(args, own_seed, data, init, args.base_steps, args.base_lr), warm)
        seconds += train(base_recipe(args, own_seed, data, warm / "final", args.anneal_steps, args.anneal_lr), base)
    else:
        seconds += train(base_recipe(args, own_seed, data, init, args.base_steps, args.base_lr), base)
    set_clip_sample(base / "final", args.clip_sample)
    evaluate(base / "final", args, base / "eval.json")
    return seconds


def run_task(args, seed: int, arm: str | None) -> None:
    """One unit of work (a base, or one arm of one seed), runnable in a worker process."""
    import torch

    torch.set_num_threads(args.threads)
    if arm is None:
        build_base(args, seed)
        return
    arm_dir = Path(args.out) / f"seed{seed}" / slug(arm)
    train(arm_recipe(args, seed, base_dir(args, seed) / "final", ARMS[arm]), arm_dir)
    evaluate(arm_dir / "final", args, arm_dir / "eval.json")


def run_parallel(args) -> None:
    """Run bases and arms in `--jobs` worker processes (one torch thread each): a seed's arms start once its base is
    finished. On 2 vCPUs two single-threaded workers do about twice the work of one process in the same time."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    base_seeds = args.seeds[:1] if args.shared_base else args.seeds
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(run_task, args, seed, None): (seed, None) for seed in base_seeds}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                seed, arm = pending.pop(future)
                future.result()  # a worker's error stops the run here
                if arm is not None:
                    continue
                for s in args.seeds if args.shared_base else [seed]:  # the base is ready: queue its arms
                    pending.update({pool.submit(run_task, args, s, name): (s, name) for name in args.arms})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="runs/seppo_toy")
    parser.add_argument("--base-steps", type=int, default=800, help="base pretraining updates (batch 32)")
    parser.add_argument("--base-lr", type=float, default=1e-3)
    parser.add_argument("--anneal-steps", type=int, default=200, help="then this many base updates at --anneal-lr")
    parser.add_argument("--anneal-lr", type=float, default=1e-4)
    parser.add_argument("--base-init", default=None, help="start the base from this pipeline dir (not from scratch)")
    parser.add_argument(
        "--shared-base", action="store_true", help="pretrain one base (seed of the first --seeds) for all seeds"
    )
    parser.add_argument("--stages", type=int, default=4, help="K stages per arm")
    parser.add_argument("--updates", type=int, default=6, help="M updates per stage")
    parser.add_argument("--batch", type=int, default=16, help="prompts per update")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=2000.0)
    parser.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the reference samples")
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument(
        "--no-clip-sample",
        dest="clip_sample",
        action="store_false",
        help="turn off x0 clipping in the base's scheduler",
    )
    parser.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of the evaluation images")
    parser.add_argument("--eval-per-color", type=int, default=20)
    parser.add_argument("--eval-seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest on 2 vCPUs)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes for bases and arms (1: in this process)")
    args = parser.parse_args()
    import torch

    from posttrain.evaluation.diffusion import mean_ci, win_rates

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    if args.jobs > 1:
        run_parallel(args)  # everything below then finds finished runs and cached evals
    results: dict = {"settings": vars(args), "seeds": {}}
    for seed in args.seeds:
        seconds = build_base(args, seed)
        base_scores = evaluate(base_dir(args, seed) / "final", args, base_dir(args, seed) / "eval.json")
        per_seed = {"base": {"saturation": mean_ci(base_scores)["mean"], "win_rate": 0.5, "train_s": seconds}}
        print(f"[{time.monotonic() - start:.0f}s] seed {seed} base: saturation {per_seed['base']['saturation']:.3f} "
              f"({seconds:.0f}s)", flush=True)  # fmt: skip
        for name in args.arms:
            arm_dir = out / f"seed{seed}" / slug(name)
            seconds = train(arm_recipe(args, seed, base_dir(args, seed) / "final", ARMS[name]), arm_dir)
            scores = evaluate(arm_dir / "final", args, arm_dir / "eval.json")
            per_seed[name] = {
                "saturation": mean_ci(scores)["mean"], "win_rate": mean_ci(win_rates(scores, base_scores))["mean"],
                "flip_rate": flip_curve(arm_dir), "train_s": seconds,
            }  # fmt: skip
            print(f"[{time.monotonic() - start:.0f}s] seed {seed} {name}: saturation {per_seed[name]['saturation']:.3f}"
                  f" win {per_seed[name]['win_rate']:.3f} ({seconds:.0f}s)", flush=True)  # fmt: skip
        results["seeds"][str(seed)] = per_seed
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results["wall_s"] = time.monotonic() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = summary(results)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot(results, out / "seppo_toy.png")
    sample_grid(args, args.seeds[0], out / "seppo_toy_samples.png")


def summary(results: dict) -> str:
    s = results["settings"]
    seeds = list(results["seeds"])
    lines = [
        f"seeds {', '.join(seeds)}; base {s['base_steps']} updates x 32 at lr {s['base_lr']:g}"
        f"{' + ' + str(s['anneal_steps']) + ' at lr ' + format(s['anneal_lr'], 'g') if s.get('anneal_steps') else ''} on a 30/70 "
        f"saturated/dull mix{' (continued from ' + s['base_init'] + ')' if s.get('base_init') else ''}"
        f"{', one base for all seeds' if s.get('shared_base') else ''} (a base found finished is not retrained); each arm {s['stages']} stages x {s['updates']} updates x {s['batch']} prompts, lr "
        f"{s['lr']:g}, beta {s['beta']:g}, reference samples DDIM {s['sample_steps']} steps, CFG {s['cfg']:g}; eval "
        f"{3 * s['eval_per_color']} images, DDIM {s['eval_steps']} steps (same noise for every model). Mean ± sd over seeds [per seed].",
        "",
        "| arm | saturation | win rate vs base | final flip rate | train s/seed |",
        "|---|---|---|---|---|",
    ]
    arms = list(next(iter(results["seeds"].values())))
    for arm in arms:
        rows = [results["seeds"][k][arm] for k in seeds if arm in results["seeds"][k]]
        cells = [_cell([r["saturation"] for r in rows]), _cell([r["win_rate"] for r in rows])]
        flips = [statistics.mean(r["flip_rate"][-s["updates"] :]) for r in rows if r.get("flip_rate")]
        cells.append(_cell(flips) if flips else "–")
        cells.append(f"{statistics.mean(r['train_s'] for r in rows):.0f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    if "wall_s" in results:
        lines += ["", f"wall time {results['wall_s'] / 60:.1f} min (this invocation; resumed arms count 0)"]
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} [{', '.join(f'{v:.2f}' for v in values)}]"


def sample_grid(args, seed: int, path: Path, per_color: int = 4) -> None:
    """The first `per_color` evaluation images per colour of the base and every arm of `seed` (the same noise in each
    column), one labelled row per model: what the saturation numbers summarise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.models.diffusion import load_stack
    from posttrain.rollout.diffusion import sample_images
    from reward_models.image import image_grid

    prompts = eval_prompts(args)
    shown = [c * args.eval_per_color + i for c in range(3) for i in range(min(per_color, args.eval_per_color))]
    models = {"base": base_dir(args, seed) / "final"}
    models.update({name: Path(args.out) / f"seed{seed}" / slug(name) / "final" for name in args.arms})
    fig, axes = plt.subplots(len(models), 1, figsize=(1.0 * len(shown), 1.05 * len(models)), squeeze=False)
    for ax, (name, model) in zip(axes[:, 0], models.items()):
        images = sample_images(
            load_stack(model), prompts, args.eval_steps, args.cfg, seed=args.eval_seed, batch_size=64
        )
        ax.imshow(image_grid([images[shown]], min_cell=48))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title(f"seed {seed}: evaluation samples (columns: same prompt and noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(results["seeds"].values())
    arms = list(seeds[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, arm in enumerate(arms):
        values = [s[arm]["saturation"] for s in seeds if arm in s]
        left.bar(i, statistics.mean(values), color="grey" if arm == "base" else "C0", alpha=0.6)
        left.scatter([i] * len(values), values, color="k", s=10, zorder=3)
    left.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
    left.set_ylabel("mean saturation reward (dots: seeds)")
    left.set_title("saturation of evaluation samples", fontsize=10)
    for arm in arms:
        curves = [s[arm].get("flip_rate") for s in seeds if arm in s and s[arm].get("flip_rate")]
        if not curves or arm.startswith(("SFT", "Diffusion-DPO")) or "no AAF" in arm:
            continue
        n = min(len(c) for c in curves)
        right.plot(range(1, n + 1), [statistics.mean(c[j] for c in curves) for j in range(n)], label=arm)
    right.set_xlabel("update")
    right.set_ylabel("AAF flip rate (mean over seeds)")
    right.set_title("share of reference samples imitated (s = -1, or 0 for the indicator)", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
