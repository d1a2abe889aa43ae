"""Learning-rate schedules, warm restarts and the synthetic-gradient phases.

Each is a pure function of the training progress in epochs, so a resumed run
needs no scheduler state.
"""
from __future__ import annotations

import math

from biaskit.errors import InputError

SCHEDULES = "constant, cosine, step:EPOCHS:GAMMA or restarts:EPOCHS"


def parse(name: str) -> tuple[str, tuple[float, ...]]:
    """``(kind, arguments)`` of a schedule name, checked: positive finite epochs and gamma."""
    kind, *args = str(name).split(":")
    try:
        values = tuple(float(a) for a in args)
    except ValueError:
        values = ()
    arity = {"constant": 0, "cosine": 0, "step": 2, "restarts": 1}.get(kind)
    if arity is None or len(args) != arity or len(values) != arity or not all(
            math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"unknown schedule {name!r}: use {SCHEDULES}, with positive numbers")
    if kind == "step" and values[1] > 1:
        raise InputError(f"schedule {name!r}: a step schedule decays, its GAMMA must be in (0, 1]")
    return kind, values


def warm_restart(progress: float, base: float) -> tuple[int, float]:
    """(i, fraction done) of the warm-restart run at ``progress`` epochs, run i lasting
    base·2^i epochs (CosineAnnealingWarmRestarts with T_mult = 2)."""
    i = math.floor(math.log2(progress / base + 1))
    return i, (progress - base * (2**i - 1)) / (base * 2**i)


def lr_factor(name: str, epochs: int, progress: float) -> float:
    """The schedule ``name``'s factor on the learning rate at ``progress`` of ``epochs`` epochs."""
    kind, args = parse(name)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress / epochs, 1.0)))
    if kind == "step":
        every, gamma = args
        return gamma ** math.floor(progress / every)
    if kind == "restarts":
        return 0.5 * (1 + math.cos(math.pi * warm_restart(progress, args[0])[1]))
    return 1.0


def synthetic_phase(name: str, alternate: bool, progress: float) -> bool:
    """Whether synthetic-gradient training uses its synthetic gradients at ``progress``: always,
    or, when alternating, in the odd warm restarts of schedule ``name`` (real gradients first)."""
    if not alternate:
        return True
    return warm_restart(progress, parse(name)[1][0])[0] % 2 == 1
