"""The trained BPTT(K1, K2)'s bias (``rel_bias_trained``): the module's fused chunks against stepping it.

For each task at its training defaults: one epoch of training, then the loop's
own measurement of its BPTT(2K, K)'s relative bias on 32 fresh windows
(``trainers.tbptt.Truncation.measure``, through ``synthetic_bias``), with each
chunk run by the module's own fused forward (``TorchRecurrent.run``, the default)
and stepped one step at a time (``RecurrentSystem.run``, what it did before),
each the median of ``--rounds``, as seconds and as a share of the epoch. Both
give the same bias (printed, to float32 rounding).

    python benchmarks/bench_trained_bias.py [--tasks copy,language,point-process] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
from unittest import mock

import torch
from bench_update import seconds

from biaskit.recurrent import RecurrentSystem, TorchRecurrent
from trainers import config as configs
from trainers import loop
from trainers.cli import TASKS
from trainers.tbptt import Truncation


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="copy,language,point-process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'task':<14}{'epoch s':>9}{'fused s':>9}{'share':>7}{'stepped s':>11}{'share':>7}{'speed-up':>10}"
          f"{'bias (fused, stepped)':>26}")
    for task in args.tasks.split(","):
        cfg = configs.full_config(task, {}, {**TASKS[task].TRAIN, "epochs": 1})
        run = loop.Run(cfg, tempfile.mkdtemp() + "/run", quiet=True)
        epoch = seconds(run._train_epoch, 1)
        x, y = run.task.splits["train"]
        K, window = cfg["train"]["K"], cfg["train"]["window"]
        biases = {}

        def measure(name):
            found = Truncation().measure(run.model, x, y, 2 * K, K, window, 32, torch.Generator().manual_seed(0))
            biases[name] = found["rel_bias_trained"]

        fused = seconds(lambda: measure("fused"), args.rounds)
        with mock.patch.object(TorchRecurrent, "run", RecurrentSystem.run):
            stepped = seconds(lambda: measure("stepped"), args.rounds)
        print(f"{task:<14}{epoch:9.2f}{fused:9.2f}{fused / epoch:7.2f}{stepped:11.2f}{stepped / epoch:7.2f}"
              f"{stepped / fused:9.1f}x{biases['fused']:13.4g}{biases['stepped']:13.4g}")


if __name__ == "__main__":
    main()
