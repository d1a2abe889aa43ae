"""The paper's bias bounds Ê(K), Δ̂(K), κ̂(δ) from a decay fit, and their calibration.

Lag k counts back from the loss step (lag 0 is the state the loss step
produces) and ĝ_K keeps lags 0..K, so the bias of ĝ_K is the tail over k > K.

Ê(K), the absolute bound (Eq. 23 with M̂ = 1).  ``tail="printed"`` (default) is
Eq. 23 as printed:

    K < τ:  Ê(K) = Σ_{k=K+1}^{τ−1} φ̄_k + φ̄_τ / (1 − β̂)
    K ≥ τ:  Ê(K) = φ̄_τ β̂^{K−τ} / (1 − β̂)

``tail="proof"`` is what the proof of Theorem 1 gives (Appendix B, B.3 with
B.4): the sum Σ_{k>K} E φ_k with E φ_k ≤ β^{k−τ} E φ_τ for k ≥ τ, which for
K ≥ τ is ``φ̄_τ β̂^{K+1−τ} / (1 − β̂)``, a factor β̂ below the printed line (for
K < τ the two agree).  Both are infinite when β̂ ≥ 1.  ``M̂`` bounds
``||∂H/∂θ||``; it is not estimated here (M̂ = 1), so for ``phi`` Ê is in
multiples of M, while ``psi`` and ``phi_mahalanobis`` already carry ``∂H/∂θ``
and are in gradient units.

Δ̂(K), the relative bound (Eq. 24), divides Ê(K) by a lower bound on ``||g||``
from the triangle inequality ``||g|| ≥ ||ĝ_k|| − E(k)``, with the paper's
simplifying assumption ``||ĝ_k|| ≈ M̂ Σ_{j≤k} φ̄_j`` (M̂ cancels):

    denominator="printed" (default, Eq. 24 and Theorem 1):
        Δ̂(K) = Ê(K) / max_{k≤K} ( Σ_{j=0}^{k} φ̄_j − Ê(k) )
    denominator="all" (the authors' code):
        Δ̂(K) = Ê(K) / max_{k<R} ( Σ_{j=0}^{k} φ̄_j − Ê(k) )

Both maxima run over lags inside the window (k < R: no φ̄ is measured past
it), so for K ≥ R−1 they agree.  Δ̂ is infinite where the denominator is not
positive.  κ̂(δ) (Eq. 25) is ``min{K_min ≤ K ≤ K_max : Δ̂(K) < δ}``.
"""
from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike

from .decay import DecayFit, norm_table
from .errors import InputError
from .norms import NORMS

TAILS = ("printed", "proof")
DENOMINATORS = ("printed", "all")
ASSUMPTION = (
    "||g_K|| ~ M * sum_{k<=K} mean norm_k (Aicher et al. 2019, Sec. 4): the Jacobian scale M "
    "is common to the bias and the gradient and cancels in the relative bound"
)
TAIL_TEXT = {
    "printed": "Eq. 23 as printed: phi_tau * beta^(K-tau) / (1-beta) for K >= tau",
    "proof": "Appendix B (B.3-B.4): phi_tau * beta^(K+1-tau) / (1-beta) for K >= tau",
}
DENOMINATOR_TEXT = {
    "printed": "Eq. 24: max over k <= K of (sum_{j<=k} mean norm_j - E_hat(k))",
    "all": "authors' code: max over every k < R of (sum_{j<=k} mean norm_j - E_hat(k))",
}


def abs_bound(mean: np.ndarray, beta: float, tau: int, K: ArrayLike, tail: str = "printed") -> np.ndarray:
    """Ê(K) of Eq. 23 with M̂ = 1, for lag means ``mean`` (R,) and truncations ``K``.

    ``tail``: "printed" (Eq. 23) or "proof" (B.3–B.4); see the module docstring.
    The head Σ_{k=K+1}^{τ−1} φ̄_k is a suffix sum accumulated from lag τ−1
    down, so a tail many orders of magnitude below the total keeps its own
    precision (a difference of prefix sums would cancel it away).
    """
    _check_choice("tail", tail, TAILS)
    K = np.asarray(K, dtype=np.int64)
    if beta >= 1:
        return np.full(K.shape, np.inf)
    from_k = np.concatenate([np.cumsum(mean[:tau][::-1])[::-1], [0.0]])  # from_k[j] = Σ_{j≤k<τ} φ̄_k
    head = from_k[np.minimum(K + 1, tau)]
    shift = 0 if tail == "printed" else 1
    tail_sum = mean[tau] * beta ** np.maximum(K + shift - tau, 0) / (1 - beta)
    return head + tail_sum


def rel_bound(
    mean: np.ndarray, beta: float, tau: int, K: ArrayLike, tail: str = "printed", denominator: str = "printed"
) -> np.ndarray:
    """Δ̂(K) of Eq. 24 under the simplifying assumption (see the module docstring).

    ``denominator``: "printed" (max over k ≤ K, Eq. 24) or "all" (max over
    every k < R, the authors' code); ``tail`` as for ``abs_bound``.
    """
    _check_choice("denominator", denominator, DENOMINATORS)
    K = np.asarray(K, dtype=np.int64)
    R = mean.size
    lower = np.cumsum(mean) - abs_bound(mean, beta, tau, np.arange(R), tail)  # per k < R
    if denominator == "printed":
        grad_lower = np.maximum.accumulate(lower)[np.minimum(K, R - 1)]
    else:
        grad_lower = np.full(K.shape, lower.max())
    bound = abs_bound(mean, beta, tau, K, tail)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(grad_lower > 0, bound / grad_lower, np.inf)


def _first_below(values: np.ndarray, K: np.ndarray, deltas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each δ: the smallest K with ``values < δ`` and 1, or max(K) and 0 if none."""
    below = values[None, :] < deltas[:, None]
    reached = below.any(axis=1)
    kappa = np.where(reached, K[np.argmax(below, axis=1)], K.max())
    return kappa.astype(np.int64), reached.astype(np.int8)


def bias_bound(
    ds: xr.Dataset,
    fit: DecayFit,
    deltas: ArrayLike,
    K_range: tuple[int, int] | None = None,
    *,
    tail: str = "printed",
    denominator: str = "printed",
) -> xr.Dataset:
    """Ê(K), Δ̂(K) for K in ``K_range = (K_min, K_max)`` and κ̂(δ) for each δ in ``deltas``.

    ``K_range`` is inclusive (Algorithm 1's [K_min, K_max]; default (0, R−1)).
    ``kappa`` is clipped to it: ``kappa_reached`` is 0 where no K in the range
    brings Δ̂ below δ, and κ̂ is then K_max.  K past the window (K ≥ R) is
    allowed: Ê extrapolates the geometric tail.  ``tail`` ("printed" or
    "proof") and ``denominator`` ("printed" or "all") choose between the
    printed equations and their variants (module docstring); the choices are
    recorded in the attrs.
    """
    _check_choice("tail", tail, TAILS)
    _check_choice("denominator", denominator, DENOMINATORS)
    mean = norm_table(ds, fit.norm).mean(axis=0)
    if fit.tau >= mean.size:
        raise InputError(f"the fit's tau={fit.tau} is outside this Dataset's window of {mean.size} lags")
    K = _truncations((0, mean.size - 1) if K_range is None else K_range)
    deltas = _check_deltas(deltas)
    relative = rel_bound(mean, fit.beta, fit.tau, K, tail, denominator)
    kappa, reached = _first_below(relative, K, deltas)
    out = xr.Dataset(
        {
            "abs_bias_bound": ("K", abs_bound(mean, fit.beta, fit.tau, K, tail)),
            "rel_bias_bound": ("K", relative),
            "kappa": ("delta", kappa),
            "kappa_reached": ("delta", reached),
        },
        coords={"K": K, "delta": deltas},
        attrs={
            **fit.to_attrs(),
            "window_length": int(mean.size),
            "abs_bias_bound_units": NORMS[fit.norm].units,
            "simplifying_assumption": ASSUMPTION,
            "tail": tail,
            "tail_formula": TAIL_TEXT[tail],
            "denominator": denominator,
            "denominator_formula": DENOMINATOR_TEXT[denominator],
        },
    )
    out["abs_bias_bound"].attrs["long_name"] = f"E_hat(K), Eq. 23 with M_hat = 1, tail={tail!r}"
    out["rel_bias_bound"].attrs["long_name"] = f"Delta_hat(K), Eq. 24, denominator={denominator!r}"
    out["kappa"].attrs["long_name"] = "kappa_hat(delta) = min{K_min <= K <= K_max : Delta_hat(K) < delta}, Eq. 25"
    out["kappa_reached"].attrs["long_name"] = "1 if some K in [K_min, K_max] has Delta_hat(K) < delta, else 0"
    return out


def calibration(ds: xr.Dataset, bound: xr.Dataset) -> xr.Dataset:
    """Δ̂(K) of ``bound`` against the exact relative bias of ``ds`` on their common K.

    ``holds`` (K) is 1 where Δ̂(K) ≥ the exact bias (a tie holds: a bound of 0
    where the norm vanished is exact); ``ratio`` is Δ̂/exact (NaN where the
    exact bias is 0); ``fraction_holds`` and ``median_ratio`` (over finite
    ratios) summarise them; ``kappa_exact`` (δ) is the smallest common K whose
    exact relative bias is below δ, beside the estimated ``kappa``.
    """
    if "rel_bias" not in ds:
        raise InputError("the Dataset has no exact 'rel_bias': pass the output of biaskit.decompose")
    for name in ("rel_bias_bound", "kappa"):
        if name not in bound:
            raise InputError(f"bound has no {name!r}: pass the output of biaskit.bias_bound")
    K = np.intersect1d(bound.K.values, ds.K.values)
    if K.size == 0:
        raise InputError("bound and ds share no K: compute the bound over K in 0..R-1")
    exact = ds.rel_bias.sel(K=K).values.astype(np.float64)
    estimate = bound.rel_bias_bound.sel(K=K).values
    holds = estimate >= exact
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(exact > 0, estimate / exact, np.nan)
    finite = ratio[np.isfinite(ratio)]
    deltas = bound.delta.values
    kappa_exact, exact_reached = _first_below(exact, K, deltas)
    return xr.Dataset(
        {
            "rel_bias": ("K", exact),
            "rel_bias_bound": ("K", estimate),
            "holds": ("K", holds.astype(np.int8)),
            "ratio": ("K", ratio),
            "fraction_holds": ((), float(holds.mean())),
            "median_ratio": ((), float(np.median(finite)) if finite.size else np.nan),
            "kappa": ("delta", bound.kappa.values),
            "kappa_exact": ("delta", kappa_exact),
            "kappa_exact_reached": ("delta", exact_reached),
        },
        coords={"K": K, "delta": deltas},
        attrs=dict(bound.attrs),
    )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}: use one of {', '.join(map(repr, choices))}")


def _check_deltas(deltas) -> np.ndarray:
    deltas = np.atleast_1d(np.asarray(deltas, dtype=np.float64))
    if deltas.ndim != 1 or deltas.size == 0 or not ((deltas > 0) & (deltas < 1)).all():
        raise InputError(f"deltas must be relative biases in (0, 1), e.g. [0.1, 0.01]; got {deltas.tolist()}")
    return deltas


def _truncations(K_range) -> np.ndarray:
    """K_min..K_max (inclusive) from the pair ``K_range``, checked."""
    pair = np.asarray(K_range)
    if pair.shape != (2,) or not np.issubdtype(pair.dtype, np.integer) or (pair < 0).any():
        raise InputError(f"K_range must be a pair (K_min, K_max) of non-negative ints, got {K_range!r}")
    K_min, K_max = (int(k) for k in pair)
    if K_min > K_max:
        raise InputError(f"K_range ({K_min}, {K_max}) is empty: K_min must not exceed K_max")
    return np.arange(K_min, K_max + 1)
