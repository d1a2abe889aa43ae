"""Learning-rate schedules, warm restarts and the synthetic-gradient phases.

Each is a pure function of the training progress in epochs, so a resumed run
needs no scheduler state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from biaskit.errors import InputError

SCHEDULES = "constant, cosine, step:EPOCHS:GAMMA or restarts:EPOCHS"


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule, parsed once from its name: its kind and arguments."""

    kind: str
    args: tuple[float, ...] = ()

    @classmethod
    def parse(cls, name: str) -> Schedule:
        """The schedule a name gives, checked: positive finite epochs and gamma."""
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
        return cls(kind, values)

    def lr_factor(self, epochs: int, progress: float) -> float:
        """The factor on the learning rate at ``progress`` of ``epochs`` epochs."""
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress / epochs, 1.0)))
        if self.kind == "step":
            every, gamma = self.args
            return gamma ** math.floor(progress / every)
        if self.kind == "restarts":
            return 0.5 * (1 + math.cos(math.pi * warm_restart(progress, self.args[0])[1]))
        return 1.0

    def synthetic_phase(self, alternate: bool, progress: float) -> bool:
        """Whether synthetic-gradient training uses its synthetic gradients at ``progress``: always,
        or, when alternating, in the odd warm restarts (real gradients first)."""
        if not alternate:
            return True
        return warm_restart(progress, self.args[0])[0] % 2 == 1


def warm_restart(progress: float, base: float) -> tuple[int, float]:
    """(i, fraction done) of the warm-restart run at ``progress`` epochs, run i lasting
    base·2^i epochs (CosineAnnealingWarmRestarts with T_mult = 2)."""
    i = math.floor(math.log2(progress / base + 1))
    return i, (progress - base * (2**i - 1)) / (base * 2**i)
