"""The norm registry: the per-lag gradient norms, what each is, and which of decompose's options measure it.

A plain description, without torch, so that the statistics (``decay``, ``bias``)
and the command lines read it without importing the core. The norms themselves
are computed by ``cotangents`` (Euclidean, Mahalanobis, the metric's estimate),
which ``decompose`` runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .errors import InputError


@dataclass(frozen=True)
class Norm:
    """One per-lag gradient norm that ``decompose`` measures and the decay fits read."""

    name: str         #: its variable in decompose's Dataset, (sample, lag)
    label: str        #: how tables name it
    units: str        #: the units of the bias bound Ê(K) built on it
    description: str  #: what it is, in one line
    option: str | None = None  #: decompose's keyword that decides whether it is measured (None: always)
    on: Any = None             #: that keyword's value that measures it (decompose's default)
    off: Any = None            #: that keyword's value that leaves it out
    parameter_pass: bool = True  #: needs decompose's parameter pass (False: ``state_gradient_norms`` measures it)

    def missing(self) -> str:
        """Why a Dataset may lack it, for an error message: the option that leaves it out."""
        if not self.option:
            return ""
        return (f" (decompose(..., {self.option}={self.off!r}) leaves it out; {self.option}={self.on!r}, "
                "the default, measures it)")


#: The one list of norms: decompose writes them, fit_decay, the audit, the command line and the docs read it.
NORMS = {norm.name: norm for norm in (
    Norm("phi", "Euclidean ||dL/dh||", "multiples of M = sup ||dH/dtheta|| (M is not estimated)",
         "||dL_s/dh_{s-k}||, the Euclidean norm of the state gradient", parameter_pass=False),
    Norm("phi_mahalanobis", "Mahalanobis", "parameter-gradient norm (the metric carries dH/dtheta)",
         "sqrt(b^T M b) for b = dL_s/dh_{s-k}, M = E[J J^T] with J = dH/dtheta",
         option="metric", on=None, off=False),  # metric=None: estimated; a (D, D) tensor measures it too
    Norm("psi", "exact psi", "parameter-gradient norm (psi carries dH/dtheta)",
         "||dL_s/dh_{s-k} . dH/dtheta||, the exact parameter-space contribution of lag k",
         option="psi", on=True, off=False),
)}


def options(wanted: Iterable[str]) -> dict[str, Any]:
    """decompose's keyword arguments that measure the norms ``wanted`` and leave the others out
    (``phi`` is always measured): ``options(["phi"]) == {"metric": False, "psi": False}``."""
    wanted = set(wanted)
    unknown = wanted - set(NORMS)
    if unknown:
        raise InputError(f"unknown norm {sorted(unknown)[0]!r}: use one of {', '.join(NORMS)}")
    return {norm.option: norm.on if name in wanted else norm.off for name, norm in NORMS.items() if norm.option}
