"""Denormal floats flushed to zero on every CPU thread while biaskit computes.

At long lags an RNN's cotangents vanish below float32's smallest normal number,
where x86 CPUs are far slower, and a tail that small is zero at float32's
precision anyway. ``torch.set_flush_denormal`` sets the calling thread's flag
alone, so ``set_flush`` then ends that thread's OpenMP workers
(``omp_pause_resource_all``) and the next parallel operation starts new ones,
which inherit it; without that routine the calling thread alone flushes: slower,
the same numbers. How much slower, and why: ``docs/denormals.md``.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

OMP_PAUSE_SOFT = 1


def flushing() -> bool:
    """Whether this thread flushes denormal floats to zero now (torch has no getter)."""
    return bool((torch.full((1,), 1e-30) * 1e-9).item() == 0)


@functools.cache
def _pause():
    """``omp_pause_resource_all`` of the OpenMP runtime torch has loaded (never loading one), or None."""
    if not hasattr(os, "RTLD_NOLOAD"):  # Windows: no way to look without loading
        return None
    lib = Path(torch.__file__).parent / "lib"
    bundled = sorted(str(p) for pattern in ("libgomp*", "libomp*", "libiomp*") for p in lib.glob(pattern))
    for name in (*bundled, "libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib"):
        try:
            runtime = ctypes.CDLL(name, mode=os.RTLD_NOLOAD | ctypes.RTLD_LOCAL)
            pause = runtime.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    return None


def set_flush(on: bool) -> None:
    """``torch.set_flush_denormal(on)`` for the calling thread and the OpenMP workers it starts."""
    torch.set_flush_denormal(on)
    pause = _pause()
    if pause is not None:
        pause(OMP_PAUSE_SOFT)  # -1 inside a parallel region, where nothing is ended: harmless


def flushed(fn):
    """Run ``fn`` with denormal floats flushed on every CPU thread, then restore the caller's setting."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        before = flushing()
        set_flush(True)
        try:
            return fn(*args, **kwargs)
        finally:
            set_flush(before)

    return run
