"""`posttrain launch --slurm`: the sbatch script (golden files, `bash -n`), `--dry-run`'s plan for nodes x GPUs
processes (an indivisible global batch refused), and the script's per-node part executed on this host for two
"nodes" with Slurm's variables set by hand: a ZeRO-3 run that trains, every rank writing its own shards."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.runs import COMPLETE_MARKER, RUN_NONCE, RunDir
from posttrain.slurm import prepare_launch, sbatch_script

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "fixtures" / "slurm"
SHARED = "/shared/posttrain"  # the checkout's path as the golden files write it
GRPO = "recipes/grpo/qwen2.5-math-1.5b-gsm8k.yaml"  # Qwen2.5-Math-1.5B, ZeRO-2, 16 completions per device


def script_for(recipe: str, **options) -> str:
    prepared = prepare_launch(REPO / recipe, workdir=REPO, script=REPO / "slurm" / "job.sbatch", **options)
    return sbatch_script(prepared.job).replace(str(REPO), SHARED)


@pytest.mark.parametrize(
    "golden, recipe, options",
    [
        ("grpo_2x8_vllm.sbatch", GRPO, dict(nodes=2, gpus_per_node=8, vllm_nodes=1, partition="gpu", time="04:00:00")),
        ("sft_4x8.sbatch", "recipes/sft/arithmetic.yaml", dict(nodes=4, gpus_per_node=8, port=29600,
                                                               overrides=["training.max_steps=100"])),
    ],
)  # fmt: skip
def test_the_sbatch_script_is_the_reviewed_one_and_valid_bash(tmp_path, golden, recipe, options):
    script = script_for(recipe, **options)
    assert script == (GOLDEN / golden).read_text()
    path = tmp_path / golden
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_launch_dry_run_plans_nodes_x_gpus_processes(capsys):
    assert main(["launch", str(REPO / GRPO), "--nodes", "2", "--gpus-per-node", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "launch: 2 node(s) x 8 GPU(s) = 16 processes (DeepSpeed ZeRO-2" in out
    assert "global batch: 16 per device x 16 processes x 4 accumulation step(s) = 1024 completions" in out
    assert "each generation batch holds 1024 completions = 128 prompts x 8 samples" in out  # GRPO's own geometry
    assert "memory plan per device (16 process(es), ZeRO-2, from 2 node(s) x 8 GPU(s)" in out
    assert "optimizer (fp32 master, m, v, grads)       1.44 GiB  exact; sharded over 16" in out
    fsdp = ["--set", "accelerate_config=../accelerate/fsdp2.yaml"]
    assert main(["launch", str(REPO / GRPO), "--nodes", "2", "--gpus-per-node", "8", *fsdp, "--dry-run"]) == 0
    assert "16 processes (FSDP2, " in capsys.readouterr().out  # the launch line names the config's engine


def test_launch_refuses_an_indivisible_global_batch_in_one_line(tmp_path, capsys):
    # 64 completions per generation do not split over 3 processes x 16 per device (GRPO's own rule, counted on N x G).
    args = ["launch", str(REPO / GRPO), "--gpus-per-node", "1", "--set", "training.generation_batch_size=64",
            "--set", "training.gradient_accumulation_steps=1"]  # fmt: skip
    assert main([*args, "--nodes", "3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "generation_batch_size 64 does not split over 3 process(es)" in err
    assert main([*args, "--nodes", "2", "--dry-run"]) == 0  # 2 x 16 = 32 divides 64
    out = tmp_path / "job.sbatch"
    assert main([*args, "--nodes", "5", "--slurm", "--out", str(out)]) == 2 and not out.exists()  # no script either


def test_launch_refuses_what_cannot_work(tmp_path, capsys):
    recipe = str(REPO / GRPO)
    assert main(["launch", recipe, "--nodes", "2", "--gpus-per-node", "8"]) == 2
    assert "pass --slurm" in capsys.readouterr().err
    assert main(["launch", recipe, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--vllm-nodes", "2"]) == 2
    assert "one node can serve" in capsys.readouterr().err
    sft = str(REPO / "recipes/sft/arithmetic.yaml")
    assert main(["launch", sft, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--vllm-nodes", "1"]) == 2
    assert "generates no rollouts" in capsys.readouterr().err
    out = tmp_path / "job.sbatch"
    assert main(["launch", recipe, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--vllm-nodes", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "rollout.backend 'vllm' cannot run here" in captured.err  # a note only
    assert "#SBATCH --nodes=3" in out.read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_node(script: Path, rank: int, workdir: Path, **extra_env: str) -> subprocess.Popen:
    """`bash SCRIPT train` as srun would run it on node `rank` (what sbatch's batch part exports set by hand)."""
    env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_JOB_NUM_NODES": "2",
           "MASTER_ADDR": "127.0.0.1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           **extra_env}  # fmt: skip
    log = (workdir / f"node{rank}.log").open("w")
    return subprocess.Popen(["bash", str(script), "train"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_two_nodes(script: Path, port: int, workdir: Path, timeout: float = 600) -> list[str]:
    """Node 0 first: on one host, node 1's rendezvous agent would otherwise take the port node 0 checks is free."""
    first = start_node(script, 0, workdir)
    deadline = time.monotonic() + 120
    while not _listening(port) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    nodes = [first, start_node(script, 1, workdir)]
    try:
        for node in nodes:
            node.wait(timeout)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    logs = [(workdir / f"node{r}.log").read_text() for r in (0, 1)]
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-4000:]
    return logs


@pytest.mark.slow
def test_the_scripts_per_node_command_trains_two_nodes_and_each_rank_writes_its_own_shards(tmp_path, monkeypatch):
    """ZeRO-3 over two 'nodes' of one process each: global rank 0 writes the run's files, each rank its ZeRO-3
    partitions and RNG state, and the checkpoint's marker is written after both (so it lists both)."""
    pytest.importorskip("deepspeed")
    recipe = {
        "trainer": "sft", "name": "two-nodes", "output_dir": "run",
        "accelerate_config": str(REPO / "recipes" / "accelerate" / "cpu" / "zero3.yaml"),
        "model": {"tiny": {"task": "arithmetic", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                           "num_heads": 2}},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 64}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
                     "save_steps": 2},
    }  # fmt: skip
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    assert main(["launch", "sft.yaml", "--slurm", "--nodes", "2", "--gpus-per-node", "1", "--port", str(port)]) == 0
    script = tmp_path / "slurm" / "two-nodes.sbatch"
    assert '--machine_rank "${SLURM_PROCID:?}"' in script.read_text()
    assert shutil.which("bash") is not None

    logs = run_two_nodes(script, port, tmp_path)
    assert sum(log.count("run dir: run") for log in logs) == 1  # one summary: global rank 0's
    run = RunDir(tmp_path / "run")
    info = json.loads((run.final / "posttrain_final.json").read_text())
    assert (info["processes"], info["distributed"]) == (2, "DEEPSPEED ZeRO-3")
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == [1, 2]  # one writer of metrics.jsonl
    checkpoint = run.checkpoints / "checkpoint-2"
    per_rank = [f"rng_state_{r}.pth" for r in (0, 1)] + [
        f"global_step2/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")
    ]
    assert all((checkpoint / name).is_file() for name in per_rank)
    assert set(per_rank) <= set(json.loads((checkpoint / COMPLETE_MARKER).read_text())["files"])
    assert not (run.path / RUN_NONCE).exists()  # the shared-dir check cleaned up after itself
