"""The first decompose in a fresh process (what ``biaskit analyze`` pays), against the same with the
metric's probes through torch.func, whose first use imports torch._dynamo.

The LSTM of ``bench_decompose`` (2 × 128, batch 32, R = 200), ``decompose`` with its defaults. Each
way runs in its own fresh process, ``--repeats`` times, alternating; the warm call is the second one
in the same process:

- ``written out``: biaskit's fast path as it is (the readout by torch.autograd, the probes through
  each cell's forward-mode product written out);
- ``torch.func``: the probes through ``torch.func.jvp`` (``fastpath.metric_applies`` off).

    python benchmarks/bench_first_call.py [--repeats 3] [--length 200]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time

WAYS = ("written out", "torch.func")


def _measure(way, R, queue):
    import torch
    from bench_decompose import _setup

    import biaskit
    from biaskit import fastpath

    if way == "torch.func":
        fastpath.metric_applies = lambda *a: False
    lstm, head, x, y = _setup(R, "cpu", 128, 32)
    system = biaskit.wrap(lstm, head, torch.nn.CrossEntropyLoss(reduction="none"))
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        biaskit.decompose(system, x, y)
        times.append(time.perf_counter() - t0)
    queue.put({"first": times[0], "warm": times[1], "dynamo": "torch._dynamo" in sys.modules})


def measure(way, R):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(way, R, queue))
    proc.start()
    result = queue.get(timeout=600)  # a child that failed has printed why
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--length", type=int, default=200)
    args = parser.parse_args()
    runs = {way: [] for way in WAYS}
    for _ in range(args.repeats):
        for way in WAYS:
            runs[way].append(measure(way, args.length))
    for way, results in runs.items():
        first = [r["first"] for r in results]
        warm = [r["warm"] for r in results]
        print(f"{way:>12}: first {min(first):.2f}-{max(first):.2f} s (median {statistics.median(first):.2f}), "
              f"warm {min(warm):.2f}-{max(warm):.2f} s, torch._dynamo imported: {results[0]['dynamo']}")
    ratio = statistics.median(r["first"] for r in runs["torch.func"]) / \
        statistics.median(r["first"] for r in runs["written out"])
    print(f"first call, torch.func / written out: {ratio:.1f}x")


if __name__ == "__main__":
    main()
