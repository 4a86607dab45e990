"""Two machines of one job, as two `accelerate launch --num_machines 2 --machine_rank 0/1` on this host (c10d
rendezvous on 127.0.0.1, gloo on the CPU), and what happens when one of them dies.

- A two-node run equals the one-node run with the same processes, step by step (losses within rel 1e-4: fp32, the
  reduction order only) and in its `final/` weights, under DDP, ZeRO-2 and ZeRO-3 (DeepSpeed through accelerate's
  `standard` multi-node launcher, i.e. torchrun: no pdsh), for SFT and GRPO; `final/posttrain_final.json` records the
  machines and processes.
- A node killed with SIGKILL mid-run fails the other within the collective timeout (`training.ddp_timeout`, posttrain's
  default 10 minutes: `processes.DDP_TIMEOUT_S`), every complete checkpoint is left whole, and both nodes relaunched
  with `--resume` end where the uninterrupted two-node run ends.
- A rank left waiting by a peer that sends nothing (a hung node, a lost network: no connection reset reaches it)
  fails after exactly that timeout: the process group is made with it, before transformers' own 30 minutes could be.

In CI: SFT under ZeRO-3 (DeepSpeed's multi-node path; its two-node run is also the kill test's uninterrupted run),
GRPO under DDP (torchrun's), and the kill; the rest of the matrix is `manual` (CI's 45-minute budget), run by hand
with `-m manual`. Slow: 35-45 s per launch on 2 cores.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from posttrain.runs import COMPLETE_MARKER, RunDir, checkpoint_problem
from tests.conftest import REPO, USER_REWARDS
from tests.test_shared_run_dir import kill_node, start_two_nodes, wait_nodes

CONFIGS = REPO / "recipes" / "accelerate" / "cpu"
RTOL = 1e-4
KILL_TIMEOUT_S = 30  # the kill test's training.ddp_timeout


# ------------------------------------------------------------------------------------------ the collective timeout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _waiting_rank(rank: int, port: int, deepspeed: bool, out: str) -> None:
    """Rank 0 waits in a barrier that rank 1 never enters; writes how long it waited and what it raised."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true" if deepspeed else "false"
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from posttrain.models.processes import process_state

    AcceleratorState._reset_state(reset_partial_state=True)  # forked from pytest: no state of the parent's
    process_state(timeout_s=2)
    if rank == 1:
        time.sleep(30)
        os._exit(0)
    begin = time.monotonic()
    try:
        dist.barrier()
        raised = ""
    except Exception as err:  # gloo's RuntimeError: "Timed out waiting 2000ms ..."
        raised = f"{type(err).__name__}: {err}"
    Path(out).write_text(json.dumps({"waited": time.monotonic() - begin, "raised": raised}))
    os._exit(0)


@pytest.mark.parametrize("deepspeed", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ddp", "deepspeed"])
def test_a_rank_left_waiting_fails_after_the_collective_timeout_it_was_given(deepspeed, tmp_path):
    if deepspeed:
        pytest.importorskip("deepspeed")
    port, ctx = _free_port(), multiprocessing.get_context("fork")
    out = tmp_path / "rank0.json"
    procs = [ctx.Process(target=_waiting_rank, args=(r, port, deepspeed, str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[0].join(120)
    procs[1].kill()
    result = json.loads(out.read_text())
    assert "Timed out" in result["raised"], result
    assert 1.5 <= result["waited"] <= 15, result  # 2 s, not torch's or transformers' 30 minutes


def test_the_plan_prints_the_collective_timeout_posttrain_defaults_to_minutes(tmp_path):
    import yaml

    from posttrain.models.processes import DDP_TIMEOUT_S
    from posttrain.registry import load_and_validate
    from posttrain.train import collective_timeout_s, dry_run_plan

    recipe = {"trainer": "sft", "name": "plan", "model": {"tiny": {"task": "arithmetic"}},
              "data": {"train": {"synthetic": "arithmetic", "split": "train", "n": 8}}}  # fmt: skip
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert 60 <= DDP_TIMEOUT_S <= 900  # minutes, not transformers' 1800 s
    plan = "\n".join(dry_run_plan(load_and_validate(path)))
    assert f"collective timeout: {DDP_TIMEOUT_S} s (training.ddp_timeout)" in plan
    set_here = load_and_validate(path, ["training.ddp_timeout=45"])
    assert collective_timeout_s(set_here) == 45
    assert "collective timeout: 45 s" in "\n".join(dry_run_plan(set_here))


# ---------------------------------------------------------------------------------------- two nodes = one node


def _recipe(trainer: str, tmp_path: Path, model_dir: Path) -> dict:
    """The recipes of tests/test_deepspeed_launch.py; SFT with 4 steps and a checkpoint every 2 (the kill lands
    after checkpoint-2)."""
    from tests.test_deepspeed_launch import recipe_for

    recipe = recipe_for(trainer, tmp_path, model_dir)
    if trainer == "sft":
        recipe["training"] = {**recipe["training"], "max_steps": 4, "save_steps": 2}
    return recipe


class Launches:
    """Runs of one module, each launched once and shared: {(trainer, config, machines, processes): run dir}."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model_dir, self.runs = root, model_dir, {}
        (root / "my_rewards.py").write_text(USER_REWARDS)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def recipe(self, trainer: str, name: str, **training) -> tuple[str, Path]:
        """(recipe path, run dir) of the trainer's recipe named `name`, `training` values on top."""
        from tests.test_deepspeed_launch import write

        recipe = _recipe(trainer, self.root, self.model_dir)
        recipe["training"] = {**recipe["training"], **training}
        out = self.root / name
        return write(self.root, name, recipe, out), out

    def get(self, trainer: str, config: str, machines: int, processes: int = 2) -> Path:
        key = (trainer, config, machines, processes)
        if key not in self.runs:
            path, out = self.recipe(trainer, "-".join(map(str, key)))
            self.runs[key] = self.launch(config, machines, processes, path, out)
        return self.runs[key]

    def launch(self, config: str, machines: int, processes: int, path: str, out: Path, *extra: str) -> Path:
        import subprocess
        import sys

        logs = out.parent / f"{out.name}.logs"
        logs.mkdir(exist_ok=True)
        args = ["-m", "posttrain", "train", path, *extra]
        if machines == 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
                   "--num_processes", str(processes), *args]  # fmt: skip
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stderr[-4000:]
            return out
        nodes = start_two_nodes(CONFIGS / f"{config}.yaml", lambda rank: args, logs, processes, self.env)
        codes = wait_nodes(nodes, timeout=900)
        for rank, code in enumerate(codes):
            assert code == 0, (logs / f"node{rank}.log").read_text()[-4000:]
        summaries = [(logs / f"node{r}.log").read_text().count("run dir:") for r in (0, 1)]
        assert summaries == [1, 0]  # one summary, from global rank 0 (on machine 0)
        return out


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_model_dir) -> Launches:
    pytest.importorskip("deepspeed")
    return Launches(tmp_path_factory.mktemp("multinode"), tiny_model_dir)


def _losses(out: Path) -> list[float]:
    from tests.test_deepspeed_launch import losses

    return losses(out)


def _assert_same_weights(out: Path, reference: Path, trainer: str) -> float:
    """final/ of `out` equals final/ of `reference` (allclose, fp32); returns the largest absolute difference."""
    import torch

    from tests.test_deepspeed_launch import final_weights

    mine, theirs = final_weights(out, trainer), final_weights(reference, trainer)
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert torch.allclose(mine[name], tensor, rtol=1e-5, atol=1e-6), name
    return max(float((mine[k] - theirs[k]).abs().max()) for k in theirs)


_REST = pytest.mark.manual  # the rest of the matrix: run by hand (CI's budget), see the module docstring

MATRIX = [
    pytest.param("sft", "ddp", 1, marks=_REST),
    pytest.param("sft", "zero2", 1, marks=_REST),
    pytest.param("sft", "zero3", 1),
    pytest.param("grpo", "ddp", 1),
    pytest.param("grpo", "zero2", 1, marks=_REST),
    pytest.param("grpo", "zero3", 1, marks=_REST),
    pytest.param("sft", "ddp", 2, marks=_REST),  # two nodes of two processes each = one node of four
]


@pytest.mark.slow
@pytest.mark.parametrize("trainer, config, per_node", MATRIX)
def test_two_nodes_train_as_one_node_with_the_same_processes(trainer, config, per_node, launches):
    processes = 2 * per_node
    one, two = launches.get(trainer, config, 1, processes), launches.get(trainer, config, 2, processes)
    kind = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED ZeRO-2", "zero3": "DEEPSPEED ZeRO-3"}[config]
    for out, machines in ((one, 1), (two, 2)):
        info = json.loads((out / "final" / "posttrain_final.json").read_text())
        assert (info["machines"], info["processes"], info["distributed"]) == (machines, processes, kind), info
    reference, losses = _losses(one), _losses(two)
    assert len(reference) == (4 if trainer == "sft" else 3) and all(x == x for x in reference)
    assert losses == pytest.approx(reference, rel=RTOL, abs=1e-6)
    largest = _assert_same_weights(two, one, trainer)
    rel = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
    print(f"{trainer} {config} 2x{per_node}: losses max rel diff {rel:.1e}, final/ max abs diff {largest:.1e}")


# ------------------------------------------------------------------------------------ a node dies, then --resume


def test_held_out_generation_leaves_the_rng_of_the_training_as_it_found_it(tiny_model_dir):
    """Otherwise the data order after an evaluation before training (accelerate's sampler seeds itself from
    `torch.random.initial_seed()`) differs from a resumed run's, which has none: the resume is not exact."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.models.loading import load_tokenizer
    from posttrain.rollout import SamplingParams
    from posttrain.rollout.hf import HFGenerator

    generator = HFGenerator(AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(str(tiny_model_dir)))
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    generator.generate(["1+2=", "3+4="], SamplingParams(n=2, max_new_tokens=3, temperature=1.0, seed=7))
    assert torch.random.initial_seed() == 1234 and torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_a_node_killed_mid_run_fails_the_other_within_the_timeout_and_both_resume_to_the_uninterrupted_run(launches):
    """ZeRO-3, 2 nodes x 1 process: each node holds its own partition of the weights and optimizer states."""
    path, out = launches.recipe("sft", "killed", ddp_timeout=KILL_TIMEOUT_S)
    logs = out.parent / "killed.interrupted.logs"
    logs.mkdir()
    args = ["-m", "posttrain", "train", path]
    nodes = start_two_nodes(CONFIGS / "zero3.yaml", lambda rank: args, logs, 2, launches.env)
    mark = out / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER
    deadline = time.monotonic() + 600
    while not mark.exists() and all(n.poll() is None for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mark.exists(), (logs / "node0.log").read_text()[-4000:]
    # Freeze node 1 first, so the kill lands mid-run whatever the speed of steps 3-4: node 0 can go no further than
    # the next collective, which node 1 never enters.
    import psutil

    for proc in [psutil.Process(nodes[1].pid), *psutil.Process(nodes[1].pid).children(recursive=True)]:
        proc.send_signal(signal.SIGSTOP)
    time.sleep(1)
    killed = time.monotonic()
    kill_node(nodes[1])
    (code,) = wait_nodes(nodes[:1], timeout=KILL_TIMEOUT_S + 30)
    took = time.monotonic() - killed
    log = (logs / "node0.log").read_text()
    assert code not in (0, None), log[-4000:]  # an error, within the bound
    assert took < KILL_TIMEOUT_S + 30, took
    why = [line for line in log.splitlines() if "RuntimeError" in line and "gloo" in line]
    assert why, log[-4000:]  # a collective's error on the survivor (connection reset, or the timeout), not another
    print(f"node 0 exited {code} {took:.1f} s after node 1 was killed: {why[0][:200]}")

    run = RunDir(out)
    assert not (run.final / "config.json").exists()  # killed mid-run
    assert run.last_checkpoint() == run.checkpoints / "checkpoint-2"
    for checkpoint in run.checkpoints.glob("checkpoint-*"):
        if (checkpoint / COMPLETE_MARKER).exists():
            assert checkpoint_problem(checkpoint) is None, checkpoint
    whole = json.loads(mark.read_text())["files"]
    assert {f"global_step2/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} <= set(whole)

    launches.launch("zero3", 2, 2, path, out, "--resume")
    straight = launches.get("sft", "zero3", 2)
    assert [r["step"] for r in run.read_metrics() if "loss" in r and not any(k.startswith("eval") for k in r)] == [
        1, 2, 3, 4]  # fmt: skip
    assert _losses(out) == pytest.approx(_losses(straight), rel=RTOL)
    _assert_same_weights(out, straight, "sft")
