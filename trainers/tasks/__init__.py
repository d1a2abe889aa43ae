"""Tasks: the data, the model and the metric of one experiment, rebuilt from a config.

Each task module has ``build(config) -> Task``, registered under the task's name
in the ``biaskit.tasks`` entry-point group (pyproject.toml); a checkpoint names
the task by that name, so ``biaskit analyze`` can rebuild model and data without
running code a file names.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from biaskit import limits
from biaskit.errors import InputError


@dataclass
class Task:
    """One experiment: model, the three splits as streams, and how to score a mean loss.

    ``splits[name] = (inputs, targets)``, each a stream with time first
    (tokens: shape (N,)); the model maps (streams, time, ...) inputs and a
    carried state to outputs and the next state, and ``model.loss`` gives the
    per-position loss.
    """

    name: str
    model: nn.Module
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metric: str
    score: Callable[[float], float]
    #: Optional: more metrics of a split, ``extra(model, outputs, targets) -> {name: value}``,
    #: from the model's outputs over the whole split (batchified, state carried).
    extra: Callable[[nn.Module, torch.Tensor, torch.Tensor], dict] | None = None
    #: Optional: a line on where the data came from (how a single file was split), printed at the start.
    about: str = ""


#: Memory per byte of a text data file once parsed (Python strings of words, or rows of numbers).
TEXT_BYTES = 16


def perplexity(mean_loss: float) -> float:
    return float(torch.tensor(mean_loss).exp())


def require_file(path: Path, per_byte: float, what: str) -> None:
    """Refuse, before reading it, a data file that takes ``per_byte`` bytes of memory a byte once
    loaded (``what``: "its parsed text") and so exceeds the memory free; OSError if it cannot be read."""
    limits.require({what: Path(path).stat().st_size * per_byte}, f"reading {path}", "use a smaller file")


def read_utf8(path: Path) -> str:
    """The UTF-8 text of a data file (a byte-order mark dropped), or an InputError at the first bad byte.
    Its size is checked first: parsed into tokens or rows, text takes about TEXT_BYTES a byte."""
    try:
        require_file(path, TEXT_BYTES, "its parsed text")
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start + len(data) - len(err.object)  # err counts from after a byte-order mark
        line = data.count(b"\n", 0, start) + 1
        raise InputError(f"{path} is not UTF-8 text: byte {start} (line {line}) is {data[start:start + 1]!r}; "
                         "save the file as UTF-8") from None


def recurrent_parameters(inputs: int, hidden: int, layers: int, gates: int = 4) -> int:
    """The parameters of a stacked ``nn.LSTM`` (4 gates) or ``nn.GRU`` (3), counted without building it."""
    return gates * hidden * (inputs + hidden + 2) + (layers - 1) * gates * hidden * (2 * hidden + 2)


def require(task: str, data: float, parameters: float, outputs: float = 0, advice: str = "") -> None:
    """Refuse, before anything is built, a task whose data (bytes), model (parameters, trained with
    gradients and optimizer state) and evaluation outputs (floats) exceed the memory free."""
    limits.require({"data": data, "model": parameters * limits.PER_PARAMETER, "outputs": outputs * limits.FLOAT},
                   f"the {task} task", advice or "choose smaller sizes")
