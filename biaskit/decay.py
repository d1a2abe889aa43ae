"""Geometric decay of the per-lag gradient norms: β, τ and their confidence intervals.

Assumption A-1 of Aicher, Foti & Fox (2019), ``E φ_{k+1} ≤ β E φ_k`` for every
lag ``k ≥ τ`` with β < 1, is what the paper's bound Ê(K) extrapolates.
``fit_decay`` estimates β from a (sample, lag) table of norms, on the lag means
``φ̄_k`` over the window ``[τ, R)``, four ways: ``"regression"`` (Eq. 22; WLS by
default, the paper's OLS with ``weights="ols"``), ``"max"`` (Eq. 21 as
printed), ``"anchored"`` (the smallest β that bounds every lag from τ, which
Ê(K) uses; the authors' code's "max") and ``"quantile"`` (the authors' less
noisy max). The max-type intervals invert a test, calibrated at exact geometric
decay; lags whose mean the batch cannot estimate (``HEAVY_TAIL_LIMIT``) make a
fit unreliable (``UnreliableFitWarning``); zero means are a collapse, fitted up
to it; ``tau="auto"`` takes the first log-linear window.

The estimators in full, the intervals, their measured coverage, heavy tails,
zero means and the choice of τ: ``docs/decay.md``.
"""
from __future__ import annotations

import html
import warnings

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scipy import stats
from statsmodels.iolib.summary import Summary
from statsmodels.iolib.table import SimpleTable
from statsmodels.regression.linear_model import WLS

from .errors import InputError
from .norms import NORMS

METHODS = ("regression", "max", "anchored", "quantile")
WEIGHTS = ("wls", "ols")
DEFAULT_TAU_FRACTION = 0.9
AUTO_TAU_CANDIDATES = 50
HEAVY_TAIL_LIMIT = 0.02
MAX_BOOT_ENTRIES = 50_000_000  # n_boot × slopes held at once (400 MB of float64)


class UnreliableFitWarning(UserWarning):
    """The batch cannot estimate the mean norm at some fitted lag: the interval may undercover."""


def confidence_alpha(alpha: float | None, level: float | None, default: float = 0.05) -> float:
    """``alpha``, 1 − the confidence, as statsmodels takes it (``default`` when not given), checked.
    ``level``, the confidence itself, is the older keyword: still taken, with a DeprecationWarning
    for the code that called the public function calling this."""
    if level is not None:
        if alpha is not None:
            raise InputError("pass alpha or the deprecated level, not both")
        warnings.warn("level= is deprecated: pass alpha = 1 - level, as statsmodels does",
                      DeprecationWarning, stacklevel=3)
        if not 0 < level < 1:
            raise InputError(f"level must be in (0, 1), e.g. 0.95; got {level}")
        return 1 - level
    alpha = default if alpha is None else alpha
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), e.g. 0.05 for a 95% interval; got {alpha}")
    return alpha


def norm_table(ds: xr.Dataset, norm: str) -> np.ndarray:
    """The (sample, lag) table of ``ds[norm]`` as float64, checked."""
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if norm not in ds:
        raise InputError(f"the Dataset has no {norm!r} variable{NORMS[norm].missing()}")
    table = ds[norm].transpose("sample", "lag").values.astype(np.float64)
    if table.shape[0] < 2 or table.shape[1] < 2:
        raise InputError(f"{norm} needs at least 2 samples and 2 lags, got shape {table.shape}")
    if not np.isfinite(table).all() or (table < 0).any():
        raise InputError(f"{norm} has negative, NaN or infinite entries: it must be a table of norms")
    return table


def default_tau(window_length: int) -> int:
    """The paper's τ = ⌊0.9 R⌋, kept at least two lags from the window's end."""
    return min(int(DEFAULT_TAU_FRACTION * window_length), window_length - 2)


def fit_decay(
    ds: xr.Dataset,
    norm: str = "phi",
    method: str = "regression",
    tau: int | str | None = None,
    level: float | None = None,
    *,
    alpha: float | None = None,
    weights: str = "wls",
    q: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> DecayFit:
    """Fit the geometric decay rate β of ``ds[norm]`` over lags ``[τ, R)``.

    ``method``: "regression" (Eq. 22), "max" (Eq. 21), "anchored" or
    "quantile" (module docstring).  ``tau``: None (paper's 0.9·R), an int lag,
    or "auto".  ``alpha``: 1 − the fit's default confidence (0.05; ``level``,
    the confidence, is deprecated).  ``weights``
    ("wls" or "ols") applies to the regression, ``q`` to the quantile,
    ``n_boot`` and ``seed`` to the bootstrap of the max-type estimators.
    Returns a ``RegressionDecay``, ``MaxSlopeDecay``, ``AnchoredDecay`` or
    ``QuantileDecay``, or a ``VanishedDecay`` (β = 0) when the mean norm is
    zero at every lag past τ.  Warns ``UnreliableFitWarning`` when the batch
    is too small for the tails of the norm at some fitted lag (``heavy_lags``).
    """
    table = norm_table(ds, norm)
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}: use 'wls' or 'ols'")
    level = 1 - confidence_alpha(alpha, level)
    if not 0 < q < 1:
        raise InputError(f"q must be a quantile in (0, 1), e.g. 0.95; got {q}")
    if isinstance(n_boot, (bool, np.bool_)) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be a positive number of bootstrap draws, got {n_boot!r}")
    R = table.shape[1]
    if tau is None:
        tau, rule = default_tau(R), "default 0.9R"
    elif isinstance(tau, str) and tau == "auto":
        resolution = float(np.sqrt(np.finfo(ds[norm].dtype).eps))
        tau, rule = _auto_tau(table, level, weights, resolution)
    else:
        tau, rule = _check_tau(tau, R), "given"
    window = table[:, tau:]
    mean = window.mean(axis=0)
    common = dict(norm=norm, tau=tau, tau_rule=rule, level=level, window_length=R)
    if not (mean[1:] > 0).any():
        return VanishedDecay(anchor=float(mean[0]), **common)
    if method == "regression":
        positive = mean > 0
        if positive.sum() < 2:
            raise InputError(
                f"only {positive.sum()} lag(s) in [{tau}, {R}) have a positive mean {norm}: choose a smaller tau"
            )
        lags = np.arange(tau, R)[positive]
        results, center = _regress(window[:, positive], lags.astype(np.float64), weights)
        fit = RegressionDecay(results, center=center, weights=weights, window=window[:, positive],
                              fit_lags=lags, **common)
    else:
        kept = _collapse_start(mean)  # the lags before the collapse; all of them when none
        if (mean[kept:] > 0).any():
            last_zero = tau + int(np.flatnonzero(mean[:np.flatnonzero(mean > 0)[-1]] == 0)[-1])
            raise InputError(
                f"the mean {norm} is zero at lag {tau + kept} but positive at lag "
                f"{tau + kept + int(np.argmax(mean[kept:] > 0))} of [{tau}, {R}): no beta bounds a decay that "
                f"restarts from zero (an underflowed norm stays zero); choose a tau past lag {last_zero} "
                "or method='regression', which leaves zero lags out"
            )
        extra = {"q": q} if method == "quantile" else {}
        kind = {"max": MaxSlopeDecay, "anchored": AnchoredDecay, "quantile": QuantileDecay}[method]
        fit = kind(window[:, :kept], n_boot=int(n_boot), seed=seed, **extra, **common)
    if not fit.reliable:
        warnings.warn(fit.reliability_note(), UnreliableFitWarning, stacklevel=2)
    return fit


def _check_tau(tau, R: int) -> int:
    if isinstance(tau, (bool, np.bool_)) or not isinstance(tau, (int, np.integer)):
        raise InputError(f"tau must be None, 'auto' or an int lag in 0..{R - 2}; got {tau!r}")
    if not 0 <= tau <= R - 2:
        raise InputError(
            f"tau={tau} is outside the window: it must be in 0..{R - 2} so that [tau, {R}) holds two lags"
        )
    return int(tau)


def lognormal_variance(window: np.ndarray) -> np.ndarray:
    """Per column k of ``window`` (samples, lags): ``V_k``, the relative variance of ``φ̄_k/φ̄_0`` if the
    anchor norms and the ratios ``φ_{s,k}/φ_{s,0}`` were independent and log-normal (module docstring,
    "Heavy tails"); 0 where the column is all zero."""
    anchored = window[window[:, 0] > 0]
    n = anchored.shape[0]
    positive = anchored > 0
    count = positive.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.where(positive, np.log(anchored) - np.log(anchored[:, :1]), 0.0)
        centre = log_ratio.sum(axis=0) / count
        spread = np.where(positive, (log_ratio - centre) ** 2, 0.0).sum(axis=0)
        ratio_var = np.where(count > 1, spread / (count - 1), 0.0)
        weight = np.exp(np.log(anchored[:, 0]).var(ddof=1)) if n > 1 else 1.0  # E w² / (E w)²
        return np.where(count > 0, weight * (np.exp(ratio_var) * n / count - 1) / n, 0.0)


def _precision_weights(table: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """1 / Var(log φ̄_k) ≈ n φ̄_k² / s_k² (delta method); equal where no lag varies."""
    rel_var = table.var(axis=0, ddof=1) / (table.shape[0] * mean**2)
    floor = rel_var.max() * 1e-12
    return 1.0 / np.maximum(rel_var, floor) if floor > 0 else np.ones_like(mean)


def _regress(table: np.ndarray, x: np.ndarray, weights: str, curvature: bool = False):
    """Weighted LS of the log mean norm on a line in x (plus a quadratic term), clustered by sample.

    table: (samples, lags) with a positive mean at every lag; x: (lags,).
    The columns are made orthogonal under the weights (x centred at its
    weighted mean, x² residualised on both), which leaves the slope and the
    quadratic coefficient unchanged and keeps their variances free of the
    cancellation that rounding would otherwise turn negative on exact data.
    Returns the results and the centre of x.
    """
    n, L = table.shape
    mean = table.mean(axis=0)
    pseudo = np.log(mean) + table / mean - 1.0  # sample mean of each column is log(mean)
    w = _precision_weights(table, mean) if weights == "wls" else np.ones(L)
    center = float(w @ x / w.sum())
    columns = [np.ones(L), x - center]
    if curvature:
        square = columns[1] ** 2
        for basis in columns:
            square = square - (w @ (square * basis)) / (w @ (basis * basis)) * basis
        columns.append(square)
    model = WLS(pseudo.ravel(), np.tile(np.column_stack(columns), (n, 1)), weights=np.tile(w, n))
    results = model.fit(cov_type="cluster", cov_kwds={"groups": np.repeat(np.arange(n), L)}, use_t=True)
    return results, center


def _collapse_start(mean: np.ndarray) -> int:
    """How many leading lags have a positive mean: where a collapse to zero starts (every lag if none)."""
    zero = mean == 0
    return int(zero.argmax()) if zero.any() else mean.size


def _auto_tau(table: np.ndarray, level: float, weights: str, resolution: float) -> tuple[int, str]:
    """The smallest candidate τ whose window [τ, R) is log-linear (see the module docstring)."""
    R = table.shape[1]
    last = R - 3  # the curvature test needs three lags
    step = max(1, int(np.ceil((last + 1) / AUTO_TAU_CANDIDATES)))
    for tau in range(0, last + 1, step):
        window = table[:, tau:]
        mean = window.mean(axis=0)
        if not (mean[1:] > 0).any():
            return tau, "auto: the norm vanishes past tau"
        kept = _collapse_start(mean)
        if kept < 3 or (mean[kept:] > 0).any():  # a line through two lags, or a restart from zero
            continue
        x = np.arange(kept) / (kept - 1)  # the fitted lags mapped onto [0, 1]
        res, _ = _regress(window[:, :kept], x, weights, curvature=True)
        curvature, p_value = res.params[2], res.pvalues[2]
        if abs(curvature) < resolution or p_value >= 1 - level:
            return tau, f"auto: first log-linear window (curvature {curvature:.2g}, p={p_value:.3g})"
    return default_tau(R), "auto: no log-linear window found, default 0.9R"


class DecayFit:
    """Results of ``fit_decay``: β̂, τ, intervals, a band for plotting, a summary and a reliability check."""

    method: str
    beta: float

    def __init__(self, *, norm: str, tau: int, tau_rule: str, level: float, window_length: int,
                 fit_lags: np.ndarray, lognormal_var: np.ndarray):
        self.norm = norm
        self.tau = tau
        self.tau_rule = tau_rule
        self.level = level
        self.window_length = window_length
        self.fit_lags = fit_lags  #: the lags the estimate uses
        self.lognormal_var = lognormal_var  #: V_k at each fitted lag (module docstring, "Heavy tails")

    def conf_int(self, alpha: float | None = None, *, level: float | None = None) -> np.ndarray:
        """(lower, upper) confidence limits for β at confidence 1 − ``alpha`` (default: the fit's level).

        ``level=`` is deprecated: pass ``alpha = 1 − level``, as statsmodels does.
        """
        return self._limits(confidence_alpha(alpha, level, 1 - self.level))

    def band(self, lags: ArrayLike, alpha: float | None = None, *, level: float | None = None) -> xr.Dataset:
        """Fitted mean norm at ``lags`` with its band at confidence 1 − ``alpha`` (default: the fit's)."""
        alpha = confidence_alpha(alpha, level, 1 - self.level)
        lags = np.asarray(lags, dtype=np.int64)
        mean, lower, upper = self._curve(lags, alpha)
        return xr.Dataset(
            {"mean": ("lag", mean), "lower": ("lag", lower), "upper": ("lag", upper)},
            coords={"lag": lags},
            attrs={"norm": self.norm, "level": 1 - alpha},
        )

    @property
    def decays(self) -> bool:
        """Assumption A-1 is supported: the upper confidence limit of β is below 1."""
        return bool(self.conf_int()[1] < 1)

    @property
    def heavy_lags(self) -> np.ndarray:
        """Fitted lags whose mean this batch cannot estimate: ``V_k > HEAVY_TAIL_LIMIT``."""
        return self.fit_lags[self.lognormal_var > HEAVY_TAIL_LIMIT]

    @property
    def reliable(self) -> bool:
        """No fitted lag is heavy, so the interval's measured coverage applies."""
        return not self.heavy_lags.size

    def reliability_note(self) -> str:
        """One line on whether the interval can be trusted, and what to do if not."""
        if self.reliable:
            return "reliable: every fitted lag's mean is estimable from this batch"
        heavy, worst = self.heavy_lags, self.lognormal_var.max()
        return (
            f"unreliable: at lag(s) {_lag_list(heavy)} this batch is too small for the tails of {self.norm} "
            f"(log-normal relative variance of the lag mean up to {worst:.3g} > {HEAVY_TAIL_LIMIT}): "
            "those means are skewed and usually below their expectation, so the interval may miss beta; "
            f"use more samples, or a window ending before lag {heavy[0]}"
        )

    @property
    def weights(self) -> str:
        return "none"

    def to_attrs(self) -> dict:
        """The fit as netCDF-safe attributes (str, int, float)."""
        lower, upper = self.conf_int()
        return {
            "norm": self.norm,
            "method": self.method,
            "weights": self.weights,
            "tau": int(self.tau),
            "tau_rule": self.tau_rule,
            "level": float(self.level),
            "beta": float(self.beta),
            "beta_lower": float(lower),
            "beta_upper": float(upper),
            "decays": int(self.decays),
            "reliable": int(self.reliable),
            "heavy_lags": ",".join(map(str, self.heavy_lags)),
            "heavy_tail_limit": float(HEAVY_TAIL_LIMIT),
            **self._settings(),
        }

    def summary(self) -> Summary:
        """A statsmodels Summary: the estimate, its interval, the settings and the reliability check."""
        lower, upper = self.conf_int()
        pct = f"{100 * self.level:g}%"
        params = SimpleTable(
            [[f"{self.beta:.6g}", f"{lower:.6g}", f"{upper:.6g}", "yes" if self.decays else "no"]],
            headers=["beta", f"{pct} lower", f"{pct} upper", "decays (A-1)"],
            stubs=["beta"],
            title=f"Geometric decay of E[{self.norm}] over lags [{self.tau}, {self.window_length})",
        )
        settings = [[self.method], [self.weights], [f"{self.tau} ({self.tau_rule})"], [str(self.window_length)]]
        stubs = ["method", "weights", "tau", "window length R"]
        for key, value in self._settings().items():
            settings.append([str(value)])
            stubs.append(key)
        settings.append(["yes" if self.reliable else f"NO: heavy lags {_lag_list(self.heavy_lags)}"])
        stubs.append("interval reliable")
        smry = Summary()
        smry.tables += [params, SimpleTable(settings, stubs=stubs)]
        if not self.reliable:
            smry.add_extra_txt(["Warning: " + self.reliability_note()])
        return smry

    def _repr_html_(self) -> str:
        """The summary in a notebook: statsmodels' HTML tables, then the reliability note
        (escaped, as its own paragraph) when the interval is not to be trusted."""
        smry = self.summary()
        smry.extra_txt = None  # as_html would append the note unescaped; it follows as a paragraph
        note = "" if self.reliable else f"<p><b>Warning</b>: {html.escape(self.reliability_note())}</p>"
        return smry.as_html() + note

    def _settings(self) -> dict:
        """The estimator's own settings, for the attrs and the summary."""
        return {}

    def _limits(self, alpha: float) -> np.ndarray:
        raise NotImplementedError

    def _curve(self, lags: np.ndarray, alpha: float):
        raise NotImplementedError

    def __repr__(self):
        lower, upper = self.conf_int()
        flag = "" if self.reliable else " UNRELIABLE"
        return f"<{type(self).__name__} beta={self.beta:.4g} [{lower:.4g}, {upper:.4g}] tau={self.tau}{flag}>"


class RegressionDecay(DecayFit):
    """Eq. 22: slope of the log mean norm on the lag (statsmodels WLS/OLS, clustered by sample)."""

    method = "regression"

    def __init__(self, results, *, center: float, weights: str, window: np.ndarray, **common):
        super().__init__(lognormal_var=lognormal_variance(window), **common)
        self.results = results
        self.center = center  # the lag at which the intercept is the fitted log mean
        self._weights = weights
        self.beta = float(np.exp(results.params[1]))

    @property
    def weights(self) -> str:
        return self._weights

    def _limits(self, alpha):
        return np.exp(self.results.conf_int(alpha=alpha)[1])

    def _curve(self, lags, alpha):
        design = np.column_stack([np.ones(lags.size), lags - self.center])
        log_mean = design @ self.results.params
        # x·Σ·x, clipped at 0: on exact data the clustered covariance is rounding, and the band's
        # variance can come out a hair below zero where its square root would be NaN
        variance = np.clip(np.einsum("ij,jk,ik->i", design, self.results.cov_params(), design), 0, None)
        half = stats.t.ppf(1 - alpha / 2, self.results.df_resid_inference) * np.sqrt(variance)  # clusters − 1
        return np.exp(log_mean), np.exp(log_mean - half), np.exp(log_mean + half)


class _SlopeDecay(DecayFit):
    """A max-type estimator: an order statistic of slopes of log φ̄, with the test-inversion
    interval of the module docstring (studentized bootstrap over samples)."""

    def __init__(self, window: np.ndarray, *, n_boot: int, seed: int, **common):
        n, L = window.shape
        super().__init__(fit_lags=common["tau"] + np.arange(L), lognormal_var=lognormal_variance(window), **common)
        self.n_boot, self.seed = n_boot, seed
        first, second = self._pairs(L)
        if n_boot * first.size > MAX_BOOT_ENTRIES:
            raise InputError(
                f"the {self.method} interval would hold {n_boot} x {first.size} bootstrap slopes: "
                "use a larger tau (a shorter window) or a smaller n_boot"
            )
        self.rank = self._rank(first.size)
        mean = window.mean(axis=0)
        span = (second - first).astype(np.float64)
        self.slopes = (np.log(mean[second]) - np.log(mean[first])) / span
        unit = window / mean  # φ_{s,k}/φ̄_k: each column averages 1
        spread = unit[:, second] - unit[:, first]  # n·span × each sample's influence on its slope
        self.slope_se = np.sqrt((spread**2).sum(axis=0)) / (n * span)
        self.beta = float(np.exp(self._estimate(self.slopes)))

        rng = np.random.default_rng(seed)
        draws = rng.integers(0, n, (n_boot, n)) + n * np.arange(n_boot)[:, None]
        counts = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)
        boot_mean = counts @ window / n
        with np.errstate(divide="ignore", invalid="ignore"):
            log_boot = np.log(boot_mean)
            boot_slopes = (log_boot[:, second] - log_boot[:, first]) / span
            # Each resample's own delta-method error: its influences are g_k' u_k' − g_k u_k with g = φ̄/M*,
            # summed as g_k'² Σc(u_k'−u_k)² + 2 g_k' Δg Σc(u_k'−u_k)u_k + Δg² Σc u_k², so that exactly
            # proportional lags (spread 0) leave rounding, not a cancellation, in the variance.
            scale = mean / boot_mean
            late, step = scale[:, second], scale[:, second] - scale[:, first]
            boot_var = (late**2 * (counts @ spread**2) + 2 * late * step * (counts @ (spread * unit[:, first]))
                        + step**2 * (counts @ unit**2)[:, first])
            boot_se = np.sqrt(np.maximum(boot_var, 0.0)) / (n * span)
            studentized = np.where(boot_se > 0, (boot_slopes - self.slopes) / boot_se, 0.0)
        self.boot_t = np.nan_to_num(studentized, nan=0.0, posinf=np.inf, neginf=-np.inf)
        self.boot_log_anchor = log_boot[:, 0]
        self.anchor = float(mean[0])

    def _pairs(self, L: int) -> tuple[np.ndarray, np.ndarray]:
        """The lag pairs (k, k'), as offsets from τ, whose slopes the estimator combines."""
        raise NotImplementedError

    def _rank(self, P: int) -> int:
        """The order statistic (1-based) of the slopes that the interval inverts."""
        return P

    def _estimate(self, slopes: np.ndarray) -> float:
        return float(slopes.max())

    def _settings(self) -> dict:
        return {"n_boot": int(self.n_boot), "seed": int(self.seed)}

    def _limits(self, alpha):
        lower_t = np.quantile(self.boot_t, alpha / 2, axis=0, method="inverted_cdf")
        miss_above = np.mean(_kth(self.boot_t - lower_t, self.rank) < 0)  # P(upper < β) when all slopes are equal
        c = np.quantile(_kth(self.boot_t, self.rank), min(1.0, 1 - alpha + miss_above), method="inverted_cdf")
        with np.errstate(invalid="ignore"):  # an infinite critical value times a zero error is no offset
            lower = _kth(self.slopes - np.where(self.slope_se > 0, c * self.slope_se, 0.0), self.rank)
            upper = _kth(self.slopes - np.where(self.slope_se > 0, lower_t * self.slope_se, 0.0), self.rank)
        return np.exp([lower, upper])

    def _curve(self, lags, alpha):
        """φ̄_τ β̂^{k−τ}; each limit starts at the anchor's basic-bootstrap limit and decays at β's limit."""
        steps = (lags - self.tau).astype(np.float64)
        beta_lower, beta_upper = self._limits(alpha)
        log_anchor = np.log(self.anchor)
        anchor_hi, anchor_lo = 2 * log_anchor - np.quantile(
            self.boot_log_anchor, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")
        with np.errstate(divide="ignore"):
            lower = np.exp(anchor_lo + steps * np.log(beta_lower))
        return self.anchor * self.beta**steps, lower, np.exp(anchor_hi + steps * np.log(beta_upper))


class MaxSlopeDecay(_SlopeDecay):
    """Eq. 21: the largest slope of log φ̄ between two lags of the window (= the largest one-step slope)."""

    method = "max"

    def _pairs(self, L):
        return np.arange(L - 1), np.arange(1, L)


class AnchoredDecay(_SlopeDecay):
    """The authors' code's max: the largest ``(log φ̄_k − log φ̄_τ)/(k − τ)``."""

    method = "anchored"

    def _pairs(self, L):
        return np.zeros(L - 1, dtype=np.int64), np.arange(1, L)


class QuantileDecay(_SlopeDecay):
    """The authors' code's quantile: the q-quantile of the slopes between all pairs of the window."""

    method = "quantile"

    def __init__(self, window: np.ndarray, *, q: float, **kwargs):
        self.q = q
        super().__init__(window, **kwargs)

    def _pairs(self, L):
        return np.triu_indices(L, 1)

    def _rank(self, P):
        return int(np.ceil(self.q * P))

    def _estimate(self, slopes):
        return float(np.quantile(slopes, self.q))

    def _settings(self):
        return {"q": float(self.q), **super()._settings()}


class VanishedDecay(DecayFit):
    """The mean norm is zero at every lag past τ: β = 0 exactly, nothing to estimate."""

    method = "vanished"

    def __init__(self, *, anchor: float, **common):
        lags = common["tau"] + np.arange(common["window_length"] - common["tau"])
        super().__init__(fit_lags=lags, lognormal_var=np.zeros(lags.size), **common)
        self.anchor = anchor
        self.beta = 0.0

    def _limits(self, alpha):
        return np.zeros(2)

    def _curve(self, lags, alpha):
        mean = np.where(lags == self.tau, self.anchor, np.where(lags > self.tau, 0.0, np.nan))
        return mean, mean, mean


def _kth(values: np.ndarray, rank: int) -> np.ndarray:
    """The rank-th smallest (1-based) along the last axis."""
    return np.partition(values, rank - 1, axis=-1)[..., rank - 1]


def _lag_list(lags: np.ndarray) -> str:
    """Lags as short text: contiguous runs as ranges."""
    runs, start = [], None
    for i, lag in enumerate(lags):
        if start is None:
            start = lag
        if i + 1 == lags.size or lags[i + 1] != lag + 1:
            runs.append(str(start) if start == lag else f"{start}-{lag}")
            start = None
    return ", ".join(runs)
