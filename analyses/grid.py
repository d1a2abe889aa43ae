"""Shared by the experiment scripts: train a grid of runs in parallel (resuming any a
previous call left unfinished), then tabulate and plot them."""
from __future__ import annotations

import multiprocessing as mp
import statistics
from pathlib import Path

import torch

from trainers import loop, runs


def label(setting: dict) -> str:
    return f"K={setting['K']}" if "K" in setting else f"delta={setting['delta']}"


def _train(job):
    out, config = job
    torch.set_num_threads(1)
    done = runs.read_metrics(out) if (out / "checkpoint-last.pt").exists() else []
    if len(done) < config["train"]["epochs"]:
        loop.Run(config, out, quiet=True, resume=bool(done)).fit()
    print(f"done {out}", flush=True)


def run(jobs: list[tuple[Path, dict]], processes: int):
    """Train every (run directory, config), ``processes`` at a time, one thread each."""
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(_train, jobs, chunksize=1)


def table(rows: list[tuple[str, str, Path]], metric: str, extra: tuple[str, ...] = (),
          final: tuple[str, ...] = ()) -> str:
    """A markdown table of (group, setting, run directory): best valid and its test metric
    (and the ``extra`` columns of that epoch's line), the K used over epochs, the median
    exact relative bias at K, the ``final`` columns of the last epoch, seconds per epoch."""
    name = metric.upper()
    header = ["", "setting", f"best valid {name}", f"test {name}", *extra,
              "K over epochs (first → last; min–max)", "exact rel. bias at K (median)",
              *(f"{f} (last epoch)" for f in final), "s/epoch"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, setting, run_dir in rows:
        lines = runs.read_metrics(run_dir)
        best = min(lines, key=lambda line: line["valid_loss"])
        Ks = [line["K"] for line in lines]
        bias = [line["rel_bias_exact"] for line in lines if line.get("rel_bias_exact") is not None]
        cells = [group, setting, f"{best[f'valid_{metric}']:.3f}", f"{best[f'test_{metric}']:.3f}",
                 *(f"{best[e]:.3f}" for e in extra), f"{Ks[0]} → {Ks[-1]}; {min(Ks)}–{max(Ks)}",
                 f"{statistics.median(bias):.3g}" if bias else "beyond W",
                 *("–" if lines[-1].get(f) is None else f"{lines[-1][f]:.3g}" for f in final),
                 f"{statistics.median(line['seconds'] for line in lines):.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def figure(run_dirs: list[Path], labels: list[str], title: str, path: Path):
    fig = runs.plot_training(run_dirs, labels, title=title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
