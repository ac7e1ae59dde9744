"""Several processes training one model under torchrun: rank and size, process group, averaged gradients, exit.

Each rank takes its own windows of the step's batch; gradients are averaged with all_reduce before every optimizer
step (gloo on CPU, nccl on CUDA); rank 0 alone logs, checkpoints and exports. A single process (no torchrun) is
world size 1 and none of this costs anything.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def average_gradients(params) -> None:
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= size


def mean_across_ranks(value: float) -> float:
    """The mean of a scalar over the ranks (a step's loss, for the log)."""
    _, size = world()
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item() / size


def from_rank0(values: list[int]) -> list[int]:
    """Rank 0's integers on every rank: decisions that must agree (when to stop, how many steps the budget allows)."""
    _, size = world()
    if size == 1:
        return values
    t = torch.tensor(values, dtype=torch.int64)
    dist.broadcast(t, src=0)
    return t.tolist()


@contextmanager
def rank0_first():
    """Rank 0 runs the block first, the others after it (for work that writes what they then read)."""
    rank, size = world()
    if size > 1 and rank > 0:
        dist.barrier()
    yield
    if size > 1 and rank == 0:
        dist.barrier()


def finish() -> None:
    """Wait for every rank, then leave the process group."""
    if world()[1] > 1:
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int) -> None:
    """Leave a process of a multi-process run with `code`, without interpreter teardown.

    After the work is done, written and the process group destroyed, gloo's threads can still be winding down when
    Python's finalisation runs static destructors, and the process then aborts ("terminate called without an active
    exception", exit -6) although nothing is wrong: about one run in four here. `os._exit` skips that teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_main(main) -> None:
    """`if __name__ == "__main__"` of a script torchrun may start: exit with main()'s code, workers via exit_worker."""
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_worker(code)
    sys.exit(code)
