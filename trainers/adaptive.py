"""Algorithm 1: the truncation-length controller, fed by biaskit.

At each update it draws ``windows`` windows of length W from the training
stream (each starting from the state a W-step burn-in leaves), decomposes the
last-step gradient over each with biaskit, and sets the truncation:

- ``controller="exact"`` (default): K = ``biaskit.exact_kappa``, the smallest K
  whose *exact* relative bias is below δ at confidence ``level``; K_max when
  the bias stays above δ for every K in range, as the paper does when no K
  reaches δ. When the windows' mean gradient is not resolved from their noise
  (early, before the model has found any direction, and again near a minimum,
  where the gradient fades), the relative bias is undefined on them and K is
  kept: jumping to K_max there would multiply a converged model's step by
  √(K_max/K) for nothing (seen on the copy task: perplexity 1.03 → 7.9).
- ``controller="paper"``: Algorithm 1 as printed: τ̂ = 0.9W, β̂ by Eq. 22 (OLS
  regression), Eq. 21 (``beta_method="max"``, all pairs) or the quantile, Ê by
  Eq. 23, Δ̂ by Eq. 24 (denominator over k ≤ K), κ̂ by Eq. 25, K_max when none.

Whatever the controller, each update logs the K chosen, whether it reached δ,
the exact upper limit and the paper's estimate at that K, and the exact
relative bias of the K in use since the last update measured on these new
windows: out of sample, what tells whether δ held.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

import biaskit
from biaskit.decay import UnreliableFitWarning
from biaskit.probe import probing

from .ddp import Ranks, share

CONTROLLERS = ("exact", "paper")
BETA_METHODS = ("regression", "max", "quantile")


@dataclass
class Controller:
    delta: float | None  # None: measure only, keep K fixed
    window: int = 100
    windows: int = 256
    K_min: int = 2
    K_max: int = 100
    norm: str = "phi"  # the paper controller's norm
    tau: int | str | None = None  # as fit_decay takes it: a lag, "auto" or None (0.9 W)
    controller: str = "exact"
    level: float = 0.9  # the exact controller's confidence
    groups: int = 16  # window groups for the exact controller's confidence limit
    beta_method: str = "regression"  # the paper controller's β: Eq. 22 (OLS), Eq. 21 (max) or the quantile
    ranks: Ranks = Ranks()  # under torch.distributed each rank decomposes its share of the windows

    def measure(self, model, inputs, targets, K: int, generator: torch.Generator) -> dict:
        """Decompose fresh windows; return the update's record with the next K (``K`` when only measuring).

        Under torch.distributed every rank draws the same windows, decomposes its contiguous share
        with its share of the groups, and the sums are all-reduced: every rank gets the same
        Dataset, the same exact bias and so the same K, as one process holding them all would.
        """
        began = time.perf_counter()
        part = share(self.windows, self.ranks, "--windows")
        with probing(model, inputs, targets, length=self.window, count=self.windows, generator=generator,
                     part=part) as probe:
            ds = biaskit.decompose(probe.system, probe.inputs, probe.targets, start=probe.start, psi=False,
                                   groups=max(1, self.groups // self.ranks.world), process_group=self.ranks.group)
        deltas = [self.delta if self.delta is not None else 0.5]
        span = (min(self.K_min, K), max(self.K_max, K))
        exact = biaskit.exact_kappa(ds, deltas, self.level, span)
        with warnings.catch_warnings():  # the log records the fit's reliability instead
            warnings.simplefilter("ignore", UnreliableFitWarning)
            fit = biaskit.fit_decay(ds, norm=self.norm, method=self.beta_method, tau=self.tau, weights="ols")
        bound = biaskit.bias_bound(ds, fit, deltas, span)
        in_range = slice(self.K_min, self.K_max)
        chosen = exact if self.controller == "exact" else bound
        curve = chosen["rel_bias_upper" if self.controller == "exact" else "rel_bias_bound"].sel(K=in_range)
        below = curve.values < deltas[0]
        reached = bool(below.any())
        resolved = self.controller == "paper" or bool(exact["gradient_resolved"])
        if self.delta is None or (not reached and not resolved):
            new_K = K  # measuring only; or the windows' mean gradient is noise: no evidence either way
        else:
            new_K = int(curve.K.values[below.argmax()]) if reached else self.K_max
        low, high = fit.conf_int()
        return {
            "K": new_K,
            "kappa_reached": int(reached),
            "rel_bias_exact": float(exact["rel_bias"].sel(K=K)),          # the K in use, on new windows
            "rel_bias_exact_upper": float(exact["rel_bias_upper"].sel(K=K)),
            "rel_bias_upper": float(exact["rel_bias_upper"].sel(K=new_K)),  # the K chosen
            "rel_bias_bound": float(bound["rel_bias_bound"].sel(K=new_K)),
            "extrapolated": int(exact["extrapolated"].sel(K=max(K, new_K))),
            "gradient_resolved": int(exact["gradient_resolved"]),
            "beta": float(fit.beta),
            "beta_low": float(low),
            "beta_high": float(high),
            "beta_reliable": int(fit.reliable),
            "tau": int(fit.tau),
            "update_seconds": time.perf_counter() - began,
        }
