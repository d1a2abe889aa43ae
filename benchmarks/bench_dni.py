"""Synthetic-gradient training speed: a DNI epoch against plain BPTT(K, K) chunks, same run.

Same model and data (the copy task's embedding → 2-layer LSTM 50 → linear,
256,000 tokens, batch 64), same chunks; the loops alternate over several rounds
and the median is reported, with the DNI trained as in ``biaskit train``
(its own backward and Adam step per chunk).

    python benchmarks/bench_dni.py [--K 5] [--rounds 3] [--device cpu]
"""
from __future__ import annotations

import argparse

import torch
from copy_timing import copy_setup, interleaved_medians

from trainers import dni
from trainers.tbptt import Stream


def plain_epoch(model, opt, x, y, K):
    stream = Stream(x, y)
    while not stream.done:
        loss, _ = stream.window_loss(model, K, K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def dni_epoch(model, opt, x, y, K, module):
    stream = dni.SyntheticStream(x, y, module, model.system())
    dni_opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    while not stream.done:
        opt.zero_grad(set_to_none=True)
        _, _, dni_loss = stream.chunk_backward(model, K)
        if dni_loss is not None:
            dni_opt.zero_grad(set_to_none=True)
            dni_loss.backward()
            dni_opt.step()
        opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--K", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256_000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, opt, _, (x, y) = copy_setup(args.tokens, device)
    size = model.system().layout.size
    modules = {kind: shape({"size": size}).to(device) for kind, shape in dni.SHAPES.items()}
    loops = {"BPTT(K, K)": lambda: plain_epoch(model, opt, x, y, args.K)}
    for kind, module in modules.items():
        loops[f"{kind} DNI"] = lambda module=module: dni_epoch(model, opt, x, y, args.K, module)
    seconds = interleaved_medians(loops, args.rounds, device)
    base = seconds["BPTT(K, K)"]
    print(f"copy task, {x.numel()} tokens, K = {args.K}, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds}")
    for name, t in seconds.items():
        kind = name.removesuffix(" DNI")
        params = f", {sum(p.numel() for p in modules[kind].parameters())} DNI params" if kind in modules else ""
        print(f"  {name:<12} {t:6.2f} s/epoch  {x.numel() / t:8.0f} tokens/s  {t / base:.2f}x plain{params}")


if __name__ == "__main__":
    main()
