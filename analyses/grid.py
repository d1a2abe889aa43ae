"""Shared by the experiment scripts: train a grid of runs in parallel (resuming any a previous
call left unfinished), then tabulate and plot them."""
from __future__ import annotations

import multiprocessing as mp
import statistics
from pathlib import Path

import torch

from trainers import loop, runs
from trainers.adaptive import UpdateRecord


def label(setting: dict) -> str:
    """``K=15``, ``exact delta=0.5``, ``paper delta=0.5``, with any other option after a comma."""
    if "delta" not in setting:
        return f"K={setting['K']}"
    name = f"{setting.get('controller', 'exact')} delta={setting['delta']}"
    more = {k: v for k, v in setting.items() if k not in ("delta", "controller")}
    return name + "".join(f", {k}={v}" for k, v in more.items())


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


def exact_biases(lines: list[dict]) -> list[float | None]:
    """Each epoch's out-of-sample exact relative bias at the K in use (None where none was measured)."""
    return [UpdateRecord.from_line(line).rel_bias_exact for line in lines]


def held(lines: list[dict], delta: float | None) -> str:
    """The share of updates after the first whose out-of-sample exact bias at the K in use was ≤ δ."""
    if delta is None:
        return "–"
    measured = [v for v in exact_biases(lines[1:]) if v is not None]
    return f"{sum(v <= delta for v in measured)}/{len(measured)}" if measured else "–"


def update_summary(lines: list[dict], delta: float) -> list[str]:
    """An adaptive run in one row: best valid metric, held δ, K path, windows drawn (mean, min–max),
    update s / epoch s."""
    metric = "valid_ppl" if "valid_ppl" in lines[0] else "valid_loss"
    drawn = [line["windows"] for line in lines if line.get("windows") is not None]
    updates = sum(line.get("update_seconds") or 0.0 for line in lines)
    path = [lines[0]["K"]] + [line.get("next_K", line["K"]) for line in lines]
    steps = "→".join(str(k) for i, k in enumerate(path) if i == 0 or k != path[i - 1])
    return [f"{min(line[metric] for line in lines):.4g}", held(lines, delta), steps,
            f"{statistics.mean(drawn):.0f} ({min(drawn)}–{max(drawn)})" if drawn else "–",
            f"{updates / sum(line['seconds'] for line in lines):.2f}"]


def table(rows: list[tuple[str, str, dict, Path]], metric: str, paper: dict | None = None,
          extra: tuple[str, ...] = (), final: tuple[str, ...] = ()) -> str:
    """A markdown table of (group, label, setting, run directory): best valid and its test metric
    (and the ``extra`` columns of that epoch's line), the K used over epochs, the median exact
    relative bias at the K in use, how often it held δ out of sample, the ``final`` columns of
    the last epoch, seconds per epoch, and the paper's value (``paper[(group, label)]``)."""
    name = metric.upper()
    header = ["", "setting", "epochs", f"best valid {name}", f"test {name}", *extra,
              "K over epochs (first → last; min–max)", "exact rel. bias at K (median)", "≤ δ out of sample",
              *(f"{f} (last epoch)" for f in final), "s/epoch"] + (["paper (test)"] if paper else [])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, name, setting, run_dir in rows:
        lines = runs.read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        if not lines:
            out.append("| " + " | ".join([group, name, "not run"] + ["–"] * (len(header) - 3)) + " |")
            continue
        best = min(lines, key=lambda line: line["valid_loss"])
        Ks = [line["K"] for line in lines]
        bias = [v for v in exact_biases(lines) if v is not None]
        cells = [group, name, str(len(lines)), f"{best[f'valid_{metric}']:.3f}", f"{best[f'test_{metric}']:.3f}",
                 *(f"{best[e]:.3f}" for e in extra), f"{Ks[0]} → {Ks[-1]}; {min(Ks)}–{max(Ks)}",
                 f"{statistics.median(bias):.3g}" if bias else "–", held(lines, setting.get("delta")),
                 *("–" if lines[-1].get(f) is None else f"{lines[-1][f]:.3g}" for f in final),
                 f"{statistics.median(line['seconds'] for line in lines):.1f}"]
        if paper:
            cells.append(paper.get((group, name), "–"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def report(results: Path, name: str, intro: str, sections: list[tuple[str, str, list]], metric: str,
           **columns) -> str:
    """Write ``results/name.md`` (``intro``, then per section its heading and table) and per section
    a training-curve figure ``results/<figure>.png``; print and return the tables.

    sections: (heading, figure name, rows of ``table``); ``columns``: ``table``'s paper/extra/final.
    """
    results.mkdir(parents=True, exist_ok=True)
    tables = []
    for heading, figure_name, rows in sections:
        tables.append((f"## {heading}\n\n" if heading else "") + table(rows, metric, **columns) + "\n")
        ran = [row for row in rows if (row[3] / "metrics.jsonl").exists()]
        fig = runs.plot_training([row[3] for row in ran], [row[1] for row in ran], title=heading or name)
        fig.savefig(results / f"{figure_name}.png", dpi=120, bbox_inches="tight")
    text = "\n".join(tables)
    (results / f"{name}.md").write_text(f"{intro}\n\n{text}")
    print(text)
    return text
