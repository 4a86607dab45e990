"""accelerate's process state, made right for a multi-process launch on a machine without GPUs.

accelerate (1.10-1.15) picks a distributed backend only for an accelerator device, or for `cpu=True`, which
its `launch` never passes on: a 2-process `accelerate launch` on CPUs (torchrun under `--multi_gpu`, or the
DeepSpeed launcher) gives `PartialState` no backend, so every rank reports process 0 of 1. Barriers are then
skipped (rank 1 read `base_model/` before rank 0 had written it), the data is not split between the ranks, and
every rank writes the run dir. (`accelerate launch --cpu` and a `MULTI_CPU` config start only one process
unless run under mpirun.) The fix is the first `PartialState` of the process, built with what accelerate needs
to see the real world: `cpu=True` for DDP over gloo; for DeepSpeed, the gloo backend that DeepSpeed's CPU
accelerator initialises (`cpu=True` would turn DeepSpeed off). Everything else is accelerate's own state.

FSDP on CPUs needs one more step (`let_accelerate_shard_on_cpu`): accelerate turns a launch into FSDP only from a
GPU-family state, so with the CPU's `MULTI_CPU` it dropped the FSDP plugin and trained as DDP without a word.

Also here: the check every multi-process run takes at start that all its ranks see one run dir
(`confirm_shared_run_dir`, docs/scaling.md).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.runs import RUN_NONCE, write_atomic


def launched_on_cpu() -> bool:
    """This process is one of several started by a launcher (torchrun's LOCAL_RANK, WORLD_SIZE > 1), and no CUDA
    device is visible."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    import torch

    return not torch.cuda.is_available()


# How long a rank waits in a collective (all-reduce, barrier, broadcast) for the others before it fails the run, when
# the recipe sets no `training.ddp_timeout`. A node that dies takes its processes' connections with it only when its
# kernel lives on (kill -9, an OOM kill: the peers' reads fail at once with "Connection reset by peer"); a node that
# hangs, loses power or its network sends nothing, and the survivors wait this long, holding their GPUs: torch's and
# transformers' 30 minutes is half an hour of a whole job idle. 10 minutes still covers the longest wait a healthy run
# has for one rank working alone (the main process tokenizing a large data set under `main_process_first`, a rank-0
# checkpoint of a full model and optimizer written to a network disk).
DDP_TIMEOUT_S = 600


def process_state(timeout_s: float | None = None) -> Any:
    """accelerate's `PartialState` (a per-process singleton: the first call decides it, later ones share it).

    `timeout_s` (default DDP_TIMEOUT_S) is the process group's collective timeout; it counts only in the first call,
    which creates the process group: `posttrain train` makes that call with the recipe's `training.ddp_timeout`
    before transformers' TrainingArguments would (its own PartialState finds the group made and keeps it)."""
    from datetime import timedelta

    from accelerate import PartialState

    if PartialState._shared_state:
        return PartialState()
    timeout = timedelta(seconds=DDP_TIMEOUT_S if timeout_s is None else timeout_s)
    if launched_on_cpu():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return PartialState(backend="gloo", timeout=timeout)
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            let_accelerate_shard_on_cpu()
        return PartialState(cpu=True, timeout=timeout)
    return PartialState(timeout=timeout)


def let_accelerate_shard_on_cpu() -> None:
    """Make an FSDP launch on CPUs (gloo) shard as configured instead of silently training as DDP.

    accelerate 1.15's `AcceleratorState` sets `distributed_type = FSDP` (and keeps the FSDP plugin) only when the
    process state it starts from is a GPU-family one (`MULTI_GPU`, `MULTI_XPU`, ...; state.py); on CPUs that state is
    `MULTI_CPU` (gloo), so the plugin was dropped: `final/posttrain_final.json` said MULTI_CPU and torch's DDP reducer
    ran. torch 2.13's FSDP2 (`fully_shard`) itself runs on CPUs over gloo. So the first `AcceleratorState` of the
    process is shown `MULTI_GPU` in place of `MULTI_CPU` (the device stays the CPU, the backend gloo); accelerate then
    makes it FSDP and writes FSDP back into the process state, as it does on GPUs. Installed once, only for a
    multi-process FSDP launch on CPUs (`process_state`); tests/test_fsdp2_launch.py fails when accelerate changes."""
    from accelerate import state
    from accelerate.utils import DistributedType

    build = state.AcceleratorState.__init__
    if getattr(build, "shards_on_cpu", False):
        return

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        process = state.PartialState._shared_state
        if (
            not state.AcceleratorState._shared_state
            and process.get("distributed_type") == DistributedType.MULTI_CPU
            and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        ):
            process["distributed_type"] = DistributedType.MULTI_GPU
        build(self, *args, **kwargs)

    __init__.shards_on_cpu = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = __init__  # type: ignore[method-assign]


def machines() -> int:
    """The machines (nodes) of this launch: torchrun's GROUP_WORLD_SIZE (one agent per node, whatever launched it:
    `accelerate launch`, DeepSpeed's standard multi-node launcher), else WORLD_SIZE / LOCAL_WORLD_SIZE (mpirun through
    accelerate), else 1."""
    if os.environ.get("GROUP_WORLD_SIZE"):
        return int(os.environ["GROUP_WORLD_SIZE"])
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    return max(1, world // local) if local > 0 else 1


def end_processes() -> None:
    """Close torch.distributed after a multi-process run, every rank together. Left to interpreter exit, a ZeRO-3
    run on CPUs aborted one rank after `final/` was written ("terminate called without an active exception"), and
    the launch reported a failure.

    The trainer is still alive here, in reference cycles (a Trainer and its callbacks, its accelerator), and so is
    the DDP or DeepSpeed engine it wraps, which holds the process group: `destroy_process_group` alone only
    unregisters the group, and its gloo threads were torn down whenever the cycle was collected, at interpreter
    exit, in no set order (the likely cause of one rank's SIGABRT seen once in CI at the end of a rehearsal's
    resumed DDP launch, not reproduced in 70 local runs). Collecting first frees
    the engines, so the group is destroyed here, on every rank, after the barrier."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


class RunDirNotShared(PosttrainError):
    """The processes of a launch do not all see the same run dir (`confirm_shared_run_dir`)."""


def confirm_shared_run_dir(path: Path, wait_s: float = 10.0) -> None:
    """Refuse to start unless every process sees the same run dir: global rank 0 writes a fresh nonce into
    `<path>/.run_nonce` (RUN_NONCE) and broadcasts it, every rank reads the file it finds at its own `path`, the
    verdicts are gathered, and when any rank saw no file or another nonce every rank raises the same PosttrainError
    (so none is left waiting in a collective); rank 0 then removes the file. A no-op in a single-process run.

    Two nodes whose run dirs are different directories (output_dir on a node-local disk, or set differently per
    node) would each write a half of the run that the other never reads (rank 0's checkpoints, a ZeRO-3 shard on
    every rank): caught here, before anything is written. A rank polls for up to `wait_s` seconds, listing the dir
    each time, because NFS may cache a lookup that found no file for a few seconds."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    rank = dist.get_rank()
    sent = [None]  # (nonce, why rank 0 could not write it)
    if rank == 0:
        sent = [(uuid.uuid4().hex, None)]
        try:
            write_atomic(path / RUN_NONCE, sent[0][0])
        except OSError as err:  # told to every rank, which would otherwise wait for it in the next collective
            sent = [(None, f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(sent, src=0)  # returns once rank 0 has written the file
    nonce, failed = sent[0]
    if failed:
        raise RunDirNotShared(f"global rank 0 cannot write the run dir {path} ({failed}); nothing was trained")
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (socket.gethostname(), str(path.resolve()), _nonce_seen(path, nonce, wait_s)))
    if rank == 0:
        (path / RUN_NONCE).unlink(missing_ok=True)
    blind = [(r, host, where, what) for r, (host, where, what) in enumerate(seen) if what != "the same nonce"]
    if blind:
        host0, where0, _ = seen[0]
        shown = "; ".join(f"rank {r} on {host} found {what} in {where}" for r, host, where, what in blind[:4])
        more = f" (and {len(blind) - 4} more ranks)" if len(blind) > 4 else ""
        raise RunDirNotShared(
            f"the run dir is not shared: global rank 0 on {host0} wrote a nonce to {where0}/{RUN_NONCE}, but {shown}"
            f"{more}. The run dir (output_dir) must be on a shared filesystem that every node mounts at the same path, "
            "with the same output_dir on every node; nothing was trained"
        )


def _nonce_seen(path: Path, nonce: str, wait_s: float) -> str:
    """What this rank finds at `path/RUN_NONCE`: 'the same nonce', 'another nonce' or 'no such file'."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            os.listdir(path)  # revalidates the dir's cached entries on NFS before the file is opened
            found = (path / RUN_NONCE).read_text().strip()
        except OSError:
            found = None
        if found == nonce:
            return "the same nonce"
        if time.monotonic() >= deadline:
            return "no such file" if found is None else "another nonce"
        time.sleep(0.5)


# `posttrain train --rehearse` sets this to a step: after the checkpoint of that step is written and marked complete,
# every process leaves at once, as a crash would, and the rehearsal's second launch resumes from it.
STOP_AFTER_CHECKPOINT_ENV = "POSTTRAIN_STOP_AFTER_CHECKPOINT"


def stop_after_checkpoint(step: int) -> None:
    """Leave the process now (all ranks, after a barrier, exit code 0, nothing cleaned up) when the rehearsal asked
    to stop after the checkpoint of `step`; otherwise nothing. Called by every rank after a checkpoint is marked."""
    wanted = os.environ.get(STOP_AFTER_CHECKPOINT_ENV)
    if not wanted or int(wanted) != int(step):
        return
    import sys

    process_state().wait_for_everyone()
    print(f"[rehearsal] stopping after checkpoint-{step}, as a crash would", flush=True)
    sys.stderr.flush()
    os._exit(0)
