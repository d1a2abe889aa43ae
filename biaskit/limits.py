"""How much memory this process may really use, and the check every builder makes before allocating.

A size in a config or on the command line (layers, tokens, events, a
vocabulary) is estimated and compared with this figure *before* anything is
built, so a hostile or mistaken size is refused with the figures instead of
hanging, swapping or dying with ``bad_alloc``. On the host the figure is the
smallest of: the kernel's ``MemAvailable``, the headroom under ``ulimit -v``
(``RLIMIT_AS``) and the headroom under the process's cgroup ``memory.max``
(v2) or ``memory.limit_in_bytes`` (v1), where readable. On CUDA it is the
allocator's free memory.
"""
from __future__ import annotations

import os
import resource
from pathlib import Path

import torch

from .errors import InputError

#: Bytes per element of the float32 tensors models and data use.
FLOAT = 4
#: A trained parameter costs its weight, its gradient and two optimizer moments (Adam's).
PER_PARAMETER = 4 * FLOAT


def _read_int(path: Path) -> int | None:
    """The number in a one-number kernel file, None when absent, unreadable or "max"."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _meminfo() -> int:
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _address_space_headroom() -> int | None:
    """What ``ulimit -v`` still allows this process to map, or None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as fh:
            used = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def _cgroup_headroom() -> int | None:
    """What this process's memory cgroup still allows (its limit less its usage), or None.

    Both the cgroup named in ``/proc/self/cgroup`` and the mount's root are read (inside a
    container the root is the container's own cgroup); the tighter one counts.
    """
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    headrooms = []
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # cgroup v2
            mount, limit, usage = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # cgroup v1
            mount, limit, usage = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        for folder in (mount / where.lstrip("/"), mount):
            cap = _read_int(folder / limit)
            if cap is not None and cap < 2**60:  # v1 writes "no limit" as a huge number, v2 as "max"
                headrooms.append(max(cap - (_read_int(folder / usage) or 0), 0))
    return min(headrooms, default=None)


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes this process can still allocate on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    figures = [_meminfo(), _address_space_headroom(), _cgroup_headroom()]
    return min(f for f in figures if f is not None)


def gib(n: float) -> str:
    """Bytes in GiB for a message: three figures, or whole GiB from 100 up."""
    n /= 2**30
    return f"{n:,.0f} GiB" if n >= 100 else f"{n:.3g} GiB"


def require(parts: dict[str, float], what: str, advice: str, device: torch.device | str = "cpu") -> None:
    """Refuse, with the figures, work whose estimated ``parts`` (bytes by name) exceed the memory free.

    ``what`` names the work ("the copy task"), ``advice`` says how to shrink it.
    """
    need, free = sum(parts.values()), available_memory(device)
    if need > free:
        shown = ", ".join(f"{name} {gib(size)}" for name, size in parts.items() if size)
        raise InputError(f"{what} needs about {gib(need)} ({shown}), but this process may use {gib(free)} on "
                         f"{torch.device(device)}: {advice}")
