"""Algorithm 1: the truncation-length controller, fed by biaskit.

At each update it draws ``windows`` windows of length W from the training
stream (each starting from the state a W-step burn-in leaves), decomposes the
last-step gradient over each with biaskit, and sets the truncation:

- ``controller="exact"`` (default): K = ``biaskit.exact_kappa``, the smallest K
  whose *exact* relative bias is below δ at confidence ``level``; K_max when
  the bias stays above δ for every K in range, as the paper does when no K
  reaches δ. When the windows' mean gradient is not resolved from their noise
  (early, before the model has found any direction, and again near a minimum,
  where the gradient fades), no K can be certified: K is kept, unless the K in
  use evidently misses δ, and then doubled (``choose_K``). Jumping to K_max
  there would multiply a converged model's step by √(K_max/K) for nothing
  (seen on the copy task: perplexity 1.03 → 7.9).
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

import numpy as np
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
                                   metric=None if self.norm == "phi_mahalanobis" else False,  # only it needs one
                                   groups=max(1, self.groups // self.ranks.world), process_group=self.ranks.group)
        deltas = [self.delta if self.delta is not None else 0.5]
        span = (min(self.K_min, K), max(self.K_max, K))
        exact = biaskit.exact_kappa(ds, deltas, self.level, span)
        with warnings.catch_warnings():  # the log records the fit's reliability instead
            warnings.simplefilter("ignore", UnreliableFitWarning)
            fit = biaskit.fit_decay(ds, norm=self.norm, method=self.beta_method, tau=self.tau, weights="ols")
        bound = biaskit.bias_bound(ds, fit, deltas, span)
        in_range = slice(self.K_min, self.K_max)
        if self.controller == "exact":
            curve, resolved = exact["rel_bias_upper"].sel(K=in_range), bool(exact["gradient_resolved"])
        else:
            curve, resolved = bound["rel_bias_bound"].sel(K=in_range), True
        lower = float(exact["rel_bias_lower"].sel(K=K))
        new_K, reached, rule = (K, False, "measured only") if self.delta is None else \
            choose_K(curve.K.values, curve.values, deltas[0], K, self.K_max, resolved, lower)
        low, high = fit.conf_int()
        return {
            "K": new_K,
            "K_rule": rule,
            "kappa_reached": int(reached),
            "rel_bias_exact": float(exact["rel_bias"].sel(K=K)),          # the K in use, on new windows
            "rel_bias_exact_upper": float(exact["rel_bias_upper"].sel(K=K)),
            "rel_bias_exact_lower": lower,
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


def choose_K(Ks, limits, delta: float, K: int, K_max: int, resolved: bool, lower_in_use: float
             ) -> tuple[int, bool, str]:
    """The next K from a curve of limits over ``Ks``: ``(K, reached, rule)``.

    - the smallest K whose limit is below δ ("certified");
    - none, with the windows' mean gradient resolved: K_max, as the paper does ("none below δ");
    - none, unresolved, while the K in use evidently misses δ (its lower limit is above δ): twice
      the K in use, at most K_max ("raised"): a model stuck at a short K never shows the bias it
      would need to learn a longer dependency, so holding would stall it (the copy task: K = 2
      < m = 10, its exact bias 0.98 epoch after epoch);
    - none, unresolved, and no evidence against the K in use: keep it ("held").
    """
    below = np.asarray(limits) < delta
    if below.any():
        return int(Ks[below.argmax()]), True, "certified"
    if resolved:
        return K_max, False, "none below delta"
    if lower_in_use > delta:
        return min(max(2 * K, K + 1), K_max), False, "raised"
    return K, False, "held"
