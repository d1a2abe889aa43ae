"""Data-parallel training on torch.distributed: which process this is, and what it owns.

Launched by ``torchrun`` (the environment holds ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``), a run starts a process group (gloo on CPU, NCCL on CUDA, rank r
on its local GPU), wraps the model in ``DistributedDataParallel`` and gives each
rank its share of the parallel streams, so ``--batch-size`` stays the global
batch. Rank 0 alone writes the run directory; an error found there is raised on
every rank, so no process waits forever for another that has stopped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from biaskit.errors import InputError


@dataclass(frozen=True)
class Ranks:
    """This process's place: rank, world size and the group (None for one process)."""

    rank: int = 0
    world: int = 1
    group: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0


#: One process, no group: the default where a caller runs outside torch.distributed.
ONE = Ranks()


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """The process group torchrun asks for (none for one process), and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), dist.group.WORLD), device


def share(total: int, ranks: Ranks, what: str) -> slice:
    """This rank's contiguous share of ``total`` items (streams, windows), which must divide evenly."""
    if total % ranks.world:
        raise InputError(f"{what} ({total}) must divide evenly among the {ranks.world} processes")
    size = total // ranks.world
    return slice(ranks.rank * size, (ranks.rank + 1) * size)


def on_main(ranks: Ranks, work: Callable):
    """``work()`` on rank 0; its InputError, if any, raised on every rank. Returns rank 0's result
    (None elsewhere)."""
    result, message = None, None
    if ranks.main:
        try:
            result = work()
        except InputError as err:
            message = str(err)
    if ranks.world > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0, group=ranks.group)
        message = box[0]
    if message is not None:
        raise InputError(message)
    return result


def agree(ranks: Ranks, check: Callable):
    """``check()`` on every rank; the first rank's InputError (by rank) raised on all of them."""
    message = None
    try:
        check()
    except InputError as err:
        message = str(err)
    if ranks.world > 1:
        every = [None] * ranks.world
        dist.all_gather_object(every, message, group=ranks.group)
        message = next((m for m in every if m is not None), None)
    if message is not None:
        raise InputError(message)


def gather(obj, ranks: Ranks) -> list:
    """Every rank's ``obj``, in rank order (a list of one for one process)."""
    if ranks.world == 1:
        return [obj]
    every = [None] * ranks.world
    dist.all_gather_object(every, obj, group=ranks.group)
    return every


def total(value: float, ranks: Ranks) -> float:
    """``value`` summed over the ranks."""
    if ranks.world == 1:
        return value
    nccl = dist.get_backend(ranks.group) == "nccl"
    t = torch.tensor([value], dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(t, group=ranks.group)
    return float(t)


def average_gradients(module: torch.nn.Module, ranks: Ranks) -> None:
    """Replace each parameter's ``.grad`` by its mean over the ranks, as DistributedDataParallel does
    for the model (for modules trained beside it, such as the DNI)."""
    if ranks.world == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=ranks.group)
            param.grad /= ranks.world
