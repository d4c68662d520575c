"""Several processes with torchrun: gloo on CPU, nccl on GPU.

The same `vitlab train` command runs alone or under
`torchrun --nproc_per_node N`; torchrun's environment variables decide.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group if launched by torchrun; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# How long leaving the process group may take once every process has finished its work
DESTROY_TIMEOUT_S = 60.0


def shutdown(info: DistInfo, timeout_s: float = DESTROY_TIMEOUT_S) -> None:
    """Leave the group together: every process waits for the main one to finish its files (the last
    checkpoint, the test score) first. A process tearing its gloo connections down while the main one
    was still writing last.ckpt was once seen to abort (1 run in 9 of two CPU processes).

    Tearing the group down is then bounded: destroy_process_group() is known to hang now and then
    (pytorch/pytorch#75097), and a two-process CPU run of the test suite once stayed up for 10 minutes
    after its last line. Past the barrier nothing is left to write, so after timeout_s (by default
    DESTROY_TIMEOUT_S) this process says so in one line and goes on to exit instead of waiting."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        done = threading.Event()

        def destroy():
            dist.destroy_process_group()
            done.set()

        threading.Thread(target=destroy, name="vitlab-leave-group", daemon=True).start()
        if not done.wait(timeout_s):
            print(f"note: rank {info.rank}: leaving the process group took over {timeout_s:.0f} s; every file of the "
                  f"run is written, so this process exits without waiting", file=sys.stderr, flush=True)
