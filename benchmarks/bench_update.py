"""The K update's cost against the training epoch's, at each task's defaults, both controllers.

For each task (copy, the embedded language corpus, the simulated point process) at
its training defaults: one epoch of training, then one update of each controller on
the trained model, the exact controller's and the paper's (its light update on φ
alone, and its audited one, which also measures the exact bias, every
``audit_every``-th), each the median of ``--rounds``. Printed side by side as seconds
and as the share of the epoch; ``fewest``: the exact controller's update at
``--windows-min`` (64) windows, as after a certification with room to spare. Updates
come every epoch at first and, while K is settled, every 2, then 4 epochs
(``update_every_max``), so the share per epoch falls to a quarter of the per-update
figure; both are printed. ``trained``: the loop's own measurement of its BPTT(K1,
K2)'s bias (``rel_bias_trained``), every ``audit_every``-th update, on top of either
controller's.

    python benchmarks/bench_update.py [--tasks copy,language,point-process] [--rounds 3] [--threads 2]
                                      [--windows-min 64]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from trainers import config as configs
from trainers import loop
from trainers.cli import TASKS


def seconds(work, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="copy,language,point-process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows-min", type=int, default=64, help="the windows of the 'fewest' update")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'task':<14}{'epoch s':>9}{'exact s':>9}{'share':>7}{'fewest s':>10}{'share':>7}{'paper s':>9}{'share':>7}"
          f"{'audited s':>11}{'share':>7}{'settled share':>15}{'trained s':>11}{'share':>7}")
    for task in args.tasks.split(","):
        cfg = configs.full_config(task, {}, {**TASKS[task].TRAIN, "delta": 0.5, "epochs": 1})
        run = loop.Run(cfg, tempfile.mkdtemp() + "/run", quiet=True)
        epoch = seconds(run._train_epoch, 1)
        x, y = run.task.splits["train"]
        times = {}
        fewest = replace(run.controller, windows=args.windows_min)
        for name, controller, count in (("exact", "exact", 0), ("fewest", "exact", 0), ("paper", "paper", 1),
                                        ("audited", "paper", 0)):
            measuring = replace(fewest if name == "fewest" else run.controller, controller=controller)
            times[name] = seconds(lambda: measuring.measure(run.model, x, y, run.K, run.generator, count=count),
                                  args.rounds)
        K1, K2 = configs.truncation(cfg["train"], run.K)
        times["trained"] = seconds(lambda: run.estimator.measure(run.model, x, y, K1, K2, cfg["train"]["window"],
                                                                 cfg["train"]["windows"], run.generator), args.rounds)
        every = cfg["train"]["update_every_max"]
        print(f"{task:<14}{epoch:>9.2f}{times['exact']:>9.2f}{times['exact'] / epoch:>7.2f}{times['fewest']:>10.2f}"
              f"{times['fewest'] / epoch:>7.2f}{times['paper']:>9.2f}"
              f"{times['paper'] / epoch:>7.2f}{times['audited']:>11.2f}{times['audited'] / epoch:>7.2f}"
              f"{times['exact'] / epoch / every:>15.2f}{times['trained']:>11.2f}{times['trained'] / epoch:>7.2f}")


if __name__ == "__main__":
    main()
