"""accelerate's process state, made right for a multi-process launch on a machine without GPUs.

accelerate (1.10-1.15) picks a distributed backend only for an accelerator device, or for `cpu=True`, which
its `launch` never passes on: a 2-process `accelerate launch` on CPUs (torchrun under `--multi_gpu`, or the
DeepSpeed launcher) gives `PartialState` no backend, so every rank reports process 0 of 1. Barriers are then
skipped (rank 1 read `base_model/` before rank 0 had written it), the data is not split between the ranks, and
every rank writes the run dir. (`accelerate launch --cpu` and a `MULTI_CPU` config start only one process
unless run under mpirun.) The fix is the first `PartialState` of the process, built with what accelerate needs
to see the real world: `cpu=True` for DDP over gloo; for DeepSpeed, the gloo backend that DeepSpeed's CPU
accelerator initialises (`cpu=True` would turn DeepSpeed off). Everything else is accelerate's own state.
"""

from __future__ import annotations

import os
from typing import Any


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
