"""Data-parallel training: tokens/s of 1 and 2 gloo processes on the CPU, and the K update's share.

Each configuration trains ``--epochs`` adaptive epochs (the exact controller,
one update per epoch) of the copy task and of the embedded language corpus at
their default settings, as torchrun would start them (the environment says
rank and world size), one thread per process. Reported per run: tokens per
second of training, seconds per K update, and the update's share of an
epoch's time. On a machine with fewer cores than processes a speed-up cannot
show; what two processes on two cores show is the synchronisation's cost.

    python benchmarks/bench_distributed.py [--processes 1 2] [--epochs 1] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

SETTINGS = {"copy": ("copy", {}, {"delta": 0.5}),
            "language": ("language", {"embedding": 128, "hidden": 128}, {"delta": 0.5, "window": 100})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: dict, out: str, device: str):
    import torch.distributed as dist

    from trainers.loop import Run

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    Run(config, out, device=device, quiet=True).fit()
    if world > 1:
        dist.destroy_process_group()


def measure(task: str, world: int, epochs: int, device: str) -> dict:
    from trainers import config as configs
    from trainers.cli import TASKS

    name, task_config, train = SETTINGS[task]
    config = configs.full_config(name, task_config, {**TASKS[name].TRAIN, "epochs": epochs, **train})
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        mp.spawn(_worker, args=(world, _free_port(), config, out, device), nprocs=world)
        lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    seconds = sum(line["seconds"] for line in lines)
    updates = sum(line.get("update_seconds", 0) for line in lines)
    return {"task": task, "processes": world, "tokens_per_s": sum(line["tokens_per_s"] for line in lines) / len(lines),
            "update_seconds": updates / len(lines), "update_share": updates / (seconds + updates)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{'task':<10}{'processes':>10}{'tokens/s':>12}{'K update s':>12}{'update share':>14}{'vs 1 process':>14}")
    for task in args.tasks:
        first = None
        for world in args.processes:
            r = measure(task, world, args.epochs, args.device)
            first = first or r["tokens_per_s"]
            print(f"{task:<10}{world:>10}{r['tokens_per_s']:>12.0f}{r['update_seconds']:>12.2f}"
                  f"{100 * r['update_share']:>13.1f}%{r['tokens_per_s'] / first:>13.2f}x")


if __name__ == "__main__":
    main()
