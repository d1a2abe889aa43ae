"""Trainer speed: tokens/s against a minimal hand-written TBPTT loop, and the K controller's share.

Same model (the copy task's embedding → 2-layer LSTM 50 → linear), same
BPTT(2K, K), same batch, same SGD step; the two loops alternate over several
rounds and the median is reported. The controller's share is one update
(64 windows of W = 100, as in the paper) over one epoch of 256,000 tokens.

    python benchmarks/bench_trainer.py [--K 15] [--rounds 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics

import torch
from copy_timing import copy_setup, interleaved_medians

from trainers.adaptive import Controller
from trainers.tbptt import Stream


def trainer_loop(model, opt, x, y, K):
    """The trainer's own windows (trainers.tbptt.Stream)."""
    stream = Stream(x, y)
    while not stream.done:
        loss, _ = stream.window_loss(model, 2 * K, K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def hand_written_loop(model, opt, x, y, K):
    """What one would write by hand for BPTT(2K, K): burn in K steps, train on the next K."""
    state = None
    for i in range(0, x.shape[1], K):
        lo = max(0, i - K)
        if i > lo:
            _, mid = model(x[:, lo:i], state)
        else:
            mid = None
        state = None if mid is None else tuple(s.detach() for s in mid)
        out, _ = model(x[:, i:i + K], mid)
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), y[:, i:i + K].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--K", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, opt, (xs, ys), (x, y) = copy_setup(args.tokens, device)
    tokens = x.numel()
    epoch = interleaved_medians({"trainer": lambda: trainer_loop(model, opt, x, y, args.K),
                                 "hand-written": lambda: hand_written_loop(model, opt, x, y, args.K)},
                                args.rounds, device)

    controller = Controller(delta=0.5, window=100, windows=64, K_min=2, K_max=100)
    gen = torch.Generator().manual_seed(0)
    controller.measure(model, xs, ys, args.K, gen)  # warm-up
    update = statistics.median(
        controller.measure(model, xs, ys, args.K, gen).update_seconds for _ in range(args.rounds))

    print(f"device={device} threads={torch.get_num_threads()} copy task, {tokens} tokens/epoch, "
          f"BPTT({2 * args.K}, {args.K}), batch 64")
    for name, sec in epoch.items():
        print(f"  {name:>13}: {sec:7.2f} s/epoch  {tokens / sec:9.0f} tokens/s")
    print(f"  trainer / hand-written tokens/s: {epoch['hand-written'] / epoch['trainer']:.3f}")
    print(f"  K update (64 windows x W=100): {update:.3f} s = {100 * update / epoch['trainer']:.1f}% of an epoch")


if __name__ == "__main__":
    main()
