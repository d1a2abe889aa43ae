"""Algorithm 1: the truncation-length controller fed by biaskit.

At each update it draws a minibatch of windows of length W from the training
stream (each starting from the state a burn-in of W steps leaves), decomposes
the last-step gradient over each window with biaskit, fits the decay rate β
of the gradient norms, and sets K = κ̂(δ), the smallest K whose estimated
relative bias Δ̂(K) is below δ, clipped to [K_min, K_max]. Because biaskit
also measures the exact relative bias at every K, each update logs it next to
the estimate the paper had to trust.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

import biaskit
from biaskit.probe import probing


@dataclass
class Controller:
    delta: float | None  # None: measure only, keep K fixed
    window: int = 100
    windows: int = 64
    K_min: int = 2
    K_max: int = 100
    norm: str = "phi"
    tau: int | str | None = None  # as fit_decay takes it: a lag, "auto" or None (0.9 W)

    def measure(self, model, inputs, targets, K: int, generator: torch.Generator) -> dict:
        """Decompose, fit, bound; return the record of this update with the new K."""
        began = time.perf_counter()
        with probing(model, inputs, targets, length=self.window, count=self.windows, generator=generator) as probe:
            ds = biaskit.decompose(probe.system, probe.inputs, probe.targets, start=probe.start, psi=False)
        fit = biaskit.fit_decay(ds, norm=self.norm, tau=self.tau)
        deltas = [self.delta] if self.delta is not None else [0.5]
        bound = biaskit.bias_bound(ds, fit, deltas=deltas, K_range=(self.K_min, self.K_max))
        if self.delta is not None:
            K = int(bound["kappa"].sel(delta=self.delta))
        low, high = fit.conf_int()
        return {
            "K": K,
            "beta": float(fit.beta),
            "beta_low": float(low),
            "beta_high": float(high),
            "tau": float(fit.tau),
            "rel_bias_bound": _at(bound["rel_bias_bound"], K),
            "rel_bias_exact": _at(ds["rel_bias"], K),
            "update_seconds": time.perf_counter() - began,
        }


def _at(curve, K: int) -> float:
    """curve(K) where it was evaluated, NaN beyond (e.g. K past the window)."""
    return float(curve.sel(K=K)) if K in curve["K"].values else math.nan
