"""Run directories: one live run per folder, its config, its metrics log, its training-curve figure.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON line per
epoch) and the checkpoints. A lock (``fcntl.flock`` on ``.lock``, released by
the operating system when the process ends, even on kill -9) lets one run at
a time train there. Every file is written atomically; the log is appended a
line per epoch, and on resume rewritten from the lines the checkpoint carries,
so the log always matches the checkpoint it resumes from.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

from biaskit import atomic
from biaskit.errors import InputError

CONFIG, METRICS, LOCK = "config.json", "metrics.jsonl", ".lock"
LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"
OWNED = {CONFIG, METRICS, LOCK, LAST, BEST, "tensorboard"}


def clean(record: dict) -> dict:
    """JSON-safe: NaN and infinities become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class RunDirectory:
    """One run's folder, locked for the life of this object (or until ``close``)."""

    def __init__(self, path, *, resume: bool, config: dict | None = None):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path} is a file: choose a folder for the run")
        if resume and not (self.path / LAST).is_file():
            if (self.path / CONFIG).is_file():
                raise InputError(f"{self.path} has no checkpoint yet (the run stopped before its first epoch "
                                 f"ended): start it again with --out {self.path}")
            raise InputError(f"no checkpoint at {self.path / LAST}: nothing to resume there")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / LOCK, "a+")
        except OSError as err:
            raise InputError(f"cannot write to {self.path}: {err.strerror}; choose another --out") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            pid = self._lock.read().strip() or "unknown"
            self._lock.close()
            raise InputError(f"another run is training in {self.path} (process {pid}): wait for it to end, "
                             "or choose another --out") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        if not resume:
            try:
                self._start(config)
            except BaseException:
                self.close()
                raise

    def _start(self, config: dict):
        if (self.path / LAST).exists():
            raise InputError(f"{self.path} already holds a run: pass --resume to continue it, or another --out")
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in OWNED and not p.name.startswith("."))
        if foreign:
            raise InputError(f"{self.path} is not a run directory and not empty ({', '.join(foreign[:3])}): "
                             "choose a new or empty folder for --out")
        atomic.write_text(self.path / CONFIG, json.dumps(config, indent=1) + "\n", "the run config")
        atomic.write_text(self.path / METRICS, "", "the metrics log")

    def close(self):
        """Release the lock."""
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    def append(self, line: dict):
        """Add one epoch's line to the log, flushed to disk."""
        try:
            with open(self.path / METRICS, "a") as fh:
                fh.write(json.dumps(clean(line)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as err:
            raise InputError(f"cannot write {self.path / METRICS}: {err.strerror}") from None

    def restore(self, lines: list[dict]) -> str | None:
        """Rewrite the log atomically as ``lines`` (the checkpoint's); a note if it said otherwise."""
        path = self.path / METRICS
        try:
            had = read_metrics(self.path)
        except InputError as err:
            had, problem = None, str(err)
        else:
            problem = None if had == lines else f"it held {len(had)} epoch(s), the checkpoint {len(lines)}"
        atomic.write_text(path, "".join(json.dumps(clean(line)) + "\n" for line in lines), "the metrics log")
        if problem is not None:
            return f"repaired {path} from the checkpoint ({problem})"
        return None


def read_metrics(run_dir) -> list[dict]:
    """The epoch lines of a run's ``metrics.jsonl``; a damaged log is an InputError naming the line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise InputError(f"{run_dir} is not a run directory (no {METRICS})")
    lines = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}, line {number}, is not JSON: the log is damaged") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise InputError(f"{path}, line {number}, is not an epoch record: the log is damaged")
        lines.append(record)
    return lines


def plot_training(run_dirs, labels=None, title=None):
    """Training curves of run directories, like the paper's Figures 1-2.

    Test metric, truncation K and relative bias (exact, solid; bound Δ̂,
    dashed) versus epoch, one colour per run. When a run trained with
    synthetic gradients, a fourth panel shows the chunked bias with its DNI
    (solid) and without (dotted). Reads each ``metrics.jsonl``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [read_metrics(run_dir) for run_dir in run_dirs]
    synthetic = any("rel_bias_synthetic" in line for lines in runs for line in lines)
    fig = Figure(figsize=(17 if synthetic else 13, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4 if synthetic else 3)
    labels = labels or [Path(d).name for d in run_dirs]
    metric = None
    for i, (lines, label) in enumerate(zip(runs, labels)):
        if not lines:
            continue
        metric = metric or next((k for k in ("test_ppl", "test_nll", "test_loss") if k in lines[0]), None)
        epoch = [line["epoch"] for line in lines]
        color = f"C{i % 10}"
        if metric:
            axes[0].plot(epoch, [line.get(metric) for line in lines], color=color, label=label)
        axes[1].plot(epoch, [line.get("K") for line in lines], color=color, label=label)
        for key, style in (("rel_bias_exact", "-"), ("rel_bias_bound", "--")):
            values = [line.get(key) for line in lines]
            axes[2].plot(epoch, [float("nan") if v is None else v for v in values], style, color=color)
        for key, style in (("rel_bias_synthetic", "-"), ("rel_bias_truncated", ":")):
            if synthetic and key in lines[0]:
                axes[3].plot(epoch, [line[key] for line in lines], style, color=color)
    axes[0].set_ylabel(metric.replace("_", " ") if metric else "test metric")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("truncation K")
    axes[2].set_ylabel("relative bias at K (solid exact, dashed bound)")
    axes[2].set_yscale("log", nonpositive="mask")
    if synthetic:
        axes[3].set_ylabel("BPTT(K, K) relative bias (solid DNI, dotted none)")
        axes[3].set_yscale("log", nonpositive="mask")
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
