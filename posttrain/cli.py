"""Command line: `posttrain train|quickstart|recipes|rewards|tiny-model` (also `python -m posttrain`).

Works unchanged under `accelerate launch -m posttrain train RECIPE`: the trainers take their process layout from
accelerate's environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import posttrain  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)
from posttrain.errors import PosttrainError
from posttrain.recipe import BACKENDS


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except PosttrainError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count, a size, a limit)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a seed)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def memory_size(text: str) -> str:
    """argparse type: a memory size such as 80GiB."""
    from posttrain.models.memory import parse_size

    try:
        parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set training.learning_rate=1e-5 (repeatable)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe and plan only")
    p.add_argument("--gpu-memory", default="80GiB", type=memory_size,
                   help="device size the --dry-run memory plan assumes (default 80GiB)")  # fmt: skip
    p.add_argument("--accelerate-config", default=None, metavar="YAML",
                   help="accelerate config for the memory plan and --rehearse (default: the recipe's accelerate_config)")  # fmt: skip
    p.add_argument("--rehearse", action="store_true", help="2 steps on 2 CPU processes with tiny stand-ins (docs/rehearse.md)")  # fmt: skip
    p.add_argument("--rehearse-dir", default=None, metavar="DIR", help="default runs/rehearsal/<recipe name>")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("quickstart", help="SFT then GRPO on a tiny CPU model: RL fixing what imitation got wrong")
    p.add_argument("--out", default=None, help="output dir (default runs/quickstart, runs/quickstart-tools)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--task", choices=("arithmetic", "tools"), default="arithmetic",
                   help="arithmetic: GRPO fixes dropped carries; tools: GRPO and NFT teach a calculator tool (docs/tools.md)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every stage's recipe (repeatable)")  # fmt: skip
    p.set_defaults(func=cmd_quickstart)

    _add_eval_command(sub.add_parser("eval", help="evaluate a model on a suite; results go to the results store"))

    p = sub.add_parser("leaderboard", help="write leaderboard.md and leaderboard.html from the results store")
    p.add_argument("--out", default="eval/reports", help="output dir (default eval/reports)")
    p.add_argument("--store", default="eval/results.db")
    p.add_argument("--runs", default="runs", help="run dirs whose training curves to include")
    p.set_defaults(func=cmd_leaderboard)

    _add_push_command(sub.add_parser("push", help="upload a run's final/ (with its model card) and report to the Hub"))
    _add_launch_command(sub.add_parser("launch", help="write an sbatch script running a recipe over several nodes"))

    p = sub.add_parser("recipes", help="list shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("rewards", help="list built-in reward functions")
    p.set_defaults(func=cmd_rewards)

    _add_data_commands(
        sub.add_parser("data", help="build training data (POLAR pretraining triplets, fine-tuning rows)")
    )

    _add_tiny_model_command(sub.add_parser("tiny-model", help="build a tiny local model + tokenizer dir (no hub)"))
    return parser


def _add_push_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run dir, e.g. runs/sft-arithmetic")
    p.add_argument("--repo-id", required=True, help="Hub repo, e.g. your-name/sft-arithmetic (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its visibility)")  # fmt: skip
    p.add_argument("--revision", default=None, metavar="BRANCH", help="commit to this branch (created when missing; default main)")  # fmt: skip
    p.add_argument("--store", default=None, help="results store whose `posttrain eval` results of final/ the card shows "
                   "(default eval/results.db when there)")  # fmt: skip
    p.set_defaults(func=cmd_push)


def _add_eval_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model dir (e.g. runs/x/final) or hub id (required)")
    p.add_argument("--suite", help="suite YAML, e.g. eval/suites/arithmetic.yaml (required)")
    p.add_argument("--backend", choices=BACKENDS, default="hf")
    p.add_argument("--store", default="eval/results.db", help="SQLite results store (default eval/results.db)")
    p.add_argument("--samples-dir", default="eval/samples", help="per-sample outputs (jsonl per benchmark)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate at most N rows per benchmark")
    p.add_argument("--label", default=None, help="display name in the leaderboard (default: derived from --model)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--store-timeout", type=float, default=None, metavar="SECONDS",
                   help="wait this long for another writer's lock, then keep the results beside the store (default 30)")  # fmt: skip
    p.add_argument("--flush-pending", action="store_true",
                   help="only store the results writers left beside a locked --store (docs/evaluation.md)")  # fmt: skip
    p.set_defaults(func=cmd_eval)


def _add_launch_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--slurm", action="store_true", help="write a Slurm sbatch script (docs/scaling.md)")
    p.add_argument("--nodes", type=positive_int, required=True, help="training nodes")
    p.add_argument("--gpus-per-node", type=positive_int, required=True, help="GPUs, i.e. processes, per training node")
    p.add_argument("--vllm-nodes", type=non_negative_int, default=0, help="nodes serving rollouts with trl vllm-serve "
                   "(0 or 1; the recipe gets rollout.vllm.mode=server with that node's address)")  # fmt: skip
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", default=None, help="Slurm time limit, e.g. 24:00:00")
    p.add_argument("--port", type=positive_int, default=None, help="rendezvous port on the first node (default 29500)")
    p.add_argument("--out", default=None, metavar="FILE", help="the script (default slurm/<recipe name>.sbatch)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, passed on to every node's `posttrain train` (repeatable)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true",
                   help="print the launch, batch geometry and memory plan for nodes x GPUs processes; write nothing")  # fmt: skip
    p.add_argument("--gpu-memory", default="80GiB", type=memory_size, help="device size the --dry-run plan assumes")
    p.set_defaults(func=cmd_launch)


def cmd_launch(args: argparse.Namespace) -> int:
    from posttrain.shipped import find_shipped
    from posttrain.slurm import prepare_launch, sbatch_script

    if not (args.slurm or args.dry_run):
        raise PosttrainError("posttrain launch: pass --slurm to write the sbatch script (or --dry-run for the plan)")
    prepared = prepare_launch(
        find_shipped(args.recipe), nodes=args.nodes, gpus_per_node=args.gpus_per_node, vllm_nodes=args.vllm_nodes,
        overrides=args.overrides, workdir=Path.cwd(), script=Path(args.out) if args.out else None,
        partition=args.partition, time=args.time, port=args.port, plan=args.dry_run, gpu_memory=args.gpu_memory,
    )  # fmt: skip
    print("\n".join(f"- {line}" for line in prepared.lines))
    if prepared.unmet is not None:
        print(f"# not checked here (this machine cannot run it; the nodes must)\n{prepared.unmet}", file=sys.stderr)
    if args.dry_run:
        return 0
    prepared.script.parent.mkdir(parents=True, exist_ok=True)
    prepared.script.write_text(sbatch_script(prepared.job))
    print(f"wrote {prepared.script}; submit it with: sbatch {prepared.script}")
    return 0


def _add_tiny_model_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="arithmetic", help="character set: arithmetic or text")
    p.add_argument("--out", required=True)
    p.add_argument("--hidden-size", type=positive_int, default=128)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=cmd_tiny_model)


def _add_data_commands(p: argparse.ArgumentParser) -> None:
    """`posttrain data polar-pretrain | polar-finetune | graded-samples`."""
    data = p.add_subparsers(dest="data_command", required=True)
    d = data.add_parser("polar-pretrain", help="sample a pool of policies into POLAR pretraining triplets")
    d.add_argument("--policies", nargs="+", required=True, metavar="MODEL", help="model dirs or hub ids (>= 2)")
    d.add_argument("--prompts", required=True, help="prompt file: .txt (one per line) or .jsonl (a 'prompt' field)")
    d.add_argument("--out", required=True, help="output dir (triplets.jsonl, data_card.md); rerun to resume")
    d.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts")
    d.add_argument("--max-new-tokens", type=positive_int, default=1024)
    d.add_argument("--prefix-words", type=positive_int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="cut each prompt to a random prefix of MIN..MAX words (pretraining on ordinary text)")  # fmt: skip
    d.add_argument("--backend", choices=BACKENDS, default="hf")
    d.add_argument("--chunk", type=positive_int, default=64, help="prompts per generate call and per shard append")
    d.add_argument("--seed", type=non_negative_int, default=0)
    d.set_defaults(func=cmd_data_polar_pretrain)
    d = data.add_parser("polar-finetune", help="convert rankings or reference-carrying pairs into POLAR rows")
    d.add_argument("input", help="jsonl file")
    d.add_argument("--out", required=True, help="output jsonl (prompt, reference, chosen, rejected)")
    d.add_argument("--from", dest="kind", choices=["rankings", "pairs"], required=True,
                   help="rankings: a best-first list of >= 3 responses per row; pairs: chosen/rejected + a reference")  # fmt: skip
    d.add_argument("--field", default=None, help="the ranked list's field (default 'ranked') or reference field "
                   "(default 'reference')")  # fmt: skip
    d.set_defaults(func=cmd_data_polar_finetune)
    d = data.add_parser("graded-samples", help="sample a model on prompts with answers; label each sample by a grader")
    d.add_argument("--model", required=True, help="model dir (or hub id) to sample")
    d.add_argument("--data", required=True, help="a data source with prompt + answer columns: a file, or a recipe "
                   "source as YAML, e.g. '{synthetic: arithmetic, split: train}'")  # fmt: skip
    d.add_argument("--out", required=True, help="output jsonl (prompt, completion, label: true when graded correct)")
    d.add_argument("--samples", type=positive_int, default=2, help="completions per prompt")
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--max-new-tokens", type=positive_int, default=256)
    d.add_argument("--grader", default="numeric_match", help="a benchmark grader (see eval/suites)")
    d.add_argument("--limit", type=positive_int, default=None, help="use the first N prompts")
    d.add_argument("--seed", type=non_negative_int, default=0)
    d.set_defaults(func=cmd_data_graded_samples)


def cmd_data_polar_pretrain(args: argparse.Namespace) -> int:
    from posttrain.data.polar import read_prompts
    from posttrain.rollout.polar_pretrain import PretrainBuild, build_pretrain_triplets

    prompts = read_prompts(args.prompts)[: args.limit]
    build = PretrainBuild(policies=tuple(args.policies), max_new_tokens=args.max_new_tokens, seed=args.seed,
                          chunk=args.chunk, backend=args.backend,
                          prefix_words=tuple(args.prefix_words) if args.prefix_words else None)  # fmt: skip
    path = build_pretrain_triplets(prompts, args.out, build)
    print(f"wrote {len(prompts)} triplets to {path} (data card: {path.parent / 'data_card.md'})")
    return 0


def cmd_data_polar_finetune(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from posttrain.data.polar import from_pairs, from_rankings, read_jsonl_rows

    rows = read_jsonl_rows(args.input)
    if args.kind == "rankings":
        out = from_rankings(rows, args.field or "ranked", where=args.input)
    else:
        out = from_pairs(rows, args.field or "reference", where=args.input)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {len(out)} POLAR rows to {args.out}")
    return 0


def cmd_data_graded_samples(args: argparse.Namespace) -> int:
    import yaml

    from posttrain.evaluation.graded_samples import SampleBuild, build_graded_samples

    source = yaml.safe_load(args.data)
    source = source if isinstance(source, dict) else {"path": args.data}
    if args.limit is not None:
        source["limit"] = args.limit
    build = SampleBuild(model=args.model, data=source, samples=args.samples, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, grader=args.grader, seed=args.seed)  # fmt: skip
    counts = build_graded_samples(build, Path(args.out))
    print(f"wrote {counts['rows']} rows to {args.out}: {counts['desirable']} graded correct (label true), "
          f"{counts['undesirable']} wrong (label false); {counts['empty']} empty completions left out")  # fmt: skip
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from posttrain.preflight import MachineError
    from posttrain.shipped import find_shipped
    from posttrain.train import load_and_validate, train_recipe

    if args.rehearse and (args.dry_run or args.resume):
        raise PosttrainError("--rehearse runs a rehearsal of its own: it takes neither --dry-run nor --resume")
    try:
        recipe = load_and_validate(find_shipped(args.recipe), args.overrides)
    except MachineError as err:
        if args.rehearse and getattr(err, "recipe", None) is not None:
            return _rehearse(err.recipe, args)  # no GPU, no vLLM, data not there yet: what a rehearsal stands in for
        if not args.dry_run or getattr(err, "recipe", None) is None:
            raise
        _print_plan(err.recipe, args)  # a valid recipe this machine can't run: the plan, then why (exit 3)
        print(f"# this machine cannot run it\n{err}", file=sys.stderr)
        return 3
    if args.dry_run:
        _print_plan(recipe, args)
        return 0
    if args.rehearse:
        return _rehearse(recipe, args)
    result = train_recipe(recipe, resume=args.resume)
    from posttrain.models.processes import end_processes, process_state

    is_main = process_state().is_main_process
    end_processes()
    if not is_main:
        return 0  # one summary per launch, not one per process
    if result.finished:
        print(f"run dir: {result.run_dir} holds this run, finished at step {result.global_step}: nothing to resume, "
              f"nothing was changed (final model: {result.run_dir}/final, report: {result.run_dir}/report.md)")  # fmt: skip
        return 0
    print(f"run dir: {result.run_dir}  (final model: {result.run_dir}/final, report: {result.run_dir}/report.md)")
    return 0


def _rehearse(recipe, args: argparse.Namespace) -> int:
    from posttrain.rehearse import prepare_rehearsal, run_rehearsal

    workdir = Path(args.rehearse_dir or f"runs/rehearsal/{recipe.name}")
    print(f"preparing the rehearsal of {recipe.where} in {workdir} ...", flush=True)
    rehearsal = prepare_rehearsal(recipe, workdir, args.accelerate_config)
    lines = rehearsal.lines()
    print("\n".join(lines[1:]), flush=True)
    known = len(rehearsal.not_rehearsed)
    run_rehearsal(rehearsal, echo=lambda line: print(line, flush=True))
    for line in rehearsal.not_rehearsed[known:]:  # what the run showed it did not exercise
        print(f"not rehearsed: {line}")
    print(f"rehearsal passed: {recipe.where} ran 2 optimizer steps on 2 CPU processes, resumed from checkpoint-1 "
          f"(run: {rehearsal.run_dir}; rehearsed recipe: {rehearsal.recipe_path})")  # fmt: skip
    return 0


def _print_plan(recipe, args: argparse.Namespace) -> None:
    from posttrain.recipe import to_yaml
    from posttrain.train import dry_run_plan

    print(to_yaml(recipe))
    print("# plan")
    for line in dry_run_plan(recipe, args.gpu_memory, args.accelerate_config):
        print(f"- {line}")


def cmd_quickstart(args: argparse.Namespace) -> int:
    from posttrain.quickstart import run_quickstart

    out = Path(args.out or ("runs/quickstart" if args.task == "arithmetic" else f"runs/quickstart-{args.task}"))
    summary = run_quickstart(out, seed=args.seed, overrides=args.overrides, task=args.task)
    print(summary.table())
    print(f"report: {out}/report.md")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from posttrain.evaluation.store import ResultsStore
    from posttrain.evaluation.suite_runner import format_outcomes, run_suite
    from posttrain.shipped import find_shipped

    if args.flush_pending:
        store = ResultsStore(args.store, create=False, timeout=args.store_timeout)
        waiting = len(store.pending())
        print(f"{args.store}: stored {store.flush_pending()} new result(s) from the {waiting} file(s) that waited in "
              f"{store.pending_dir}/")  # fmt: skip
        return 0
    if args.model is None or args.suite is None:
        raise PosttrainError("posttrain eval: --model and --suite are required (or --flush-pending alone)")
    store = ResultsStore(args.store, timeout=args.store_timeout)
    outcomes = run_suite(
        args.model, find_shipped(args.suite, "suites"), backend=args.backend, store=store, samples_dir=Path(args.samples_dir),
        limit=args.limit, label=args.label, batch_size=args.batch_size,
    )  # fmt: skip
    print(format_outcomes(outcomes))
    if not store.kept:
        print(f"stored in {args.store}; per-sample outputs under {args.samples_dir}/")
        return 0
    print(f"warning: {args.store} stayed locked by another writer for {store.timeout:g} s: {len(store.kept)} of "
          f"{len(outcomes)} result(s) kept in {store.pending_dir}/, which the next `posttrain eval` into this store "
          f"loads (or `posttrain eval --flush-pending --store {args.store}`); per-sample outputs under "
          f"{args.samples_dir}/; nothing was lost", file=sys.stderr)  # fmt: skip
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from posttrain.evaluation.leaderboard import write_leaderboard
    from posttrain.evaluation.store import ResultsStore
    from posttrain.train import run_curves

    if not Path(args.store).exists():
        raise PosttrainError(f"{args.store}: no results store yet; run `posttrain eval` first")
    store = ResultsStore(args.store, create=False)
    md, html = write_leaderboard(store, Path(args.out), Path(args.runs), curves_for=run_curves)
    print(f"wrote {md} and {html}")
    if store.pending():
        print(f"warning: {len(store.pending())} result(s) wait in {store.pending_dir}/ and are not in this leaderboard "
              f"yet: `posttrain eval --flush-pending --store {args.store}` stores them", file=sys.stderr)  # fmt: skip
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from posttrain.hub import push_run

    store = args.store if args.store is not None else ("eval/results.db" if Path("eval/results.db").is_file() else None)
    pushed = push_run(args.run, args.repo_id, private=args.private, revision=args.revision, store=store)
    print(f"pushed {args.run} to {pushed.repo_url}: {len(pushed.files)} files, final/ at the root (README.md: the "
          f"model card), the report under report/ (commit {pushed.commit_url})")  # fmt: skip
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    from posttrain.shipped import recipes_dir

    root = recipes_dir()
    for path in sorted(root.rglob("*.yaml")):
        if path.relative_to(root).parts[0] == "accelerate":  # launch configs (and their cpu/ variants)
            continue
        data = yaml.safe_load(path.read_text()) or {}
        print(f"{str(path.relative_to(root)):42s} {data.get('description', '')}")
    return 0


def cmd_rewards(args: argparse.Namespace) -> int:
    from reward_models import resolve_reward, reward_names

    for name in reward_names():
        doc = (resolve_reward(name).__doc__ or "").strip().splitlines()
        print(f"{name:20s} {doc[0] if doc else ''}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from posttrain.models.tiny import TinySpec, save_tiny_model

    spec = TinySpec(task=args.task, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=args.heads,
                    seed=args.seed)  # fmt: skip
    out = save_tiny_model(args.out, spec)
    print(f"tiny {args.task} model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
