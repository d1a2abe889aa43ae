"""Shared by the training benchmarks: the copy task's model and stream, and interleaved timing."""
from __future__ import annotations

import statistics
import time

import torch

from trainers.tasks import copy
from trainers.tbptt import batchify


def copy_setup(tokens: int, device: torch.device):
    """The copy task's model (embedding → 2-layer LSTM 50 → linear), an SGD optimizer, and the
    training stream, raw (time first) and batchified into 64 streams on ``device``."""
    task = copy.build({"train_tokens": tokens, "valid_tokens": 1000, "test_tokens": 1000})
    model = task.model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = task.splits["train"]
    return model, opt, (xs, ys), (batchify(xs, 64).to(device), batchify(ys, 64).to(device))


def interleaved_medians(loops: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each zero-argument callable, the callables taking turns for ``rounds``."""
    times = {name: [] for name in loops}
    for _ in range(rounds):
        for name, run in loops.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}
