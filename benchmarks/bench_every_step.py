"""Losses at every step against the last step's: decompose on the same windows, and naive per-K passes.

An embedding, an LSTM and a linear readout (the copy task's model by default:
hidden 50, 256 windows, 16 groups, no ψ and no metric, what the exact
controller runs), for each window length R:

- ``last``: ``decompose(..., loss_at="last")``, the paper's BPTT(R, 1);
- ``every``: ``decompose(..., loss_at="every")``, BPTT(R, 1) at every step, by lag bands;
- ``naive every``: ``truncated_gradient(..., K, loss_at="every")`` for every K, one detached unroll
  per loss position and K (every m-th K timed and scaled), the obvious way to the same numbers.

The median of ``--repeats`` after a warm-up, and the ratios every/last and naive/every.
Then ψ at every step (what ``analyze`` runs) on ``--psi-windows`` windows: each row's
product norm from the gates' cotangents (``bands.gate_norms``, the default for the
built-in cells) against forming each row's product (what other cells take).

    python benchmarks/bench_every_step.py [--lengths 25 50 100] [--hidden 50] [--windows 256] [--psi-windows 32]
"""
from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from torch import nn

import biaskit
from biaskit import bands

VOCAB = 10


def problem(R: int, hidden: int, windows: int):
    torch.manual_seed(0)
    emb, lstm, head = nn.Embedding(VOCAB, 10), nn.LSTM(10, hidden, batch_first=True), nn.Linear(hidden, VOCAB)
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"), encoder=emb)
    return system, torch.randint(0, VOCAB, (windows, R)), torch.randint(0, VOCAB, (windows, R))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--hidden", type=int, default=50)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-windows", type=int, default=16, help="windows for the naive passes (scaled)")
    parser.add_argument("--psi-windows", type=int, default=32, help="windows for the ψ comparison")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}, hidden {args.hidden}, {args.windows} windows, 16 groups, psi=False")
    print(f"{'R':>5} {'last s':>8} {'every s':>8} {'every/last':>10} {'naive every s':>14} {'naive/every':>11}")
    for R in args.lengths:
        system, x, y = problem(R, args.hidden, args.windows)
        kw = dict(psi=False, metric=False, groups=16)
        last = timed(lambda: biaskit.decompose(system, x, y[:, -1], **kw), args.repeats)
        every = timed(lambda: biaskit.decompose(system, x, y, loss_at="every", **kw), args.repeats)
        n = args.naive_windows
        stride = max(1, R // 8)
        began = time.perf_counter()
        for K in range(0, R, stride):
            biaskit.truncated_gradient(system, x[:n], y[:n], K, loss_at="every")
        naive = (time.perf_counter() - began) * stride * (args.windows / n)
        print(f"{R:>5} {last:>8.3f} {every:>8.3f} {every / last:>10.1f} {naive:>14.1f} {naive / every:>11.0f}")
    print(f"\npsi=True at every step, {args.psi_windows} windows")
    print(f"{'R':>5} {'no psi s':>9} {'gates s':>8} {'single products s':>18} {'single/gates':>13}")
    for R in args.lengths:
        system, x, y = problem(R, args.hidden, args.psi_windows)

        def every(psi):
            return timed(lambda: biaskit.decompose(system, x, y, loss_at="every", psi=psi, metric=False, groups=16),
                         args.repeats)

        plain, gates = every(False), every(True)
        with mock.patch.object(bands, "gate_norms_apply", lambda *a: False):
            single = every(True)
        print(f"{R:>5} {plain:>9.3f} {gates:>8.3f} {single:>18.3f} {single / gates:>13.1f}")


if __name__ == "__main__":
    main()
