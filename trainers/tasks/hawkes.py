"""Multivariate Hawkes processes with exponential kernels: simulation by Ogata thinning.

Mark i's intensity is ``λ_i(t) = μ_i + Σ_j α_ij Σ_{t_e < t, mark j} exp(−β (t − t_e))``:
each event of mark j raises mark i's intensity by α_ij, decaying at rate β.
Between events every intensity only decays, so the total intensity just after
the last event (or candidate) bounds it until the next one, which is what
Ogata's thinning needs. Written here rather than taken from ``tick``: tick
0.8 installs on Python 3.11, but it needs Python ≥ 3.11 and numpy ≥ 2 and
pulls in pandas, scikit-learn and dill, for a loop of twenty lines.
"""
from __future__ import annotations

import math

import numpy as np

from biaskit.errors import InputError

BLOCK = 4096  # random numbers drawn at once


def _check(mu, alpha, beta) -> tuple[np.ndarray, np.ndarray]:
    mu, alpha = np.asarray(mu, dtype=float), np.asarray(alpha, dtype=float)
    if mu.ndim != 1 or alpha.shape != (mu.size, mu.size):
        raise InputError(f"a Hawkes process with {mu.size} marks needs alpha of shape ({mu.size}, {mu.size}), "
                         f"got {alpha.shape}")
    if (mu <= 0).any() or (alpha < 0).any() or beta <= 0:
        raise InputError("a Hawkes process needs mu > 0, alpha >= 0 and beta > 0")
    return mu, alpha


def stationary_rate(mu, alpha, beta) -> np.ndarray:
    """Mean events per unit time of each mark, ``Λ = (I − α/β)⁻¹ μ`` (needs spectral radius of α/β < 1)."""
    mu, alpha = _check(mu, alpha, beta)
    branching = alpha / beta  # ∫ φ_ij: expected direct offspring of mark i per event of mark j
    if np.abs(np.linalg.eigvals(branching)).max() >= 1:
        raise InputError("the Hawkes process is not stationary: the spectral radius of alpha / beta is >= 1")
    return np.linalg.solve(np.eye(mu.size) - branching, mu)


def simulate(mu, alpha, beta: float, events: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The first ``events`` events (times, integer marks) of the process started empty at time 0.

    Plain Python floats, since a candidate costs a few scalar operations; the
    random numbers are drawn in blocks.
    """
    mu, alpha = _check(mu, alpha, beta)
    base, jumps = mu.tolist(), alpha.T.tolist()  # jumps[j]: what an event of mark j adds to every λ_i
    excess = [0.0] * mu.size  # λ_i(t) − μ_i, which decays at rate β between events
    times, marks, t = [], [], 0.0
    while len(times) < events:
        for gap, u in zip(rng.standard_exponential(BLOCK).tolist(), rng.uniform(size=BLOCK).tolist()):
            bound = sum(base) + sum(excess)  # λ can only fall until the next event
            step = gap / bound
            t += step
            decay = math.exp(-beta * step)
            excess = [e * decay for e in excess]
            u *= bound  # accept with probability λ(t) / bound; u then also picks the mark
            for mark, (m, e) in enumerate(zip(base, excess)):
                u -= m + e
                if u < 0:
                    times.append(t)
                    marks.append(mark)
                    excess = [e + jump for e, jump in zip(excess, jumps[mark])]
                    break
            if len(times) == events:
                break
    return np.asarray(times), np.asarray(marks, dtype=np.int64)
