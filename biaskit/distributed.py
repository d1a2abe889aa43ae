"""torch.distributed for the decomposition: the sums that define the bias, over every rank's windows.

With ``process_group=None`` every helper is the identity, so single-process
code pays nothing. With a group, each rank holds its own windows: sums over
windows are all-reduced (every rank then holds the same totals), and
per-window or per-group rows are gathered in rank order, so every rank ends
with the Dataset one process holding all the windows would have produced.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world(group) -> int:
    """Processes in ``group`` (1 without one)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(tensors: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Each tensor summed over the ranks of ``group`` (in place; returned for chaining)."""
    if group is not None:
        for t in tensors.values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return tensors


def mean(tensor: torch.Tensor, group) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks of ``group``."""
    if group is None:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor / world(group)


def total(count: int, group) -> int:
    """``count`` summed over the ranks of ``group``."""
    if group is None:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return int(t)


def _counts(count: int, group, device) -> list[int]:
    """Every rank's ``count``, in rank order."""
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world(group))]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=device), group=group)
    return [int(c) for c in counts]


def offset(count: int, group) -> int:
    """Rows the ranks before this one hold, when each holds ``count`` (0 without a group)."""
    return 0 if group is None else sum(_counts(count, group, _device(group))[:dist.get_rank(group)])


def gather_rows(tensor: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows (first dimension) of ``tensor``, in rank order; rows may differ in number."""
    if group is None:
        return tensor
    counts = _counts(tensor.shape[0], group, tensor.device)
    most = max(counts)
    padded = tensor.new_zeros(most, *tensor.shape[1:])
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


gather_samples = gather_rows  # per-window rows: φ, ψ, the loss
gather_groups = gather_rows   # per-group rows: the jackknife's pieces


def _device(group) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else \
        torch.device("cpu")
