"""How a multi-process run ends: a time budget that runs out on one rank stops every rank at the same step (a rank
stopping alone leaves the others in the next gradient all-reduce), and the process group is destroyed after the
engines that hold it are freed, on every rank, not at interpreter exit."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_steps(rank: int, port: int, budgets: list[float], out: dict) -> None:
    """One process of a 2-process gloo group: step a TimeBudget (rank-specific budget) and SePPO's out_of_time
    until each says stop; record the step at which each stopped."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="")  # fmt: skip
    import time

    from accelerate import Accelerator
    from transformers import TrainerControl, TrainerState

    from posttrain.trainers.callbacks import TimeBudget
    from posttrain.trainers.seppo_steps import out_of_time

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    budget, control = TimeBudget(budgets[rank], accelerator), TrainerControl()
    stopped = {}
    for step in range(1, 6):
        budget.on_step_begin(None, TrainerState(), control)
        time.sleep(0.05)
        budget.on_step_end(None, TrainerState(), control)
        if control.should_training_stop:
            stopped["time_budget"] = step
            break
    deadline = time.monotonic() + budgets[rank]
    for step in range(1, 6):
        time.sleep(0.05)
        if out_of_time(accelerator, deadline):
            stopped["seppo"] = step
            break
    out[rank] = stopped
    accelerator.wait_for_everyone()
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, ~10 s each on 2 cores
@pytest.mark.parametrize("budgets", [[0.0, 1e9], [1e9, 0.0]], ids=["rank0-out-of-time", "rank1-out-of-time"])
def test_a_time_budget_out_on_one_rank_stops_every_rank_at_the_same_step(budgets):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_stop_steps, args=(rank, port, budgets, out)) for rank in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        assert [proc.exitcode for proc in procs] == [0, 0]
        # the rank with no budget left stops at step 1, and the other with it, not at step 5 or never
        assert out[0] == out[1] == {"time_budget": 1, "seppo": 1}


def _end_with_a_cycle(rank: int, port: int, out: dict) -> None:
    """A DDP model kept alive by a reference cycle (as a Trainer and its callbacks keep theirs) when the run ends."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", CUDA_VISIBLE_DEVICES="")  # fmt: skip
    import weakref

    import torch
    import torch.distributed as dist

    from posttrain.models.processes import end_processes

    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    model(torch.ones(3, 4)).sum().backward()  # the reducer has run an all-reduce through the group
    holder = {"model": model}
    holder["self"] = holder  # the cycle
    engine = weakref.ref(model)
    del model, holder
    end_processes()
    out[rank] = {"engine_freed": engine() is None, "group_closed": not dist.is_initialized()}


def test_end_processes_frees_the_engines_that_hold_the_group_before_destroying_it():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = _free_port()
        procs = [ctx.Process(target=_end_with_a_cycle, args=(rank, port, out)) for rank in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=120)
        assert [proc.exitcode for proc in procs] == [0, 0]
        assert out[0] == out[1] == {"engine_freed": True, "group_closed": True}
