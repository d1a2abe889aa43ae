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
from typing import TYPE_CHECKING

import numpy as np

from biaskit import atomic, checkpoint
from biaskit.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG, METRICS, LOCK = "config.json", "metrics.jsonl", ".lock"
LAST, BEST = "checkpoint-last.pt", "checkpoint-best.pt"
OWNED = {CONFIG, METRICS, LOCK, LAST, BEST, "tensorboard"}


def clean(record: dict) -> dict:
    """NaN (not measured, or lost to overflow) becomes None; an infinity stays, since an infinite
    upper limit is a measurement (no K certified): ``encode`` writes it as "inf"."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


def encode(record: dict) -> str:
    """One JSON line of ``clean(record)``: None as null and ±infinity as the strings "inf" and
    "-inf" (JSON has no infinity, and null would read as "not measured")."""
    return json.dumps({k: (("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v)
                       for k, v in clean(record).items()})


def decode(record: dict) -> dict:
    """A logged line as numbers again: "inf" and "-inf" back to floats (``encode``'s inverse)."""
    return {k: (float(v) if v in ("inf", "-inf") else v) for k, v in record.items()}


def check_resumable(path: Path):
    """Refuse a folder with no checkpoint to resume, saying whether a run started there."""
    if not (path / LAST).is_file():
        if (path / CONFIG).is_file():
            raise InputError(f"{path} has no checkpoint yet (the run stopped before its first epoch "
                             f"ended): start it again with --out {path}")
        raise InputError(f"no checkpoint at {path / LAST}: nothing to resume there")


def stored_run(path) -> tuple[dict, int | None]:
    """The config the run in ``path`` was last trained with, its last checkpoint's, which a resumed
    run must match (``config.json`` keeps the first --epochs), and the epochs it has trained."""
    path = Path(path)
    check_resumable(path)
    trainer = checkpoint.load(path / LAST).get("trainer")
    config = trainer.get("config") if isinstance(trainer, dict) else None
    if not isinstance(config, dict) or not {"task", "task_config", "train"} <= set(config):
        raise InputError(f"{path / LAST} holds no run config: it was not written by biaskit train")
    done = trainer.get("epoch")
    return config, done if isinstance(done, int) else None


class RunDirectory:
    """One run's folder, locked for the life of this object (or until ``close``)."""

    def __init__(self, path, *, resume: bool, config: dict | None = None):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{self.path} is a file: choose a folder for the run")
        if resume:
            check_resumable(self.path)
        elif self.path.is_dir():
            self._check_new()  # before the lock is made, so a refused folder is left as it was
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
        atomic.remove_stale(self.path)  # what a killed run was writing
        if not resume:
            try:
                self._start(config)
            except BaseException:
                self.close()
                raise

    def _check_new(self):
        """Refuse a folder that holds a run or other files: a new run needs an empty one."""
        if (self.path / LAST).exists():
            raise InputError(f"{self.path} already holds a run: pass --resume to continue it, or another --out")
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in OWNED and not p.name.startswith("."))
        if foreign:
            raise InputError(f"{self.path} is not a run directory and not empty ({', '.join(foreign[:3])}): "
                             "choose a new or empty folder for --out")

    def _start(self, config: dict):
        self._check_new()  # again under the lock: another run may have started here meanwhile
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
                fh.write(encode(line) + "\n")
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
        atomic.write_text(path, "".join(encode(line) + "\n" for line in lines), "the metrics log")
        if problem is not None:
            return f"repaired {path} from the checkpoint ({problem})"
        return None


def check_epochs_left(run_dir, done: int | None, epochs: int) -> None:
    """Refuse to resume a run that has already trained ``epochs`` epochs (``done``): it would do nothing."""
    if done is not None and done >= epochs:
        raise InputError(f"{run_dir} has trained {done} epoch(s) already and --epochs is {epochs}: nothing to "
                         f"resume; pass --epochs above {done} to train further")


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
        lines.append(decode(record))
    return lines


def _number(value) -> float:
    """A logged value as a float; missing (None, not a number) is NaN."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _moving_average(epoch: np.ndarray, values: np.ndarray, half: int) -> np.ndarray:
    """Mean of the finite values at epochs within ``half`` of each, the half-width shrunk
    near the ends so the window stays centred; NaN stays NaN."""
    reach = np.minimum(half, np.minimum(epoch - epoch.min(), epoch.max() - epoch))
    inside = np.abs(epoch[None, :] - epoch[:, None]) <= reach[:, None]
    present = np.isfinite(values)
    total = np.where(inside, np.where(present, values, 0.0)[None, :], 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, total / (inside & present[None, :]).sum(1), np.nan)


def _kind(run_dir, lines: list[dict]) -> tuple[str, float]:
    """(fixed, exact or paper, what orders the run among its kind: K if fixed, δ if adaptive)."""
    try:
        config = json.loads((Path(run_dir) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = {}
    train = config.get("train") if isinstance(config, dict) else None
    train = train if isinstance(train, dict) else {}
    delta = _number(train.get("delta"))
    Ks = {line["K"] for line in lines if not math.isnan(_number(line.get("K")))}
    if len(Ks) > 1 or math.isfinite(delta):
        return ("paper" if train.get("controller") == "paper" else "exact"), delta
    return "fixed", Ks.pop() if Ks else _number(train.get("K"))


def _styles(kinds: list[tuple[str, float]]) -> list[dict]:
    """Each run's line style: fixed-K runs dashed blues by K, adaptive runs thicker oranges (exact)
    or dash-dot greens (paper) by δ; darker is longer K or smaller δ, an unknown K or δ lightest."""
    from matplotlib import colormaps

    styles = [{}] * len(kinds)
    for family, cmap, base in (("fixed", "Blues", {"ls": "--", "lw": 1.3}),
                               ("exact", "Oranges", {"ls": "-", "lw": 2.2}),
                               ("paper", "Greens", {"ls": "-.", "lw": 2.2})):
        def order(i, family=family):
            return math.isfinite(kinds[i][1]), kinds[i][1] if family == "fixed" else -kinds[i][1]
        ranked = sorted((i for i, (f, _) in enumerate(kinds) if f == family), key=order)
        for i, shade in zip(ranked, np.linspace(0.45, 0.95, len(ranked)) if len(ranked) > 1 else [0.75]):
            styles[i] = {**base, "color": colormaps[cmap](shade)}
    return styles


def plot_training(run_dirs, labels: list[str] | None = None, title: str | None = None,
                  smooth: int | None = None) -> Figure:
    """Training curves of run directories, like the paper's Figures 1-2.

    One row of panels against epoch: the test metric, the truncation K, the
    relative bias at K (exact on the run's line, the bound Δ̂ thin and dotted)
    and, when a run trained with synthetic gradients, the chunked bias with its
    DNI (the run's line) and without (dotted). So that many runs stay readable,
    fixed-K runs are dashed, in blues ordered by K (darker: longer K), and
    adaptive runs thicker and ordered by δ (darker: smaller δ): solid oranges
    for the exact controller, dash-dot greens for the paper's (its config's
    ``controller``). A run is adaptive when its logged K changes or its
    ``config.json`` sets a delta (a missing or unreadable config is no error).

    ``smooth`` (epochs) replaces the metric and the biases by a centred moving
    average over the epochs within ``smooth // 2`` of each (an odd ``smooth``
    spans exactly that many). Near the ends the window shrinks to stay
    centred, and a missing value stays missing, so nothing is extrapolated or
    filled in. K is drawn as logged: it is the decision, not a noisy estimate.

    The metric and the biases get log axes, linear where a value is ≤ 0 (a point process's NLL
    can be negative), so no run in the legend is missing from a panel; epoch ticks are whole.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1):
        raise InputError(f"smooth must be a whole number of epochs >= 1 (or None), got {smooth!r}")
    half = 0 if smooth is None else smooth // 2
    runs = [read_metrics(run_dir) for run_dir in run_dirs]
    labels = labels or [Path(d).name for d in run_dirs]
    styles = _styles([_kind(run_dir, lines) for run_dir, lines in zip(run_dirs, runs)])
    synthetic = any("rel_bias_synthetic" in line for lines in runs for line in lines)
    fig = Figure(figsize=(19 if synthetic else 15, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4 if synthetic else 3)
    metric = next((key for key in ("test_ppl", "test_nll", "test_loss")
                   if any(key in line for lines in runs for line in lines)), None)
    faint = {"ls": ":", "lw": 0.9, "alpha": 0.7}
    handles = []
    for lines, label, style in zip(runs, labels, styles):
        if not lines:
            continue
        epoch = np.array([_number(line["epoch"]) for line in lines])

        def series(key, smoothed=True, lines=lines, epoch=epoch):
            values = np.array([_number(line.get(key)) for line in lines])
            return _moving_average(epoch, values, half) if smoothed and half else values

        if metric:
            axes[0].plot(epoch, series(metric), **style)
        handles += axes[1].plot(epoch, series("K", smoothed=False), label=label, **style)
        axes[2].plot(epoch, series("rel_bias_exact"), **style)
        axes[2].plot(epoch, series("rel_bias_bound"), **{**style, **faint})
        if synthetic:
            axes[3].plot(epoch, series("rel_bias_synthetic"), **style)
            axes[3].plot(epoch, series("rel_bias_truncated"), **{**style, **faint})
    axes[0].set_ylabel(metric.replace("_", " ") if metric else "test metric")
    axes[1].set_ylabel("truncation K")
    axes[2].set_ylabel("relative bias at K (dotted: bound Δ̂)")
    if synthetic:
        axes[3].set_ylabel("BPTT(K, K) relative bias (dotted: no DNI)")
    for ax in axes:
        drawn = np.concatenate([np.asarray(line.get_ydata(), dtype=float) for line in ax.lines] or [np.empty(0)])
        if ax is not axes[1] and not (drawn[np.isfinite(drawn)] <= 0).any():  # a log axis would drop them
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.set_xlabel("epoch" + (f" (centred mean over {2 * half + 1})" if half and ax is not axes[1] else ""))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize="small",
                   title="dashed: fixed K\nsolid: adaptive, exact\ndash-dot: adaptive, paper", title_fontsize="small")
    if title:
        fig.suptitle(title)
    return fig
