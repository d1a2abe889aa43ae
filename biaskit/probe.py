"""One way to probe a trained model: evaluation mode, windows from a stream, burn-in, starting state.

``biaskit analyze``, the trainers' K controller, the DNI audit and evaluation
all measure a model the same way: switch every module to evaluation mode
(dropout off, restored afterwards), draw distinct windows from a stream (time
first), run the model over the ``length`` steps before each window to get the
state entering it, and hand the recurrence (``model.system()``, built in
evaluation mode) to ``decompose`` or ``synthetic_bias``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from . import limits
from .errors import InputError, first_line
from .recurrent import RecurrentSystem


class TrainedModel(Protocol):
    """What ``biaskit analyze`` and the trainers need of a model.

    ``model(inputs, state)`` runs a whole chunk (batch, time, ...) from a state
    (None: zeros) and returns ``(outputs, state)``; ``loss(outputs, targets)``
    is the per-position loss; ``system()`` is the recurrence as biaskit sees
    it (``biaskit.wrap(...)``), with the same parameters. Optional:
    ``advance(inputs, state)`` returns only the state ``model(inputs, state)[1]``
    would, without the readout: the burn-in before each window then costs no
    outputs (a language model's logits over every burn-in step and word).
    """

    def __call__(self, inputs: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def system(self) -> RecurrentSystem: ...


def check_model(model: Any, needs: tuple[str, ...] = ("system",)) -> nn.Module:
    """``model`` if it is a module with the ``TrainedModel`` methods in ``needs``, else an
    InputError saying what it lacks."""
    missing = [name for name in needs if not callable(getattr(model, name, None))]
    if not isinstance(model, nn.Module) or missing:
        lacks = f"has no {' or '.join(f'{m}()' for m in missing)}" if missing else "is not a torch.nn.Module"
        raise InputError(f"{type(model).__name__} {lacks}: a model to audit needs forward(inputs, state) -> "
                         "(outputs, state), loss(outputs, targets) and system(); see 'Auditing cells from "
                         "other packages' in the README")
    return model


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in evaluation mode inside the block; each one's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _fits(need: int, what: str, device) -> None:
    """Refuse, with the figures, an allocation of ``need`` bytes that the device's free memory cannot hold."""
    free = limits.available_memory(device)
    if need > free:
        raise InputError(f"{what} need about {need / 2**30:.1f} GiB, but {torch.device(device)} has "
                         f"{free / 2**30:.1f} GiB free: use fewer or shorter windows")


@dataclass
class Windows:
    """Windows drawn from a stream: ``burn`` (count, length, ...) is the ``length`` steps before
    each window; ``inputs`` and ``targets`` (count, length + lookahead, ...) the window itself
    and the ``lookahead`` steps after it; ``starts`` where each window begins in the stream."""

    burn: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    starts: torch.Tensor

    def to(self, device) -> "Windows":
        return Windows(*(t.to(device) for t in (self.burn, self.inputs, self.targets)), self.starts)


def check_windows(steps: int, length: int, count: int, lookahead: int = 0) -> int:
    """The number of distinct windows of ``length`` steps a stream of ``steps`` offers, each with
    ``length`` steps of burn-in before it and ``lookahead`` after; an InputError if fewer than
    ``count`` (duplicated windows would pass for independent samples)."""
    if length < 2:
        raise InputError(f"the window length must be at least 2, got {length}")
    if count < 2:
        raise InputError(f"at least 2 windows are needed, got {count}")
    available = steps - 2 * length - lookahead + 1
    if available < count:
        fixes = [f"ask for at most {available} windows"] if available >= 2 else []
        longest = (steps - lookahead + 1 - count) // 2
        fixes += [f"use windows of at most {longest} steps"] if longest >= 2 else []
        raise InputError(f"the data ({steps} steps) offers {max(available, 0)} distinct windows of {length} steps "
                         f"with {length} steps of burn-in{f' and {lookahead} after' if lookahead else ''}, fewer "
                         f"than the {count} asked for: " + (" or ".join(fixes) or "give more data"))
    return available


def sample_windows(inputs: torch.Tensor, targets: torch.Tensor, length: int, count: int,
                   generator: torch.Generator, lookahead: int = 0) -> Windows:
    """``count`` windows with distinct starts, drawn uniformly without replacement (see
    ``check_windows``)."""
    if inputs.shape[0] != targets.shape[0]:
        raise InputError(f"inputs and targets differ in length ({inputs.shape[0]} and {targets.shape[0]} steps)")
    available = check_windows(inputs.shape[0], length, count, lookahead)
    row = sum(t[:1].numel() * t.element_size() for t in (inputs, targets))  # one step of the streams
    _fits(count * (2 * length + lookahead) * row, f"{count} windows of {length} steps and their burn-in",
          inputs.device)
    starts = length + torch.randperm(available, generator=generator)[:count]
    index = starts[:, None] + torch.arange(-length, length + lookahead)[None]
    spans, span_targets = inputs[index], targets[index]
    return Windows(spans[:, :length], spans[:, length:], span_targets[:, length:], starts)


@dataclass
class Probe:
    """What a measurement of a trained model needs: its recurrence, the windows (batch first, on
    the model's device), their targets (the last step's, or every step's with a lookahead), the
    state entering each window in the model's own format, and the burn-in inputs."""

    system: RecurrentSystem
    inputs: torch.Tensor
    targets: torch.Tensor
    start: Any
    burn: torch.Tensor


@contextmanager
def probing(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, length: int, count: int,
            generator: torch.Generator, lookahead: int = 0, every_step: bool = False,
            part: slice | None = None) -> Iterator[Probe]:
    """Draw ``count`` windows of ``length`` steps from the stream (time first) and yield a ``Probe``,
    the model in evaluation mode for the whole block (so decompose measures the deterministic
    recurrence). ``every_step``: targets at every step of the window and its lookahead (the DNI
    audit); else the last step's target of each window (decompose's BPTT(R, 1)). ``part``: keep
    these of the drawn windows (a process's share when each of several decomposes its own,
    drawing with the same generator)."""
    check_model(model)
    device = next(model.parameters()).device
    windows = sample_windows(inputs, targets, length, count, generator, lookahead)
    if part is not None:
        windows = Windows(windows.burn[part], windows.inputs[part], windows.targets[part], windows.starts[part])
    windows = windows.to(device)
    with evaluating(model):
        system = model.system()
        try:
            with torch.no_grad():  # the state alone: a model's ``advance`` skips the readout
                if hasattr(model, "advance"):
                    start = model.advance(windows.burn)
                else:  # the whole forward, its outputs at every burn-in step sized on one window first
                    one = model(windows.burn[:1])[0]
                    each = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(one) if torch.is_tensor(t))
                    _fits(each * count, f"the burn-in's outputs ({count} windows of {length} steps; a model with "
                          "advance(inputs, state) returning the state alone needs none)", device)
                    start = model(windows.burn)[1]
        except InputError:
            raise
        except Exception as err:  # the model's own code: its error, in one line
            raise InputError(f"the model's forward(inputs, state) failed on the burn-in: {type(err).__name__}: "
                             f"{first_line(err)}") from None
        window_targets = windows.targets if every_step else windows.targets[:, length - 1]
        yield Probe(system, windows.inputs, window_targets, start, windows.burn)
