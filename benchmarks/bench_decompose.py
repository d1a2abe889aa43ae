"""decompose against one fused forward+backward, the per-lag method and naive per-K passes.

A 2-layer LSTM (hidden 128, batch 32 by default), loss at the last step. Each
method runs in a fresh process (so its peak memory is its own), after a
warm-up, and the median of ``--repeats`` is reported with its ratio to the
fused ``nn.LSTM`` forward+backward measured in the same run:

- ``plain``: one fused nn.LSTM forward and backward (oneDNN on CPU, cuDNN on CUDA, with PyTorch's
  defaults: TF32 on Ampere and later GPUs, where ``decompose``'s forward runs in full float32);
- ``decompose``: biaskit.decompose with its defaults (ψ, the estimated metric,
  8 window groups), what ``biaskit analyze`` and ``biaskit.audit`` run;
- ``decompose psi=False``: what the exact controller runs (16 groups, no metric);
- ``per-lag``: the authors' way of measuring φ, one backward pass per lag with
  ``retain_graph`` through the fused module run step by step (written here from
  its description: it yields φ only, no bias);
- ``naive``: every K's truncated gradient by its own forward and backward, the
  obvious way to the exact bias (every m-th K timed and scaled for long windows).

Every method runs with denormal floats flushed to zero (``decompose`` does so
itself): at long windows the cotangents vanish into denormals, which x86 CPUs
process ~100x slower, and a plain pass that pays for them (1.2 s instead of
0.1 s at R = 200 here) would flatter every ratio. ``--denormals`` keeps
PyTorch's default for the other methods, to see what an unprepared run costs.

    python benchmarks/bench_decompose.py [--lengths 50 200 800] [--device cpu|cuda]
                                         [--hidden 128] [--batch 32] [--methods ...] [--denormals]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

import torch

LAYERS, FEATURES, CLASSES = 2, 32, 10
METHODS = ("plain", "decompose", "decompose psi=False", "per-lag", "naive")


def _setup(R, device, hidden, batch):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(FEATURES, hidden, LAYERS, batch_first=True).to(device)
    head = torch.nn.Linear(hidden, CLASSES).to(device)
    x = torch.randn(batch, R, FEATURES, device=device)
    y = torch.randint(0, CLASSES, (batch,), device=device)
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


def _per_lag(lstm, head, x, y):
    """φ_k for every lag by one backward pass per lag through a step-by-step run of the fused module."""
    states, hx = [], None
    for t in range(x.shape[1]):
        _, hx = lstm(x[:, t:t + 1], hx)
        states.append(hx)
    loss = torch.nn.functional.cross_entropy(head(states[-1][0][-1]), y, reduction="sum")
    phi = []
    for k in range(x.shape[1]):
        grads = torch.autograd.grad(loss, states[-1 - k], retain_graph=True, allow_unused=True)
        phi.append(torch.cat([g.transpose(0, 1).flatten(1) for g in grads if g is not None], 1).norm(dim=1))
    return torch.stack(phi, 1)


def _measure(method, R, device, hidden, batch, stride, repeats, denormals, queue):
    import biaskit

    torch.set_num_threads(torch.get_num_threads())
    torch.set_flush_denormal(not denormals)
    lstm, head, x, y = _setup(R, device, hidden, batch)
    system = biaskit.wrap(lstm, head, torch.nn.CrossEntropyLoss(reduction="none"))

    def run(x):
        if method == "decompose":
            biaskit.decompose(system, x, y)
        elif method == "decompose psi=False":
            biaskit.decompose(system, x, y, psi=False, metric=False, groups=16)
        elif method == "plain":
            _plain(lstm, head, x, y)
        elif method == "per-lag":
            _per_lag(lstm, head, x, y)
        elif method == "naive":
            for K in range(0, x.shape[1], stride):
                _plain(lstm, head, x, y, K)

    run(x[:, :min(R, 10)])  # loads what the method loads (modules, kernels) before its memory is counted
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(x)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2] * (stride if method == "naive" else 1)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    queue.put({"method": method, "R": R, "seconds": seconds, "peak_mb": peak_mb})


def measure(method, R, device, hidden, batch, stride=1, repeats=3, denormals=False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(method, R, device, hidden, batch, stride, repeats, denormals, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 400, 800])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--denormals", action="store_true",
                        help="leave denormal floats on for the methods other than decompose (PyTorch's default)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"device={args.device} LSTM {LAYERS}x{args.hidden}, batch {args.batch}, threads {torch.get_num_threads()}; "
          f"denormals {'on' if args.denormals else 'flushed'}; seconds (ratio to plain) and peak MB")
    rows = []
    for R in args.lengths:
        stride = max(1, R // 25)
        res = {m: measure(m, R, args.device, args.hidden, args.batch, stride=stride if m == "naive" else 1,
                          repeats=1 if m in ("naive", "per-lag") else args.repeats, denormals=args.denormals)
               for m in args.methods}
        base = res.get("plain", {}).get("seconds")
        row = {"R": R, **{f"{m} s": r["seconds"] for m, r in res.items()},
               **{f"{m} MB": r["peak_mb"] for m, r in res.items()}}
        rows.append(row)
        cells = [f"{m}: {r['seconds']:.3f}s" + (f" ({r['seconds'] / base:.1f}x)" if base else "") +
                 f" {r['peak_mb']:.0f}MB" for m, r in res.items()]
        print(f"R={R:>4}  " + " | ".join(cells))
        if "per-lag" in res and "decompose psi=False" in res:
            print(f"        per-lag / decompose psi=False: "
                  f"{res['per-lag']['seconds'] / res['decompose psi=False']['seconds']:.1f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
