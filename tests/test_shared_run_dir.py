"""Every rank of a launch must see the same run dir: global rank 0 writes a nonce, every rank reads it back, and when
any rank can't (two nodes given different directories: what an unshared disk looks like) all of them refuse with
the same message before anything is written."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from posttrain.models.processes import RunDirNotShared, confirm_shared_run_dir
from posttrain.runs import RUN_NONCE

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, dirs: list[str], out: str) -> None:
    """One process of a 2-process gloo group: the check once per scenario, on the dir this rank is given."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    verdicts = []
    for path in dirs:
        try:
            confirm_shared_run_dir(Path(path), wait_s=0.5)
            verdicts.append("ok")
        except RunDirNotShared as err:
            verdicts.append(str(err))
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(verdicts))


def test_every_rank_refuses_a_run_dir_it_does_not_share(tmp_path):
    shared, mine, theirs = tmp_path / "shared", tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    theirs.mkdir(parents=True)
    (theirs / RUN_NONCE).write_text("left by an earlier launch")  # a stale nonce is not this launch's
    (tmp_path / "a_file").write_text("x")
    unwritable = str(tmp_path / "a_file" / "run")
    scenarios = {0: [str(shared), str(mine), str(mine), unwritable],
                 1: [str(shared), str(theirs), str(tmp_path / "nowhere"), unwritable]}  # fmt: skip
    port, ctx = _free_port(), multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, port, scenarios[r], str(tmp_path / f"{r}.json"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    verdicts = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert verdicts[0] == verdicts[1]  # every rank raises the same error: none is left waiting in a collective
    same, stale, missing, unwritable = verdicts[0]
    assert same == "ok" and not (shared / RUN_NONCE).exists()  # rank 0 removes the nonce once all have read it
    assert f"global rank 0 on {socket.gethostname()} wrote a nonce to {mine}/{RUN_NONCE}" in stale
    assert f"rank 1 on {socket.gethostname()} found another nonce in {theirs}" in stale
    assert "must be on a shared filesystem that every node mounts at the same path" in stale
    assert f"rank 1 on {socket.gethostname()} found no such file in {tmp_path / 'nowhere'}" in missing
    assert not (tmp_path / "nowhere").exists()  # the rank that does not share it wrote nothing
    assert unwritable.startswith(f"global rank 0 cannot write the run dir {tmp_path / 'a_file' / 'run'}")


def test_one_process_has_nothing_to_check(tmp_path):
    confirm_shared_run_dir(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_two_nodes(config: Path, args_of: Callable[[int], list[str]], logs: Path, processes: int = 2,
                    env: dict[str, str] | None = None) -> list[subprocess.Popen]:  # fmt: skip
    """Two `accelerate launch --config_file CONFIG` as the two machines of one job on this host (c10d rendezvous on
    127.0.0.1, a free port), `processes` over both; node r runs `args_of(r)` (e.g. `-m posttrain train ...`), its
    output in logs/node<r>.log. Node 0 first: on one host node 1's rendezvous agent would otherwise take the port node
    0 checks is free."""
    port = _free_port()

    def node(rank: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--num_machines", "2", "--num_processes", str(processes), "--machine_rank", str(rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--rdzv_backend", "c10d",
               *args_of(rank)]  # fmt: skip
        log = (logs / f"node{rank}.log").open("w")
        return subprocess.Popen(cmd, cwd=REPO, env=env or os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)

    nodes = [node(0)]
    deadline = time.monotonic() + 120
    while not _listening(port) and nodes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return [*nodes, node(1)]


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and every process under it. torchrun starts each worker in a session of its own, so
    killing the launcher (or its process group) leaves the workers running."""
    import psutil

    try:
        tree = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    node.wait()


def wait_nodes(nodes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Each node's exit code, or None for one still running after `timeout` seconds (then killed with its workers)."""
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            try:
                node.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [node.poll() for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)


@pytest.mark.slow
def test_two_nodes_given_different_run_dirs_are_refused_before_training(tmp_path):
    """Two `accelerate launch`es as two machines (c10d rendezvous on 127.0.0.1), each given its own output_dir."""
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "trainer": "sft", "name": "unshared",
        "model": {"tiny": {"task": "arithmetic", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                           "num_heads": 2}},
        "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 64}},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4},
    }))  # fmt: skip
    config = REPO / "recipes" / "accelerate" / "cpu" / "ddp.yaml"

    def args(rank: int) -> list[str]:  # each node its own output_dir
        return ["-m", "posttrain", "train", str(recipe), "--set", f"output_dir={tmp_path / f'node{rank}' / 'run'}"]

    codes = wait_nodes(start_two_nodes(config, args, tmp_path), timeout=300)
    for rank, code in enumerate(codes):
        log = (tmp_path / f"node{rank}.log").read_text()
        assert code not in (0, None), log[-3000:]
        assert "RunDirNotShared: the run dir is not shared" in log, log[-3000:]
        assert "must be on a shared filesystem" in log
    assert not (tmp_path / "node1" / "run").exists()  # the node that did not see it wrote nothing
    assert list((tmp_path / "node0" / "run").iterdir()) == []  # nothing trained, the nonce removed
