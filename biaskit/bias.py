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

``exact_kappa`` needs no bound: it takes the smallest K whose *exact* relative
bias, measured by ``decompose``, is below δ at a stated confidence (see its
docstring for the jackknife over groups of windows and the part of the tail
beyond the window).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scipy import stats

from .decay import DecayFit, confidence_alpha, default_tau, fit_decay, norm_table
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


def exact_kappa(ds: xr.Dataset, deltas: ArrayLike, level: float | None = None,
                K_range: tuple[int, int] | None = None, *, alpha: float | None = None) -> xr.Dataset:
    """The smallest K whose exact relative bias is below δ with confidence ``level`` = 1 − ``alpha``
    (``alpha`` 0.05 by default, at most 0.5; ``level``, third in place, is deprecated).

    The population quantity is ``δ(K) = ||E(ĝ_K − g)|| / ||E g||``, E over the
    windows the batch was drawn from; ``decompose`` measures its batch value
    exactly. ``rel_bias_upper`` (K) is a one-sided upper confidence limit:

    - Sampling of windows. ``δ(K)²`` is a ratio of squared norms of means,
      ``||E T_K||² / ||E g||²``. Each is estimated without the noise's upward
      bias by its U-statistic over the G groups of windows ``decompose`` kept
      apart (the dot products between different groups' sums only); their
      variances and covariance by the delete-one-group jackknife (Tukey; Efron
      & Stein 1981), all from the Dataset's group pieces
      (``||T − T_g||² = ||T||² − 2<T, T_g> + ||T_g||²``), no second sweep; and the
      ratio's limit by Fieller's theorem with ``t_{G−1, level}``. Fieller's
      limit is infinite when ``||E g||²`` itself is not resolved above zero at
      the level: the batch's mean gradient is then mostly noise, and no K can
      be certified from it (more windows are needed). Where it is resolved, a
      tail that is exactly zero in every group is certified zero.
    - The tail beyond the window, which the window's full BPTT cannot see: by
      the triangle inequality at most ``Σ_{k≥R} ||E g^(k)||``, bounded by the
      groups' mean contribution norms (``group_contribution``) decaying
      geometrically from lag ``⌊0.9R⌋`` on, fitted by regression and summed past
      the window from the upper end of the fit's band at the last lag at the
      upper limit of its decay rate, over the lower limit of ``||E g||``. It is added to every K's
      limit, so a window too short for the gradient to have faded cannot certify a small K.
    - K ≥ R (past the window): the same fitted tail, summed past K, at the upper
      confidence limit of its decay rate; marked ``extrapolated``. There the
      point value ``rel_bias`` is the fit's own estimate (its mean at the last
      lag, its β) over ``||g||``; inside the window ``rel_bias`` is the batch's
      exact value, which leaves out the tail past the window (0 at K = R − 1),
      so the point curve need not fall across R; the limits include it.

    ``rel_bias_lower`` (K) is a lower limit from the separate one-sided limits
    of the numerator (its lower) and the denominator (its upper), so its
    confidence is at least ``2·level − 1`` (Bonferroni); it exists where the
    upper limit does not, and says whether a K evidently misses δ (0 past the
    window, where nothing is measured).

    ``kappa`` (δ) is the smallest K in ``K_range`` (default 0..R−1) with
    ``rel_bias_upper < δ``, else K_max with ``kappa_reached`` = 0. On systems
    with a known population (tests/test_bias.py) the limit covers at close to
    its level where the gradient is resolved, and more often where it is not.
    """
    for name in ("rel_bias", "group_tail_sq", "group_tail_dot", "group_grad_sq", "group_grad_dot",
                 "group_contribution", "group_size"):
        if name not in ds:
            raise InputError(f"the Dataset has no {name!r}: pass the output of biaskit.decompose")
    alpha = confidence_alpha(alpha, level)
    if alpha > 0.5:
        raise InputError(f"alpha = 1 - level must be at most 0.5, e.g. 0.05 (0.5: the estimate itself); got {alpha:g}")
    level = 1 - alpha
    G, R = ds.sizes["group"], ds.sizes["K"]
    if G < 3:
        raise InputError(f"the confidence limit needs at least 3 groups of windows, got {G}: decompose more "
                         "windows, with groups >= 3")
    deltas = _check_deltas(deltas)
    K = _truncations((0, R - 1) if K_range is None else K_range)
    tails, grads = _jackknife_pieces(ds)
    factor = stats.t.ppf(level, G - 1)
    b, v_b = grads
    resolved = b > factor * np.sqrt(v_b)  # ||E g||² above zero at the level
    within = np.sqrt(_fieller_upper(*tails, *grads, factor))
    exactly_zero = (ds["abs_bias"].values == 0) & (ds["group_tail_sq"].transpose("K", "group").values == 0).all(1)
    within = np.where(exactly_zero & resolved, 0.0, within)
    grad_low = np.float64(np.sqrt(b - factor * np.sqrt(v_b)) if resolved else 0.0)  # a lower limit of ||E g||
    beyond, fit = _beyond_window(ds, level)
    inside = K < R

    def over_gradient(tail):  # a fitted tail over the lower limit of ||E g||: nothing certified unresolved
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(~resolved, np.inf, np.where(tail == 0, 0.0, tail / grad_low))

    past_window = over_gradient(beyond["at_fit"])
    upper = np.empty(K.shape)
    upper[inside] = within[K[inside]] + past_window
    upper[~inside] = over_gradient(beyond["past"](K[~inside]))
    exact = ds["rel_bias"].values.astype(np.float64)
    grad = float(ds.attrs["grad_norm"])
    point = np.where(inside, exact[np.minimum(K, R - 1)], beyond["past_at_fit"](K) / grad)
    kappa, reached = _first_below(upper, K, deltas)
    a, v_a, _ = tails
    b_high = b + factor * np.sqrt(v_b)
    lower_inside = np.sqrt(np.clip(a - factor * np.sqrt(v_a), 0, None) / b_high) if b_high > 0 else 0 * a
    lower = np.where(inside, lower_inside[np.minimum(K, R - 1)], 0.0)
    out = xr.Dataset(
        {
            "rel_bias": ("K", point),
            "rel_bias_lower": ("K", lower),
            "rel_bias_upper": ("K", upper),
            "extrapolated": ("K", (~inside).astype(np.int8)),
            "beyond_window": ((), float(past_window)),
            "gradient_resolved": ((), int(resolved)),
            "grad_sq": ((), float(b)),
            "grad_sq_sd": ((), float(np.sqrt(v_b))),
            "kappa": ("delta", kappa),
            "kappa_reached": ("delta", reached),
        },
        coords={"K": K, "delta": deltas},
        attrs={"level": float(level), "groups": int(G), "window_length": int(R), "t_factor": float(factor),
               "method": "Fieller limit of the U-statistic ratio, delete-one-group jackknife, t with G-1 df",
               "tail_fit_beta": float(fit.beta) if fit else math.nan,
               "tail_fit_beta_upper": float(beyond["beta_upper"]),
               "tail_fit_tau": int(fit.tau) if fit else default_tau(R),
               "tail_fit_reliable": int(bool(fit and fit.reliable))},
    )
    out["rel_bias"].attrs["long_name"] = "exact relative bias over the batch (extrapolated past the window)"
    out["rel_bias_upper"].attrs["long_name"] = f"one-sided {100 * level:g}% upper limit of the relative bias"
    out["rel_bias_lower"].attrs["long_name"] = (f"lower limit of the relative bias, from {100 * level:g}% limits of "
                                                f"its numerator and denominator (confidence >= {200 * level - 100:g}%)")
    out["beyond_window"].attrs["long_name"] = "bound on the relative bias from lags past the window"
    out["gradient_resolved"].attrs["long_name"] = "1 if ||E g||^2 is resolved above 0 at the level, else 0"
    out["grad_sq"].attrs["long_name"] = "U-statistic of ||E g||^2 over the groups"
    out["grad_sq_sd"].attrs["long_name"] = "its delete-one-group jackknife standard deviation"
    out["kappa"].attrs["long_name"] = "smallest K in range with rel_bias_upper < delta (K_max if none)"
    out["kappa_reached"].attrs["long_name"] = "1 if some K in [K_min, K_max] has rel_bias_upper < delta, else 0"
    return out


def not_reached(exact: xr.Dataset, delta: float, windows: int) -> dict:
    """Why no K in ``exact``'s range certified ``delta`` (an ``exact_kappa`` Dataset of ``windows``
    windows), and what would resolve it: ``{"cause", "why", "advice"}``.

    - ``unresolved``: ||E g||² is not above t·sd; its jackknife sd falls about as 1/√n, so about
      n·(t·sd/b)² windows resolve it (none can be said when b ≤ 0: the batch shows no mean at all);
    - ``beyond window``: the bound on the tail past the window is infinite (its contributions'
      fitted decay rate reaches 1 at its upper limit): a window long enough for the fitted rate to
      bring the contributions down 100-fold past this one's end, or twice this one where the
      fit itself does not decay;
    - ``above delta``: the upper limit stays above δ for every K in range: the dependence is
      longer than the range (K up to its end, the window's R − 1 by default).
    """
    R, t = int(exact.attrs["window_length"]), float(exact.attrs["t_factor"])
    if not int(exact["gradient_resolved"]):
        b, sd = float(exact["grad_sq"]), float(exact["grad_sq_sd"])
        more = math.ceil(windows * (t * sd / b) ** 2) if b > 0 else None
        return {"cause": "unresolved",
                "why": "the windows' mean gradient is mostly noise (||E g||^2 not resolved above zero at this level)",
                "advice": f"about {more} windows (now {windows})" if more else
                          f"many more windows than {windows} (this batch shows no mean gradient at all)",
                "windows_needed": more}
    if not math.isfinite(float(exact["beyond_window"])):
        beta = float(exact.attrs["tail_fit_beta"])
        length = R + math.ceil(math.log(0.01) / math.log(beta)) if 0 < beta < 1 else 2 * R
        cause = (f"the per-lag contributions' decay rate reaches 1 at its upper limit; fitted {beta:.3g}"
                 if math.isfinite(beta) else "too few of its last lags have a positive mean contribution to fit "
                 "their decay")
        return {"cause": "beyond window",
                "why": f"the bias from lags past the {R}-step window is unbounded ({cause})",
                "advice": f"a window of about {length} steps (now {R}), or more windows to narrow the rate",
                "window_length_needed": length}
    K_end = int(exact.K.max())
    return {"cause": "above delta",
            "why": f"the exact bias's upper limit stays above {delta:g} for every K <= {K_end} "
                   f"(at K = {K_end}: {float(exact['rel_bias_upper'].sel(K=K_end)):.3g})",
            "advice": f"a window longer than {R} steps, so that longer K can be measured",
            "window_length_needed": 2 * R}


def _jackknife_pieces(ds: xr.Dataset):
    """U-statistics of ||E T_K||² (K,) and ||E g||² and their jackknife (co)variances.

    With group sums S_g (the Dataset's pieces, divided by B²), the U-statistic
    of ||E X||² is ``Σ_{g≠h} <S_g, S_h> / Σ_{g≠h} n_g n_h``, and leaving group g
    out takes its sum away from the total. Returns
    ``((a, v_aa, v_ab), (b, v_bb))`` for the tails a and the gradient b.
    """
    n = ds["group_size"].values.astype(np.float64)
    B = n.sum()
    pairs = (B**2 - (n**2).sum()) / B**2
    pairs_out = ((B - n) ** 2 - ((n**2).sum() - n**2)) / B**2  # (G,)
    tail_sq = ds["abs_bias"].values.astype(np.float64)[:, None] ** 2
    group_tail_sq = ds["group_tail_sq"].transpose("K", "group").values
    tail_out = tail_sq - 2 * ds["group_tail_dot"].transpose("K", "group").values + group_tail_sq
    grad_sq = float(ds.attrs["grad_norm"]) ** 2
    group_grad_sq = ds["group_grad_sq"].values
    grad_out = grad_sq - 2 * ds["group_grad_dot"].values + group_grad_sq
    a = (tail_sq[:, 0] - group_tail_sq.sum(1)) / pairs
    a_out = (tail_out - (group_tail_sq.sum(1, keepdims=True) - group_tail_sq)) / pairs_out
    b = (grad_sq - group_grad_sq.sum()) / pairs
    b_out = (grad_out - (group_grad_sq.sum() - group_grad_sq)) / pairs_out
    G = n.size
    da, db = a_out - a_out.mean(1, keepdims=True), b_out - b_out.mean()
    scale = (G - 1) / G
    return (a, scale * (da**2).sum(1), scale * (da * db).sum(1)), (b, scale * (db**2).sum())


def _fieller_upper(a, v_aa, v_ab, b, v_bb, t) -> np.ndarray:
    """Fieller's one-sided upper limit of a/b: the largest x with (a − x b) ≥ −t·sd(a − x b),
    infinite when b is not resolved above zero (b ≤ t·sd(b))."""
    A = b**2 - t**2 * v_bb
    half = a * b - t**2 * v_ab
    C = a**2 - t**2 * v_aa
    with np.errstate(invalid="ignore", divide="ignore"):
        root = (half + np.sqrt(np.clip(half**2 - A * C, 0, None))) / A
    return np.where((A > 0) & (b > 0), np.clip(root, 0, None), np.inf)


def _beyond_window(ds: xr.Dataset, level: float) -> tuple[dict, DecayFit | None]:
    """The tail past the window (in gradient units) from the decay of the groups' mean
    contribution norms; unbounded, with no fit, where too few lags are positive to fit one."""
    table = ds["group_contribution"].transpose("group", "lag").values.astype(np.float64)
    R = table.shape[1]
    try:
        with warnings.catch_warnings():  # few groups: the fit's own reliability flag is read below
            warnings.simplefilter("ignore")
            fit = fit_decay(xr.Dataset({"psi": (("sample", "lag"), table)}), norm="psi",
                            tau=default_tau(R), weights="ols", alpha=1 - level)
    except InputError:  # too few positive lags to fit a decay (float32 zeros): the tail is not bounded
        return {"at_fit": math.inf, "beta_upper": math.nan, "past": lambda K: np.full(np.shape(K), np.inf),
                "past_at_fit": lambda K: np.full(np.shape(K), np.nan)}, None
    alpha = 2 * (1 - level)  # the two-sided interval whose upper end is the one-sided limit
    beta, beta_upper = fit.beta, fit.conf_int(alpha)[1] if alpha < 1 else fit.beta
    band = fit.band([R - 1], alpha if alpha < 1 else 0.5)
    last_upper, last_mean = (float(band[end][0]) if fit.beta > 0 else 0.0 for end in ("upper", "mean"))
    last_upper = last_upper if alpha < 1 else last_mean

    def past(K, rate, last):  # Σ_{k>K} last · rate^(k−R+1): the tail's norm past K
        if last == 0:
            return np.zeros(np.shape(K))
        if rate >= 1:
            return np.full(np.shape(K), np.inf)
        return last * rate ** (np.asarray(K) - R + 2) / (1 - rate)

    return {"at_fit": float(past(R - 1, beta_upper, last_upper)), "beta_upper": beta_upper,
            "past": lambda K: past(K, beta_upper, last_upper),  # at most, at the level
            "past_at_fit": lambda K: past(K, beta, last_mean)}, fit  # the fit's own estimate


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
