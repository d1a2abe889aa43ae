"""decompose for all K versus (a) R naive truncated backward passes and (b) one plain BPTT.

2-layer LSTM, hidden 128, batch 32, loss at the last step.  Each measurement
runs in a fresh process so its peak resident memory is its own.  For long
windows (a) times every m-th K and scales by m (each K costs one forward and
a backward over K+1 steps, so an even sample of K is an unbiased estimate).

    python benchmarks/bench_decompose.py [--lengths 50 200 800] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch

HIDDEN, LAYERS, BATCH, FEATURES, CLASSES = 128, 2, 32, 32, 10


def _setup(R, device):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(FEATURES, HIDDEN, LAYERS, batch_first=True).to(device)
    head = torch.nn.Linear(HIDDEN, CLASSES).to(device)
    x = torch.randn(BATCH, R, FEATURES, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    return lstm, head, x, y


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _plain(lstm, head, x, y, K=None):
    """One nn.LSTM forward + backward; with K, the state entering step R-K is detached."""
    if K is None:
        out, _ = lstm(x)
    else:
        split = x.shape[1] - 1 - K
        if split > 0:
            _, (h, c) = lstm(x[:, :split])
            out, _ = lstm(x[:, split:], (h.detach(), c.detach()))
        else:
            out, _ = lstm(x)
    loss = torch.nn.functional.cross_entropy(head(out[:, -1]), y)
    return torch.autograd.grad(loss, [*lstm.parameters(), *head.parameters()])


def _measure(method, R, device, stride, repeats, queue):
    import biaskit

    torch.set_num_threads(torch.get_num_threads())
    lstm, head, x, y = _setup(R, device)
    system = biaskit.wrap(lstm, head, torch.nn.CrossEntropyLoss(reduction="none"))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run():
        if method == "decompose":
            biaskit.decompose(system, x, y, psi=False)
        elif method == "decompose+psi":
            biaskit.decompose(system, x, y, psi=True)
        elif method == "plain":
            _plain(lstm, head, x, y)
        elif method == "naive":
            for K in range(0, R, stride):
                _plain(lstm, head, x, y, K)

    run()  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2] * (stride if method == "naive" else 1)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    queue.put({"method": method, "R": R, "seconds": seconds, "peak_mb": peak_mb})


def measure(method, R, device, stride=1, repeats=3):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, R, device, stride, repeats, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 800])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    rows = []
    print(f"device={args.device} LSTM {LAYERS}x{HIDDEN}, batch {BATCH}, threads {torch.get_num_threads()}")
    print(f"{'R':>5} {'decompose s':>12} {'+psi s':>9} {'plain s':>9} {'naive s':>9} "
          f"{'naive/dec':>10} {'dec/plain':>10} {'peak MB dec/+psi/plain':>24}")
    for R in args.lengths:
        stride = max(1, R // 50)
        res = {m: measure(m, R, args.device, stride=stride if m == "naive" else 1,
                          repeats=1 if m == "naive" else 3)
               for m in ("decompose", "decompose+psi", "plain", "naive")}
        row = {
            "R": R,
            **{f"{m}_s": r["seconds"] for m, r in res.items()},
            **{f"{m}_peak_mb": r["peak_mb"] for m, r in res.items()},
            "naive_over_decompose": res["naive"]["seconds"] / res["decompose"]["seconds"],
            "decompose_over_plain": res["decompose"]["seconds"] / res["plain"]["seconds"],
            "psi_over_plain": res["decompose+psi"]["seconds"] / res["plain"]["seconds"],
            "naive_stride": stride,
        }
        rows.append(row)
        print(f"{R:>5} {row['decompose_s']:>12.3f} {row['decompose+psi_s']:>9.3f} {row['plain_s']:>9.3f} "
              f"{row['naive_s']:>9.2f} {row['naive_over_decompose']:>9.1f}x {row['decompose_over_plain']:>9.2f}x "
              f"{row['decompose_peak_mb']:>8.0f}/{row['decompose+psi_peak_mb']:.0f}/{row['plain_peak_mb']:.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
