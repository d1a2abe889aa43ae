"""fit_decay + bias_bound on a φ table versus the decompose that produced it.

The adaptive trainer refits β and recomputes κ̂(δ) every epoch, so the
statistics must cost a small fraction (target < 5%) of one decompose.
2-layer LSTM, hidden 128, batch 64, window 400, psi=False; median of repeats.
The forget gates start with bias +2 (a common initialisation for long memory)
so that φ decays slowly and stays far from float32 underflow over 400 lags:
with PyTorch's default initialisation the mean norm is exactly zero past lag
~200 and fit_decay takes its trivial "vanished" path, which would flatter it.

    python benchmarks/bench_decay.py [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import biaskit
from biaskit.bias import bias_bound
from biaskit.decay import fit_decay

HIDDEN, LAYERS, BATCH, WINDOW, FEATURES, CLASSES = 128, 2, 64, 400, 32, 10
DELTAS = [0.5, 0.1, 0.01]
FORGET_BIAS = 2.0


def median_seconds(run, repeats, device):
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    lstm = torch.nn.LSTM(FEATURES, HIDDEN, LAYERS, batch_first=True)
    with torch.no_grad():
        for layer in range(LAYERS):
            getattr(lstm, f"bias_hh_l{layer}")[HIDDEN:2 * HIDDEN] += FORGET_BIAS  # gates i, f, g, o
    lstm = lstm.to(args.device)
    head = torch.nn.Linear(HIDDEN, CLASSES).to(args.device)
    system = biaskit.wrap(lstm, head, torch.nn.CrossEntropyLoss(reduction="none"))
    x = torch.randn(BATCH, WINDOW, FEATURES, device=args.device)
    y = torch.randint(0, CLASSES, (BATCH,), device=args.device)

    ds = biaskit.decompose(system, x, y, psi=False)  # warm-up, and the table to fit
    decompose_s = median_seconds(lambda: biaskit.decompose(system, x, y, psi=False), args.repeats, args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} LSTM {LAYERS}x{HIDDEN}, "
          f"phi table {BATCH} x {WINDOW}; decompose {decompose_s:.3f} s (median of {args.repeats})")
    print(f"{'statistics':<32} {'seconds':>9} {'/ decompose':>12}  fit")
    for label, kwargs in [
        ("regression, tau=0.9R (default)", {}),
        ("max, tau=0.9R", {"method": "max"}),
        ("regression, tau='auto'", {"tau": "auto"}),
    ]:
        def statistics_pass():
            bias_bound(ds, fit_decay(ds, **kwargs), DELTAS)

        statistics_pass()  # warm-up
        seconds = median_seconds(statistics_pass, max(5, args.repeats), args.device)
        print(f"{label:<32} {seconds:>9.4f} {100 * seconds / decompose_s:>11.2f}%  {fit_decay(ds, **kwargs)!r}")


if __name__ == "__main__":
    main()
