"""Marked temporal point processes with RMTPP (Du et al. 2016; paper Sec. 5.3).

Data, from ``config["data"]``:

- ``None``: the embedded default, a simulated two-mark Hawkes process (buy and
  sell orders, say) with known parameters MU, ALPHA, BETA: sequences of
  ``sequence_events`` events, each started empty at time 0.
- a folder: the pickle layout of the neural-Hawkes and EasyTPP data sets,
  ``train.pkl``, ``dev.pkl`` and ``test.pkl``, each a dict with the split's key
  (``'train'``, ``'dev'``, ``'test'``) and ``'dim_process'`` (the number of
  marks); a split is a list of sequences, a sequence a list of events
  ``{'time_since_start', 'time_since_last_event', 'type_event'}``. Times are
  read from ``time_since_start``. The pickles are read as plain data: lists,
  dicts, tuples, numbers and strings, nothing that names a class or a function
  (DataUnpickler), so a crafted pickle cannot run code.
- a ``.csv`` file, UTF-8, with a header and the columns ``sequence, time,
  mark`` (finite *absolute* times, in any unit; integer mark ids from 0); events are sorted by time
  within a sequence and the sequences, in id order, are cut 80/10/10 into
  train/valid/test. Mark ids are labels: the file's distinct ids, sorted,
  become 0..n − 1, so sparse ids cost no unused outputs.

Either way a data set has at most MAX_MARKS marks (the model has one output
per mark).

Streams: a sequence of n events gives n − 1 positions, one per event but the
last. Position i reads event i, ``[mark k_i, gap t_i − t_{i−1}, time t_i − t_0]``,
and its target is the next event, ``[k_{i+1}, t_{i+1} − t_i]``: no event is
in the input of the position that predicts it. At a sequence's first event the
gap and the time are 0 (the time restarting at 0 marks the new sequence), so
the first event is conditioned on, never predicted. The positions of a split's
sequences are concatenated in order into one stream. The metric is the mean
NLL per predicted event; RMSE and the mark error rate come as extra metrics.
"""
from __future__ import annotations

import csv
import io
import math
import pickle
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from biaskit.errors import InputError

from . import Task, hawkes, read_utf8, recurrent_parameters, require, require_file
from .rmtpp import RMTPP, metrics

SPLITS = ("train", "valid", "test")
PICKLES = {"train": "train", "valid": "dev", "test": "test"}  # our split → file stem and key
EVENT_KEYS = ("time_since_start", "type_event")
CSV_COLUMNS = ("sequence", "time", "mark")
#: The most marks a data set may have: the model has one output per mark, so
#: one stray id of 2,000,000 would otherwise build a model of gigabytes.
MAX_MARKS = 10_000
MAX_MARK_ID = 2**63 - 1  # a CSV's mark ids are int64
#: What an event costs from simulation or parsing to the float32 streams (measured: about 100 bytes).
EVENT_BYTES = 128
#: Memory per byte of a data pickle once loaded (measured: 3 to 7 for lists of event dicts; a crafted
#: pickle of empty lists or sets reaches 32 to 112, which this does not cover).
PICKLE_BYTES = 16

#: The embedded process: mark 0 and mark 1 each excite themselves more than each
#: other. Stationary rates (I − α/β)⁻¹ μ = (0.683, 0.55) events per unit time;
#: the spectral radius of α/β is 0.6.
MU = (0.3, 0.2)
ALPHA = ((0.8, 0.4), (0.3, 0.9))  # ALPHA[i][j]: the jump in λ_i after an event of mark j
BETA = 2.0

DEFAULTS = {
    "data": None,            # None: the simulated Hawkes process; a folder of pickles; a .csv file
    "events": 50_000,        # simulated events in all, cut 80/10/10 by sequence
    "sequence_events": 100,  # events per simulated sequence
    "embedding": 8,
    "hidden": 128,
    "layers": 2,
    "seed": 0,
}

#: The paper's training settings for the point-process task (Sec. 5.3), plus gradient clipping at
#: norm 1.0: real event logs with tied times (gaps of 0) diverged without it (NLL 4.8e10; clipped −4.96).
TRAIN = {"batch_size": 64, "lr": 0.1, "window": 200, "K": 6, "K_min": 1, "K_max": 100, "clip": 1.0}
#: Share of zero training gaps (tied times) above which the data's description warns.
TIED_WARNING = 0.1

Sequence = tuple[np.ndarray, np.ndarray]  # (times, integer marks)


def simulated(cfg: dict) -> tuple[dict[str, list[Sequence]], int]:
    """The embedded Hawkes data: ``events // sequence_events`` sequences from one seeded generator."""
    n = cfg["events"] // cfg["sequence_events"]
    if n < 10 or cfg["sequence_events"] < 2:
        raise InputError(f"simulate at least 10 sequences of at least 2 events (80/10/10 split), got {n} of "
                         f"{cfg['sequence_events']}: raise events or lower sequence_events")
    rng = np.random.default_rng(cfg["seed"])
    sequences = [hawkes.simulate(MU, ALPHA, BETA, cfg["sequence_events"], rng) for _ in range(n)]
    return cut(sequences), len(MU)


def cut(sequences: list[Sequence]) -> dict[str, list[Sequence]]:
    """Sequences in their order, 80/10/10 into train/valid/test."""
    a, b = int(0.8 * len(sequences)), int(0.9 * len(sequences))
    return {"train": sequences[:a], "valid": sequences[a:b], "test": sequences[b:]}


class DataUnpickler(pickle.Unpickler):
    """An unpickler for plain data: it refuses every global, so no pickle can name code to run.

    Lists, dicts, tuples, numbers, strings, booleans and None each have their own
    opcodes; everything else a pickle can build (a class instance, a set before
    protocol 4, a numpy value, a call of any function) is named by a global, and
    the unpickler asks ``find_class`` for it before anything runs.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # the neural-Hawkes files are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise InputError(f"{self.path} refuses to load {module}.{name}: data pickles may hold only lists, dicts, "
                         "numbers and strings; save the data again as plain Python values")


def _unpickle(path: Path):
    """The plain data in ``path`` (see DataUnpickler), or an InputError; its size is checked first."""
    try:
        require_file(path, PICKLE_BYTES, "its loaded data")
        return DataUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except InputError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            OverflowError, MemoryError) as err:
        raise InputError(f"cannot read {path} as a pickle: {err}") from None


def load_pickles(folder) -> tuple[dict[str, list[Sequence]], int]:
    """The neural-Hawkes / EasyTPP layout: train.pkl, dev.pkl, test.pkl in one folder.

    ``dim_process`` declares the marks, so mark ids stay as they are and must lie
    in 0..dim_process − 1; a dim_process above MAX_MARKS is refused.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"data {root} is neither a folder of pickles nor a .csv file")
    missing = [f"{stem}.pkl" for stem in PICKLES.values() if not (root / f"{stem}.pkl").is_file()]
    if missing:
        raise InputError(f"{root} lacks {', '.join(missing)}: the pickle layout needs train.pkl, dev.pkl "
                         "and test.pkl")
    contents, dims = {}, {}
    for split, key in PICKLES.items():
        path = root / f"{key}.pkl"
        data = _unpickle(path)
        if not isinstance(data, dict) or key not in data or "dim_process" not in data:
            found = sorted(map(_show, data)) if isinstance(data, dict) else type(data).__name__
            raise InputError(f"{path} must be a dict with keys {key!r} and 'dim_process', found {found}")
        if not isinstance(data[key], (list, tuple)):
            raise InputError(f"{path}: {key!r} must be a list of sequences, found {type(data[key]).__name__}")
        contents[split], dims[split] = (path, data[key]), _declared_marks(data["dim_process"], path)
    if len(set(dims.values())) > 1:
        raise InputError(f"the pickles of {root} disagree on dim_process: {sorted(set(dims.values()))}")
    marks = dims["train"]
    events = sum(len(seq) for _, data in contents.values() for seq in data if isinstance(seq, (list, tuple)))
    require("point-process", events * EVENT_BYTES, 0,  # counted before converting: a pickle may repeat
            advice=f"the pickles of {root} hold {events:,} events in all (a sequence counts as often as "
                   "it is referenced); use a smaller data set")  # one sequence many times
    splits = {split: [_events(seq, path, n, marks) for n, seq in enumerate(data)]
              for split, (path, data) in contents.items()}
    return splits, marks


def _declared_marks(value, path: Path) -> int:
    """``dim_process`` as a number of marks from 1 to MAX_MARKS."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{path}: dim_process must be a whole number of marks, 1 or more, found {_show(value)}")
    if value > MAX_MARKS:
        raise InputError(f"{path} declares dim_process = {_show(value)} marks, more than the limit of "
                         f"{MAX_MARKS:,} (point_process.MAX_MARKS): the model has one output per mark")
    return value


def _events(sequence, path: Path, n: int, marks: int) -> Sequence:
    try:
        times = np.array([float(event["time_since_start"]) for event in sequence])
        kinds = [float(event["type_event"]) for event in sequence]
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise InputError(f"{path}, sequence {n}: every event must be a dict with numeric "
                         f"{' and '.join(map(repr, EVENT_KEYS))} ({type(err).__name__}: {err})") from None
    if not all(k.is_integer() and 0 <= k < marks for k in kinds):
        raise InputError(f"{path}, sequence {n}: marks outside 0..{marks - 1}; type_event must be a whole number "
                         f"below dim_process = {marks}")
    if (np.diff(times) < 0).any():
        raise InputError(f"{path}, sequence {n}: time_since_start decreases; events must be in time order")
    return times, np.array(kinds, dtype=np.int64)


def _show(value) -> str:
    """A short repr for a message, even of an int too long to print."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        return f"an int of {value.bit_length()} bits"
    return text if len(text) <= 60 else text[:57] + "..."


def load_csv(path) -> tuple[dict[str, list[Sequence]], int]:
    """A CSV with a header and columns sequence, time, mark; split 80/10/10 by sequence id.

    Times are finite numbers; marks are integer ids from 0 to 2⁶³ − 1, labels
    only: see _dense_marks. Lines whose cells are all blank are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data {path} is not a file")
    text = read_utf8(path)
    if not text.strip():
        raise InputError(f"{path} is empty: write a header line sequence,time,mark and one line per event")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: dict[str, list[tuple[float, int]]] = {}
    try:
        header = [name.strip() for name in next(reader)]
        if not set(CSV_COLUMNS) <= set(header):
            missing = ", ".join(name for name in CSV_COLUMNS if name not in header)
            raise InputError(f"{path} needs a header with the columns {', '.join(CSV_COLUMNS)} as its first line; "
                             f"that line does not name {missing}")  # not echoed: the file may be anything
        twice = [name for name in CSV_COLUMNS if header.count(name) > 1]
        if twice:
            raise InputError(f"{path}: the header names {', '.join(twice)} more than once")
        columns = [header.index(name) for name in CSV_COLUMNS]
        for row in reader:
            if any(cell.strip() for cell in row):
                key, event = _csv_event(row, columns, f"{path}, line {reader.line_num}")
                rows.setdefault(key, []).append(event)
    except csv.Error as err:
        raise InputError(f"{path}, line {reader.line_num}: not readable as CSV: {err}") from None
    if not rows:
        raise InputError(f"{path} has a header but no events")
    ids = list(rows)
    try:
        ids.sort(key=int)  # numeric ids in numeric order
    except ValueError:
        ids.sort()
    dense = _dense_marks({k for events in rows.values() for _, k in events}, path)
    sequences = []
    for key in ids:
        events = sorted(rows[key], key=lambda event: event[0])  # stable: ties keep the file's order
        sequences.append((np.array([t for t, _ in events]), np.array([dense[k] for _, k in events], dtype=np.int64)))
    return cut(sequences), len(dense)


def _csv_event(row: list[str], columns: list[int], where: str) -> tuple[str, tuple[float, int]]:
    """The sequence id and the (time, mark) of one CSV row."""
    key, time, mark = (row[i].strip() if i < len(row) else "" for i in columns)
    try:
        event = float(time), int(mark)
    except ValueError:
        event = None
    if not key or event is None:
        raise InputError(f"{where}: need a sequence id, a number for time and an integer mark, got "
                         f"sequence={_show(key)}, time={_show(time)}, mark={_show(mark)}")
    if not math.isfinite(event[0]):
        raise InputError(f"{where}: time {_show(time)} is not a finite number")
    if not 0 <= event[1] <= MAX_MARK_ID:
        raise InputError(f"{where}: mark {_show(mark)} is not an id from 0 to 2^63 - 1")
    return key, event


def _dense_marks(ids: set[int], path: Path) -> dict[int, int]:
    """Mark ids to 0..n−1 in sorted order, so a model has one output per mark that occurs.

    The ids are those of the whole file, all three splits: the file is one data
    set whose marks are a property of it, as dim_process is of the pickles; with
    train's ids alone an event of a mark first seen in valid or test would have
    no output to score it. The mapping depends only on the set of ids, so the
    same file always gives the same model; dense id i is the i-th smallest id.
    """
    if len(ids) > MAX_MARKS:
        raise InputError(f"{path} has {len(ids):,} distinct marks, more than the limit of {MAX_MARKS:,} "
                         "(point_process.MAX_MARKS): the model has one output per mark; merge rare marks into one")
    return {k: i for i, k in enumerate(sorted(ids))}


def load(data) -> tuple[dict[str, list[Sequence]], int]:
    """The sequences of each split and the number of marks, from a .csv file or a folder of pickles."""
    if Path(data).suffix.lower() == ".csv":
        return load_csv(data)
    return load_pickles(data)


def describe(data, sequences: dict[str, list[Sequence]], marks: int) -> str:
    """What was loaded, with the figures that predict trouble: sequences and events per split, the
    marks, the time scale of the training gaps, and tied times (gaps of 0), with a warning line
    when more than TIED_WARNING of them are tied."""
    if data is None:
        source = "simulated Hawkes process"
    elif Path(data).suffix.lower() == ".csv":
        source = f"{data} (CSV sequence,time,mark; absolute times; 80/10/10 by sequence id)"
    else:
        source = f"{data} (pickles train/dev/test.pkl)"
    sizes = ", ".join(f"{split} {len(seqs):,} sequences / {sum(len(t) for t, _ in seqs):,} events"
                      for split, seqs in sequences.items())
    gaps = np.concatenate([np.diff(times) for times, _ in sequences["train"]] + [np.zeros(0)])
    lines = [f"{source}: {sizes}; {marks} mark{'s' if marks != 1 else ''}"]
    if gaps.size:
        tied = float((gaps == 0).mean())
        lines.append(f"training gaps: median {np.median(gaps):.4g}, mean {gaps.mean():.4g} (the model's time unit), "
                     f"{tied:.1%} tied (0)")
        if tied > TIED_WARNING:
            lines.append(f"warning: {tied:.1%} of the training gaps are 0: tied times make the likelihood's "
                         "gradients large; keep gradient clipping on (--clip), or record times more finely")
    return "\n".join(lines)


def stream(sequences: list[Sequence], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs (N, 3) = [k_i, t_i − t_{i−1}, t_i − t_0], targets (N, 2) = [k_{i+1}, t_{i+1} − t_i]."""
    inputs, targets = [], []
    for times, kinds in sequences:
        if not np.isfinite(times).all():
            raise InputError(f"the {split} split has a time that is not a finite number")
        if len(times) < 2:
            continue  # nothing to predict
        gaps = np.diff(times, prepend=times[0])
        inputs.append(np.stack([kinds, gaps, times - times[0]], axis=1)[:-1])
        targets.append(np.stack([kinds, gaps], axis=1)[1:])
    if not inputs:
        raise InputError(f"the {split} split has no sequence of two or more events")
    x, y = (torch.as_tensor(np.concatenate(parts), dtype=torch.float32) for parts in (inputs, targets))
    if not (x.isfinite().all() and y.isfinite().all()):
        raise InputError(f"the {split} split has gaps or times beyond float32 (3.4e38): rescale the times")
    return x, y


def _parameters(cfg: dict, marks: int) -> int:
    """RMTPP's parameters: the mark embedding, the LSTM over [embedding, gap, time], the heads."""
    return marks * cfg["embedding"] + recurrent_parameters(cfg["embedding"] + 2, cfg["hidden"], cfg["layers"]) \
        + (cfg["hidden"] + 1) * (marks + 1) + 1


def build(config: dict) -> Task:
    """The point-process task from ``config`` (missing keys take DEFAULTS)."""
    cfg = {**DEFAULTS, **config}
    if cfg["data"] is None:
        require("point-process", cfg["events"] * EVENT_BYTES, _parameters(cfg, len(MU)),
                advice="simulate fewer --events, or choose a smaller --hidden or fewer layers")
        sequences, marks = simulated(cfg)
    else:
        sequences, marks = load(cfg["data"])
        require("point-process", 0, _parameters(cfg, marks), advice="choose a smaller --hidden or fewer layers")
    splits = {split: stream(sequences[split], split) for split in SPLITS}
    train_inputs, train_targets = splits["train"]
    gap_unit, time_unit = float(train_targets[:, 1].mean()), float(train_inputs[:, 2].mean())
    if gap_unit <= 0:
        raise InputError("every training event is simultaneous with the one before: there is no time scale")
    torch.manual_seed(cfg["seed"])
    model = RMTPP(marks, cfg["embedding"], cfg["hidden"], cfg["layers"], (gap_unit, time_unit or gap_unit))
    return Task("point_process", model, splits, "NLL", float, extra=metrics,  # float: the score is the NLL
                about=describe(cfg["data"], sequences, marks))
