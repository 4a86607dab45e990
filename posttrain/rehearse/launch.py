"""The rehearsal's two launches: `accelerate launch` of the rewritten recipe, stopped after checkpoint-1 as in a crash,
then `--resume` to the last step; the run dir is checked after each and a failure shows the worker's own error."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import PosttrainError
from posttrain.recipe import Recipe
from posttrain.rehearse.common import DDP_CONFIG, STEPS, Rehearsal
from posttrain.runs import loadable_model_dir, training_losses


class RehearsalFailed(PosttrainError):
    """A rehearsal launch failed: the message ends with its log's tail (the real error)."""


ZERO_OFFLOAD = {"offload_optimizer_device": "none", "offload_param_device": "none"}  # key -> its "off" value
FSDP_OFFLOAD = {"fsdp_offload_params": False}


def _on_two_cpus(given: dict, section: str, offload: dict[str, Any]) -> tuple[dict, str]:
    """A copy of the ZeRO or FSDP2 launch config `given` on 2 CPU processes of one machine, fp32, its `section`'s
    offload keys turned off; and the note saying which were on ("" when none)."""
    config = copy.deepcopy(given)
    sub = config.setdefault(section, {})
    on = [k for k, off in offload.items() if str(sub.get(k, off)).lower() not in ("none", "false")]
    for key in on:
        sub[key] = offload[key]
    config.update(num_processes=2, num_machines=1, machine_rank=0, mixed_precision="no", use_cpu=False)
    config.pop("main_process_ip", None)
    return config, "".join(f"; {k} -> {str(offload[k]).lower()}" for k in on)


def write_launch_config(recipe: Recipe, override: str | None, out: Rehearsal) -> None:
    """The recipe's accelerate config shrunk to 2 CPU processes, fp32, no offload, ZeRO stage or FSDP2 kept (DDP when
    the recipe names none, DeepSpeed is not installed here, or it is FSDP1), written into the rehearsal; the recipe
    points at it."""
    path = override or (recipe.resolve_path(recipe.accelerate_config) if recipe.accelerate_config else None)  # fmt: skip
    config = dict(DDP_CONFIG)
    if path is None:
        out.note("launch: no accelerate_config in the recipe: DDP, 2 processes")
    else:
        given = yaml.safe_load(Path(path).read_text()) or {}
        kind = given.get("distributed_type", "NO")
        if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            stage = (given.get("deepspeed_config") or {}).get("zero_stage")
            out.note(f"launch: {path} (DeepSpeed ZeRO-{stage}) -> DDP, 2 CPU processes: DeepSpeed is not installed")  # fmt: skip
            out.not_rehearsed.append(
                f"DeepSpeed ZeRO-{stage} (not installed here: DS_BUILD_OPS=0 pip install 'posttrain[deepspeed]' "
                "to rehearse it on the CPU)"
            )
        elif kind == "DEEPSPEED":
            config, dropped = _on_two_cpus(given, "deepspeed_config", ZERO_OFFLOAD)
            ds = config["deepspeed_config"]
            out.note(
                f"launch: {path} (DeepSpeed ZeRO-{ds.get('zero_stage')}, {given.get('num_processes', 1)} "
                f"processes, {given.get('mixed_precision', 'no')}) -> ZeRO-{ds.get('zero_stage')} on 2 CPU "
                f"processes, fp32 (gloo){dropped}"
            )
        elif kind == "FSDP" and int((given.get("fsdp_config") or {}).get("fsdp_version", 1)) == 2:
            # FSDP2 runs on CPUs over gloo (posttrain.models.processes.let_accelerate_shard_on_cpu)
            config, dropped = _on_two_cpus(given, "fsdp_config", FSDP_OFFLOAD)
            out.note(
                f"launch: {path} (FSDP2, {given.get('num_processes', 1)} processes, "
                f"{given.get('mixed_precision', 'no')}) -> FSDP2 on 2 CPU processes, fp32 (gloo){dropped}"
            )
        elif kind == "FSDP":
            out.note(f"launch: {path} (FSDP1) -> DDP, 2 CPU processes: only FSDP2 is rehearsed on CPUs")
            out.not_rehearsed.append("FSDP1 (accelerate's FSDP1 was never tried on CPUs here; fsdp_version: 2 is)")
        else:
            out.note(f"launch: {path} ({kind}, {given.get('num_processes', 1)} processes) -> DDP, 2 CPU processes")
    out.accelerate_config.write_text(yaml.safe_dump(config, sort_keys=False))
    stage = (config.get("deepspeed_config") or {}).get("zero_stage") if config["distributed_type"] == "DEEPSPEED" else None  # fmt: skip
    shown = "FSDP2" if config["distributed_type"] == "FSDP" else ("DeepSpeed ZeRO-" + str(stage) if stage else "DDP")
    out.did(f"accelerate launch, 2 processes, {shown} (gloo)")


def run_rehearsal(rehearsal: Rehearsal, echo: Callable[[str], None] = print, timeout: float = 1800) -> Rehearsal:
    """Launch the rehearsal twice (stop after checkpoint-1, then --resume) and check the run dir after each; a
    failed launch raises RehearsalFailed with the tail of its log."""
    from posttrain.models.processes import STOP_AFTER_CHECKPOINT_ENV
    from posttrain.runs import RunDir

    run = RunDir(rehearsal.run_dir)
    first = _launch(rehearsal, 1, [], {STOP_AFTER_CHECKPOINT_ENV: "1"}, echo, timeout)
    state = run.state(STEPS)
    if state.kind != "interrupted" or state.checkpoint is None or state.checkpoint.name != "checkpoint-1":
        raise RehearsalFailed(
            f"launch 1 was to stop after checkpoint-1, but the run dir holds a {state.kind} run "
            f"(checkpoint: {state.checkpoint}); log: {first}"
        )
    second = _launch(rehearsal, 2, ["--resume"], {}, echo, timeout)
    state = run.state(STEPS)
    if state.kind != "finished" or state.final_step != STEPS:
        raise RehearsalFailed(
            f"launch 2 (--resume) left a {state.kind} run (final step {state.final_step}); log: {second}"
        )
    if not loadable_model_dir(run.final):
        raise RehearsalFailed(f"final/ holds no model a from_pretrained can load (no config and weights): {run.final}")
    losses = training_losses(run)
    repeated = sorted(step for step, values in losses.items() if len(values) > 1)
    if repeated:
        raise RehearsalFailed(f"--resume trained step(s) {repeated} again instead of continuing from checkpoint-1; log: {second}")  # fmt: skip
    calls = [r["tools/call_frequency"] for r in run.read_metrics() if "tools/call_frequency" in r]
    if calls and not any(calls):
        rehearsal.not_rehearsed.append(
            "a tool call: the random stand-in never wrote one (tools/call_frequency 0 at every step); the tools were "
            "offered and the loop wired, no tool ran"
        )
    if losses and all(v == 0 for values in losses.values() for v in values):
        rehearsal.not_rehearsed.append(
            "a non-zero loss: it was 0 at every step (a random stand-in earns no reward variance, so every group was "
            "uninformative); the loss and its backward pass ran, the learning signal did not"
        )
    return rehearsal


def _launch(rehearsal: Rehearsal, n: int, extra: list[str], env_extra: dict[str, str], echo: Callable[[str], None],
            timeout: float) -> Path:  # fmt: skip
    import posttrain

    log = rehearsal.workdir / f"launch-{n}.log"
    port = _free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(rehearsal.accelerate_config),
           "--main_process_port", str(port), "-m", "posttrain", "train", str(rehearsal.recipe_path), *extra]  # fmt: skip
    root = str(Path(posttrain.__file__).resolve().parents[1])  # the posttrain this process runs, in every rank
    # On the CPU also on a GPU machine: no CUDA device visible, DeepSpeed's CPU accelerator.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CUDA_VISIBLE_DEVICES": "",
           "DS_ACCELERATOR": "cpu", **env_extra}  # fmt: skip
    what = "train to checkpoint-1, then stop" if not extra else f"--resume to step {STEPS}"
    echo(f"launch {n}/2: {what} (log: {log})")
    start = time.monotonic()
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RehearsalFailed(f"launch {n} ran past {timeout:.0f} s; log: {log}\n{tail_of_log(log)}") from None
    if proc.returncode != 0:
        raise RehearsalFailed(f"launch {n} failed (exit {proc.returncode}); log: {log}\n{tail_of_log(log)}")
    echo(f"launch {n}/2 done in {time.monotonic() - start:.0f} s")
    return log


def tail_of_log(log: Path, lines: int = 40) -> str:
    """The error a launch died of: posttrain's own error line (`XError: ...` and what follows it) or a worker's
    Python traceback; else a worker's native crash lines (`terminate called ...`) and the log's last lines (the
    launcher's own traceback and summary say only which rank failed)."""
    text = log.read_text(errors="replace").splitlines()
    launcher = ("accelerate/commands/launch.py", "torch/distributed/run.py", "torch/distributed/launcher")
    for i, line in enumerate(text):
        line = re.sub(r"^\[rank\d+\]:\s*", "", line)
        block = text[i : i + lines]
        if re.match(r"^\w+(Error|Exception): ", line):
            return "\n".join(block)
        if line.startswith("Traceback (most recent call last)") and not any(
            m in b for b in block[:4] for m in launcher
        ):
            return "\n".join(block)
    crash = [line for line in text if re.search(r"terminate called|what\(\):|Signal \d+|exitcode\s*:", line)]
    return "\n".join([*crash, "...", *text[-lines // 2 :]])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
