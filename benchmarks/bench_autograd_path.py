"""The autograd path against torch.func's batched path, on one cell both can measure.

A leaky tanh cell (``tests/helpers.LeakyCell``'s step) with a linear readout,
decomposed twice on the same windows: as it is (``generic``: torch.func,
batched over steps and groups) and with an identity gradient hook on its
recurrent weight, which sends it down the autograd path (a backward pass per
step and group of windows, per window for ψ) and changes no number. The median
of ``--repeats`` after a warm-up, with and without ψ, and the ratio
autograd/batched: what a cell torch.func cannot follow pays.

    python benchmarks/bench_autograd_path.py [--length 100] [--windows 64] [--hidden 32]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import biaskit

INPUTS = 4


class Leaky(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.hidden = hidden
        self.inp, self.rec = nn.Linear(INPUTS, hidden), nn.Linear(hidden, hidden, bias=False)

    def initial_state(self, batch):
        return torch.zeros(batch, self.hidden)

    def forward(self, x, h):
        return 0.5 * h + 0.5 * torch.tanh(self.inp(x) + self.rec(h))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    cell, hooked = Leaky(args.hidden), Leaky(args.hidden)
    hooked.load_state_dict(cell.state_dict())
    hooked.rec.weight.register_hook(lambda g: g)
    head, loss = nn.Linear(args.hidden, 3), nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(args.windows, args.length, INPUTS), torch.randint(0, 3, (args.windows,))
    print(f"R = {args.length}, {args.windows} windows, hidden {args.hidden}, {args.groups} groups, "
          f"{torch.get_num_threads()} threads")
    print(f"{'psi':>5} {'batched s':>10} {'autograd s':>11} {'autograd/batched':>17}")
    for psi in (False, True):
        def run(module):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return biaskit.decompose(biaskit.wrap(module, head, loss), x, y, psi=psi, metric=False,
                                         groups=args.groups)
        a, b = run(cell), run(hooked)
        assert b.attrs["path"].startswith("generic, autograd") and a.attrs["path"] == "generic"
        assert abs(a["rel_bias"] - b["rel_bias"]).max() < 1e-4  # the same numbers either way
        batched, autograd = timed(lambda: run(cell), args.repeats), timed(lambda: run(hooked), args.repeats)
        print(f"{str(psi):>5} {batched:>10.3f} {autograd:>11.3f} {autograd / batched:>17.1f}")


if __name__ == "__main__":
    main()
