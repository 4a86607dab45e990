"""accelerate's process state, made right for a multi-process launch on a machine without GPUs.

accelerate (1.10-1.15) picks a distributed backend only for an accelerator device, or for `cpu=True`, which
its `launch` never passes on: a 2-process `accelerate launch` on CPUs (torchrun under `--multi_gpu`, or the
DeepSpeed launcher) gives `PartialState` no backend, so every rank reports process 0 of 1. Barriers are then
skipped (rank 1 read `base_model/` before rank 0 had written it), the data is not split between the ranks, and
every rank writes the run dir. (`accelerate launch --cpu` and a `MULTI_CPU` config start only one process
unless run under mpirun.) The fix is the first `PartialState` of the process, built with what accelerate needs
to see the real world: `cpu=True` for DDP over gloo; for DeepSpeed, the gloo backend that DeepSpeed's CPU
accelerator initialises (`cpu=True` would turn DeepSpeed off). Everything else is accelerate's own state.

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


def process_state() -> Any:
    """accelerate's `PartialState` (a per-process singleton: the first call decides it, later ones share it)."""
    from accelerate import PartialState

    if launched_on_cpu() and not PartialState._shared_state:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            return PartialState(backend="gloo")
        return PartialState(cpu=True)
    return PartialState()


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
