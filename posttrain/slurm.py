"""`posttrain launch RECIPE --slurm --nodes N --gpus-per-node G [--vllm-nodes 1]`: an sbatch script for a run over
several nodes, and the plan of that run (`--dry-run`: the batch geometry and memory plan for N x G processes).

The script asks Slurm for N (+ 1 with a vLLM node) nodes with one task each. `srun` runs the script's
`posttrain_node train` on the first N nodes: one `accelerate launch` per node with `--num_machines N
--num_processes N*G`, its machine rank from `SLURM_PROCID` (one task per node, so the step's task rank is the
node's rank) and c10d rendezvous on the first node (MASTER_ADDR, from `scontrol show hostnames`). With a vLLM node,
`posttrain_node vllm` runs `trl vllm-serve` there first, the script waits for its /health, and the recipe gets
`rollout.backend=vllm rollout.vllm.mode=server` with that node's address; the server is stopped when training ends.
TRL's client talks to one server, so one vLLM node is the most a run can use (tensor parallel over its GPUs).

The same per-node part runs by hand: `SLURM_PROCID=R MASTER_ADDR=HOST bash SCRIPT train` (docs/scaling.md).
Accelerate, torchrun and Slurm do the distributed work; this module only writes their command lines.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.models.memory import Launch, read_launch
from posttrain.recipe import Recipe, load_recipe, problems_error
from posttrain.shipped import recipes_dir

DEFAULT_PORT = 29500  # torchrun's default rendezvous port
DDP_DEFAULT = "accelerate/ddp.yaml"  # under recipes/: the launch of a recipe that names no accelerate_config


class LaunchError(PosttrainError):
    """A multi-node launch that cannot work as asked (too many vLLM nodes, a trainer that does not generate)."""


@dataclass(frozen=True)
class SlurmJob:
    """One run over Slurm nodes; every path is as the script writes it (relative to `workdir` when inside it)."""

    recipe: str
    workdir: str
    job_name: str
    nodes: int  # training nodes
    gpus_per_node: int
    accelerate_config: str
    zero_stage: int | None = None  # DeepSpeed's, from the config (None: DDP)
    engine: str = "DDP"  # memory.Launch.engine: DDP, DeepSpeed ZeRO-<stage>, FSDP<version>
    vllm_nodes: int = 0
    vllm_model: str | None = None  # what `trl vllm-serve --model` loads (the recipe's model.path)
    vllm_port: int = 8000
    vllm_tensor_parallel: int = 1
    partition: str | None = None
    time: str | None = None
    port: int = DEFAULT_PORT
    overrides: tuple[str, ...] = ()  # the user's --set, passed on to `posttrain train`
    log_dir: str = "slurm"

    @property
    def processes(self) -> int:
        return self.nodes * self.gpus_per_node


def server_overrides(vllm_nodes: int) -> list[str]:
    """The --set a run with a vLLM node gets (the server's address is added by the script, once Slurm names it)."""
    return ["rollout.backend=vllm", "rollout.vllm.mode=server"] if vllm_nodes else []


def planned_launch_of(recipe_path: str | Path, overrides: list[str], nodes: int, gpus_per_node: int) -> Launch:
    """N x G processes with the ZeRO stage of the recipe's accelerate config, read before the recipe is validated
    (its batch checks count these processes). A config that can't be read counts as DDP: validation reports it."""
    recipe = load_recipe(recipe_path, overrides, problems=[])  # problems are reported by the validation after this
    config = _config_path(recipe)
    try:
        base = read_launch(config)
    except Exception:
        base = Launch()
    return dataclasses.replace(base, processes=nodes * gpus_per_node,
                               source=f"{nodes} node(s) x {gpus_per_node} GPU(s), {_shown(config, Path.cwd())}")  # fmt: skip


def slurm_job(
    recipe: Recipe, recipe_path: str | Path, *, nodes: int, gpus_per_node: int, workdir: Path, script: Path,
    vllm_nodes: int = 0, partition: str | None = None, time: str | None = None, port: int = DEFAULT_PORT,
    overrides: tuple[str, ...] = (), generates: bool = True,
) -> SlurmJob:  # fmt: skip
    """The job for a validated `recipe` (loaded from `recipe_path`); `generates` is the trainer's SPEC.generates."""
    if vllm_nodes > 1:
        raise LaunchError(f"--vllm-nodes {vllm_nodes}: TRL's vLLM client talks to one server, so one node can serve "
                          "a run's rollouts (tensor parallel over its GPUs: rollout.vllm.tensor_parallel_size)")  # fmt: skip
    if vllm_nodes and not generates:
        raise LaunchError(f"--vllm-nodes: trainer '{recipe.trainer}' generates no rollouts; drop --vllm-nodes")
    if vllm_nodes and recipe.model.path is None:
        raise LaunchError("--vllm-nodes: vLLM serves model.path; a model.tiny is built by the run itself")
    config = _config_path(recipe)
    launch = read_launch(config)
    stage = launch.zero_stage
    return SlurmJob(
        recipe=_shown(recipe_path, workdir), workdir=str(workdir), job_name=_job_name(recipe.name), nodes=nodes,
        gpus_per_node=gpus_per_node, accelerate_config=_shown(config, workdir), zero_stage=stage, engine=launch.engine,
        vllm_nodes=vllm_nodes, vllm_model=recipe.resolve_path(recipe.model.path) if vllm_nodes else None,
        vllm_port=recipe.rollout.vllm.server_port, vllm_tensor_parallel=recipe.rollout.vllm.tensor_parallel_size,
        partition=partition, time=time, port=port, overrides=tuple(overrides),
        log_dir=_shown(script.parent, workdir),
    )  # fmt: skip


@dataclass
class PreparedLaunch:
    job: SlurmJob
    script: Path
    lines: list[str]  # the launch, its global batch and (with plan=True) the recipe's plan for N x G processes
    unmet: Exception | None = None  # what this machine lacks to run it (no GPU, no vLLM): the nodes must have it


def prepare_launch(
    recipe_path: str | Path, *, nodes: int, gpus_per_node: int, vllm_nodes: int = 0, overrides: list[str] = (),
    workdir: Path, script: Path | None = None, partition: str | None = None, time: str | None = None,
    port: int | None = None, plan: bool = False, gpu_memory: str = "80GiB",
) -> PreparedLaunch:  # fmt: skip
    """Validate the recipe for N x G processes (its batch rules counted over them: an indivisible global batch is a
    RecipeError, as in `posttrain train`) and build the job; with `plan`, add `posttrain train --dry-run`'s plan
    for that launch. A problem only of this machine (preflight.MachineError) is kept in `unmet`, not raised."""
    from posttrain.models.memory import planning_for
    from posttrain.registry import get_spec
    from posttrain.train import dry_run_plan

    with_server = [*overrides, *server_overrides(vllm_nodes)]
    with planning_for(planned_launch_of(recipe_path, with_server, nodes, gpus_per_node)):
        recipe, unmet = _validated(recipe_path, with_server)
        generates = get_spec(recipe.trainer, recipe.where).generates
        script = Path(script or Path("slurm") / f"{_job_name(recipe.name)}.sbatch")
        job = slurm_job(recipe, recipe_path, nodes=nodes, gpus_per_node=gpus_per_node, workdir=workdir, script=script,
                        vllm_nodes=vllm_nodes, partition=partition, time=time, port=port or DEFAULT_PORT,
                        overrides=tuple(overrides), generates=generates)  # fmt: skip
        lines = launch_lines(job, recipe, generates) + (dry_run_plan(recipe, gpu_memory) if plan else [])
    return PreparedLaunch(job, script, lines, unmet)


def _validated(recipe_path: str | Path, overrides: list[str]) -> tuple[Recipe, Exception | None]:
    """`registry.load_and_validate`, with what only this machine lacks (preflight.MachineError: no GPU, no vLLM, a
    model dir an earlier step writes) set apart: returned as one error, not raised with the recipe's own problems."""
    from posttrain.preflight import MachineError
    from posttrain.registry import validate_recipe

    found: list = []
    recipe = load_recipe(recipe_path, overrides, problems=found)
    try:
        validate_recipe(recipe, found)
    except PosttrainError:
        pass  # `found` holds every problem
    wrong = [p for p in found if not isinstance(p, MachineError)]
    if wrong:
        raise problems_error(recipe.where, wrong)
    unmet = [p for p in found if isinstance(p, MachineError)]
    return recipe, problems_error(recipe.where, unmet) if unmet else None


def _config_path(recipe: Recipe) -> str:
    if recipe.accelerate_config:
        return os.path.normpath(recipe.resolve_path(recipe.accelerate_config))
    return str(recipes_dir() / DDP_DEFAULT)


def _shown(path: str | Path, workdir: Path) -> str:
    """`path` relative to `workdir` when it lies inside it, else absolute."""
    full = Path(os.path.abspath(Path(workdir) / path))
    try:
        return str(full.relative_to(os.path.abspath(workdir))) or "."
    except ValueError:
        return str(full)


def _job_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "posttrain"


def launch_lines(job: SlurmJob, recipe: Recipe, generates: bool) -> list[str]:
    """What the job runs, and its global batch (the per-device batch and accumulation of the resolved recipe)."""
    kind = job.engine
    s = recipe.settings
    per_device, accumulation = s.per_device_train_batch_size, s.gradient_accumulation_steps
    what = "completions" if generates else "rows"
    lines = [
        f"launch: {job.nodes} node(s) x {job.gpus_per_node} GPU(s) = {job.processes} processes ({kind}, "
        f"{job.accelerate_config}); accelerate launch on each node, c10d rendezvous on the first, port {job.port}",
        f"global batch: {per_device} per device x {job.processes} processes x {accumulation} accumulation step(s) "
        f"= {per_device * job.processes * accumulation} {what} per optimizer step",
    ]
    if job.vllm_nodes:
        lines.append(f"vLLM: 1 more node serves rollouts (trl vllm-serve --model {job.vllm_model}, tensor parallel "
                     f"{job.vllm_tensor_parallel}, port {job.vllm_port}); rollout.vllm.mode=server")  # fmt: skip
    return lines


def sbatch_script(job: SlurmJob) -> str:
    """The sbatch script: #SBATCH lines, the per-node function `posttrain_node`, and the batch part that runs it on
    every node with srun."""
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes + job.vllm_nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        *([f"#SBATCH --partition={job.partition}"] if job.partition else []),
        *([f"#SBATCH --time={job.time}"] if job.time else []),
        f"#SBATCH --chdir={job.workdir}",
        f"#SBATCH --output={job.log_dir}/%x-%j.out",
        "#",
        f"# Written by `posttrain launch` for {job.recipe}: {job.nodes} training node(s) x {job.gpus_per_node} "
        f"GPU(s) = {job.processes} processes" + (", 1 node serving vLLM." if job.vllm_nodes else "."),
        "# Submit with `sbatch THIS_FILE`. One node's part by hand (what srun runs on each node):",
        "#   SLURM_PROCID=<node rank> MASTER_ADDR=<first node> "
        + ("VLLM_HOST=<vLLM node> " if job.vllm_nodes else "")
        + "bash THIS_FILE train"
        + ("   (and `bash THIS_FILE vllm` on the vLLM node)" if job.vllm_nodes else ""),
        "set -euo pipefail",
        "",
    ]
    return "\n".join([*header, *_node_function(job), "", *_batch_part(job)]) + "\n"


def _node_function(job: SlurmJob) -> list[str]:
    q = shlex.quote
    train = [
        "accelerate launch", f"--config_file {q(job.accelerate_config)}", f"--num_machines {job.nodes}",
        f"--num_processes {job.processes}", '--machine_rank "${SLURM_PROCID:?}"', '--main_process_ip "${MASTER_ADDR:?}"',
        f"--main_process_port {job.port}", "--rdzv_backend c10d",
        *(["--deepspeed_multinode_launcher standard"] if job.zero_stage is not None else []),
        f"-m posttrain train {q(job.recipe)}", *(f"--set {q(o)}" for o in (*job.overrides, *server_overrides(job.vllm_nodes))),
        *(['--set "rollout.vllm.server_host=${VLLM_HOST:?}"'] if job.vllm_nodes else []),
    ]  # fmt: skip
    lines = [
        "# One node's part: `train` (accelerate launch; machine rank = SLURM_PROCID, one task per node)"
        + (" or `vllm` (the rollout server)." if job.vllm_nodes else "."),
        "posttrain_node() {",
        f"    cd {q(job.workdir)}",
        '    case "${1:-}" in',
        "        train)",
        "            exec " + " \\\n                ".join(_wrap(train)),
        "            ;;",
    ]
    if job.vllm_nodes:
        lines += [
            "        vllm)",
            f"            exec trl vllm-serve --model {q(job.vllm_model)} --tensor_parallel_size "
            f"{job.vllm_tensor_parallel} --port {job.vllm_port}",
            "            ;;",
        ]
    usage = "train|vllm" if job.vllm_nodes else "train"
    return lines + [
        "        *)",
        f'            echo "usage: posttrain_node {usage}" >&2',
        "            return 2",
        "            ;;",
        "    esac",
        "}",
        "",
        "if [[ $# -gt 0 ]]; then  # by hand: one node's part",
        '    posttrain_node "$@"',
        "    exit",
        "fi",
    ]


def _wrap(parts: list[str], width: int = 96) -> list[str]:
    """Join command parts into lines of at most about `width` characters."""
    lines, line = [], ""
    for part in parts:
        if line and len(line) + 1 + len(part) > width:
            lines.append(line)
            line = part
        else:
            line = f"{line} {part}" if line else part
    return [*lines, line]


def _batch_part(job: SlurmJob) -> list[str]:
    train_step = (f"srun --nodes={job.nodes} --ntasks={job.nodes} --ntasks-per-node=1 --relative=0 "
                  '--kill-on-bad-exit=1 bash -c "$node train"')  # fmt: skip
    lines = [
        "# The batch part (sbatch runs it on the first node): name the nodes, run each one's part with srun.",
        'mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'export MASTER_ADDR="${hosts[0]}"',
        'node="$(declare -f posttrain_node); posttrain_node"',
    ]
    if not job.vllm_nodes:
        return [*lines, train_step]
    health = f"http://$VLLM_HOST:{job.vllm_port}/health"
    return [
        *lines,
        f'export VLLM_HOST="${{hosts[{job.nodes}]}}"',
        f'srun --nodes=1 --ntasks=1 --relative={job.nodes} bash -c "$node vllm" &',
        "server=$!",
        f'echo "waiting for the vLLM server at {health}"',
        "until python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "
        f'"{health}" 2>/dev/null; do',
        '    kill -0 "$server" 2>/dev/null || { echo "the vLLM server ended before it answered" >&2; exit 1; }',
        "    sleep 10",
        "done",
        "status=0",
        f"{train_step} || status=$?",
        'kill "$server" 2>/dev/null || true',
        'exit "$status"',
    ]
