"""fit_decay against systems whose decay rate is known in closed form."""

import numpy as np
import pytest
import statsmodels.api as sm
import torch
import xarray as xr
from helpers import LinearCell
from scipy import stats
from torch import nn

import biaskit
from biaskit import report
from biaskit.decay import HEAVY_TAIL_LIMIT, UnreliableFitWarning, fit_decay, lognormal_variance
from biaskit.errors import InputError


class ResettingCell(nn.Module):
    """h_t = a(x_t) h_{t-1} + u x_t with gain a = 1.5 if x_t > 0 (keep) else 0.3 (reset)."""

    KEEP, RESET = 1.5, 0.3

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.ones(1, 1, dtype=torch.float64))

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, 1, dtype=torch.float64)

    def forward(self, x, h):
        gain = torch.where(x[:, :1] > 0, torch.full_like(h, self.KEEP), torch.full_like(h, self.RESET))
        return gain * h + x @ self.u.T


class RandomGainCell(nn.Module):
    """h_t = a_t h_{t-1} + u x_t[0], the gain a_t = x_t[1] read from the input."""

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.ones(1, 1, dtype=torch.float64))

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, 1, dtype=torch.float64)

    def forward(self, x, h):
        return x[:, 1:2] * h + x[:, :1] @ self.u.T


def orthogonal_rnn(beta, n=6, features=3, batch=16, R=30, seed=0):
    """decompose of h_t = β Q h_{t-1} + U x_t with Q orthogonal: φ_k = β^k φ_0 for every sample."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    cell = LinearCell(beta * Q, torch.randn(n, features, generator=g, dtype=torch.float64))
    system = biaskit.wrap(cell, nn.Linear(n, 2).double(), nn.CrossEntropyLoss(reduction="none"))
    x = torch.randn(batch, R, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (batch,), generator=g)
    return biaskit.decompose(system, x, y, psi=False)


def noisy_geometric_table(seed, beta=0.9, n=64, R=50, sigma=0.5):
    """φ_{s,k} = β^k c_s ε_{s,k}, c_s ~ U(0.5, 1.5), ε lognormal with mean 1, all independent.

    The truth is known by construction: E φ_k = E c · E ε · β^k = β^k, so the
    mean norm decays at exactly β, while every lag's sample mean is noisy and
    the lag means are correlated through the shared per-sample scale c_s.
    """
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 1.5, (n, 1))
    noise = rng.lognormal(-sigma**2 / 2, sigma, (n, R))
    return xr.Dataset({"phi": (("sample", "lag"), beta ** np.arange(R) * scale * noise)})


def path_norms(gains, scale):
    """φ_{s,k} = scale_s · Π of the k gains nearest the loss (gains: (samples, R-1), nearest first)."""
    ones = np.ones((gains.shape[0], 1))
    return np.asarray(scale).reshape(-1, 1) * np.concatenate([ones, np.cumprod(gains, axis=1)], axis=1)


def bounded_gain_table(seed, n=64, R=12):
    """RandomGainCell with gains a ~ U(0.7, 1.1) and a loss y_s·w·h_s, y_s ~ U(0.5, 1.5), in closed form.

    E φ_k = |w| E y · (E a)^k = 0.9^k (|w| = 1): every gain is bounded, so every
    lag's norm is light-tailed, yet the lag means are correlated through the
    per-sample scale y_s and through the shared path of gains.
    """
    rng = np.random.default_rng(seed)
    return table_dataset(path_norms(rng.uniform(0.7, 1.1, (n, R - 1)), rng.uniform(0.5, 1.5, n)))


def resetting_table(seed, n, R):
    """ResettingCell in closed form (|w| = 1): gains 1.5 or 0.3 with probability 1/2, E φ_k = 0.9^k."""
    rng = np.random.default_rng(seed)
    gains = np.where(rng.random((n, R - 1)) < 0.5, ResettingCell.KEEP, ResettingCell.RESET)
    return table_dataset(path_norms(gains, np.ones(n)))


def table_dataset(table):
    return xr.Dataset({"phi": (("sample", "lag"), np.asarray(table, dtype=np.float64))})


# Closed-form checks on small noisy tables hold whatever the fit's reliability, which has its own tests.
small_batch = pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")


def slopes_between_all_pairs(log_mean):
    """(log φ̄_k' − log φ̄_k)/(k' − k) for every k < k', by a double loop."""
    L = log_mean.size
    return np.array([(log_mean[b] - log_mean[a]) / (b - a) for a in range(L) for b in range(a + 1, L)])


# --- closed-form systems -----------------------------------------------------


ORTHOGONAL_BETA = 0.8


@pytest.fixture(scope="module")
def orthogonal_ds():
    return orthogonal_rnn(ORTHOGONAL_BETA)


def test_orthogonal_linear_rnn_norms_are_exactly_geometric(orthogonal_ds):
    phi = orthogonal_ds.phi.values
    np.testing.assert_allclose(phi, ORTHOGONAL_BETA ** np.arange(phi.shape[1]) * phi[:, :1], rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weights": "ols"}, {"tau": 0}, {"method": "max"}, {"method": "anchored"}, {"method": "quantile"},
     {"method": "quantile", "tau": 0}, {"tau": "auto"}],
)
def test_orthogonal_linear_rnn_fit_recovers_beta(orthogonal_ds, kwargs):
    beta = ORTHOGONAL_BETA
    fit = fit_decay(orthogonal_ds, **kwargs)
    lower, upper = fit.conf_int()
    assert fit.beta == pytest.approx(beta, abs=1e-10)
    # No sampling noise: the interval collapses onto the truth, up to float rounding.
    assert lower - 1e-10 <= beta <= upper + 1e-10
    assert upper - lower < 1e-6
    assert fit.decays and fit.reliable


def test_random_gain_and_resetting_rnns_are_their_closed_forms():
    """decompose of RandomGainCell and ResettingCell under a loss y_s·w·h_s gives |y_s w| Π of the last k gains,
    the closed form the coverage tests draw their tables from."""
    g = torch.Generator().manual_seed(1)
    batch, R = 8, 12
    head = nn.Linear(1, 1).double()
    y = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
    x = torch.stack([torch.randn(batch, R, generator=g, dtype=torch.float64),
                     0.7 + 0.4 * torch.rand(batch, R, generator=g, dtype=torch.float64)], dim=-1)
    for cell, inputs, gains in [(RandomGainCell(), x, x[:, :, 1].numpy()),
                                (ResettingCell(), x[:, :, :1], np.where(x[:, :, 0].numpy() > 0, 1.5, 0.3))]:
        system = biaskit.wrap(cell, head, lambda out, target: out[:, 0] * target)
        ds = biaskit.decompose(system, inputs, y, psi=False)
        expected = path_norms(gains[:, ::-1][:, : R - 1], abs(head.weight.item()) * y.numpy())
        np.testing.assert_allclose(ds.phi.values, expected, rtol=1e-12)


def test_unstable_resetting_rnn_decays_in_expectation_not_uniformly():
    """Gains 1.5 (keep) or 0.3 (reset) with probability 1/2 each: E a = 0.9 < 1 < 1.5.

    The loss is linear in h (L = w·h, target 1), so ∂L/∂h_s = w for every
    sample and φ_{s,k} = |w| · Π of the last k gains: it grows along every
    path without a reset, yet E φ_k = |w| 0.9^k.  With 256 windows the batch
    mean past lag ~4 misses the rare long keep-paths that carry E φ_k, so the
    fit is flagged as unreliable (its interval misses 0.9).
    """
    g = torch.Generator().manual_seed(0)
    batch, R = 256, 30
    x = torch.randn(batch, R, 1, generator=g, dtype=torch.float64)
    head = nn.Linear(1, 1).double()
    system = biaskit.wrap(ResettingCell(), head, lambda out, y: out[:, 0] * y)
    ds = biaskit.decompose(system, x, torch.ones(batch, dtype=torch.float64), psi=False)

    gains = np.where(x[:, :, 0].numpy() > 0, ResettingCell.KEEP, ResettingCell.RESET)
    last_first = gains[:, ::-1]  # lag k multiplies the gains of the last k steps
    expected = abs(head.weight.item()) * np.concatenate(
        [np.ones((batch, 1)), np.cumprod(last_first[:, : R - 1], axis=1)], axis=1
    )
    np.testing.assert_allclose(ds.phi.values, expected, rtol=1e-12)
    assert (ds.phi.values[:, 1:] > ds.phi.values[:, :1]).any(), "some paths must grow"

    with pytest.warns(UnreliableFitWarning, match="too small for the tails of phi"):
        fit = fit_decay(ds, tau=0)
    assert fit.beta < 1
    assert fit.decays
    lower, upper = fit.conf_int()
    assert upper < 0.9  # the confident wrong interval the flag is there for
    assert not fit.reliable and fit.heavy_lags[0] <= 5 and fit.heavy_lags[-1] == R - 1
    assert fit.to_attrs()["reliable"] == 0
    assert "interval reliable" in str(fit.summary()) and "Warning: unreliable" in str(fit.summary())


def test_tau_auto_finds_the_kink_where_geometric_decay_starts():
    """log E φ_k falls by 0.5 a lag up to lag 20 and by 0.1 after: the window must start near 20."""
    k = np.arange(100)
    log_mean = np.where(k < 20, -0.5 * k, -10.0 - 0.1 * (k - 20))
    for seed in range(5):
        rng = np.random.default_rng(seed)
        table = np.exp(log_mean) * rng.uniform(0.5, 1.5, (64, 1)) * rng.lognormal(-0.045, 0.3, (64, 100))
        fit = fit_decay(table_dataset(table), tau="auto")
        assert 16 <= fit.tau <= 24
        lower, upper = fit.conf_int()
        assert lower <= np.exp(-0.1) <= upper


# --- coverage of the intervals -------------------------------------------------

SEEDS = 400
ESTIMATORS = {
    "regression wls": {},
    "regression ols": {"weights": "ols"},
    "max": {"method": "max", "n_boot": 200},
    "anchored": {"method": "anchored", "n_boot": 200},
    "quantile": {"method": "quantile", "n_boot": 200},
}
# Where the fits claim their coverage (no heavy lag).  The light-tailed system is a recurrence whose norms are
# products along one path, as an RNN's are (noisy_geometric_table's independent per-lag noise is not); the
# resetting RNN is the paper's heavy-tailed example, over as many lags as 1024 windows can estimate.
SYSTEMS = {
    "bounded gains, 64 windows, 12 lags": lambda seed: bounded_gain_table(seed, n=64, R=12),
    "resetting, 1024 windows, 5 lags": lambda seed: resetting_table(seed, n=1024, R=5),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("system", SYSTEMS)
def test_intervals_cover_beta_at_their_nominal_level(system, estimator):
    """Two-sided coverage of β = 0.9 (E φ_k = 0.9^k exactly) over 400 seeds at 80% and 95%, within three
    binomial standard errors of the nominal level on either side, where the fit says it is reliable."""
    covered = {0.2: 0, 0.05: 0}
    for seed in range(SEEDS):
        fit = fit_decay(SYSTEMS[system](seed), tau=0, seed=seed, **ESTIMATORS[estimator])
        assert fit.reliable, seed
        for alpha in covered:
            lower, upper = fit.conf_int(alpha)
            covered[alpha] += lower <= 0.9 <= upper
    for alpha, hits in covered.items():
        level = 1 - alpha
        margin = 3 * np.sqrt(level * alpha / SEEDS)
        assert abs(hits / SEEDS - level) <= margin, (alpha, hits)


def test_heavy_tails_are_flagged_where_the_interval_misses():
    """The paper's resetting RNN with 256 windows over 30 lags: the regression's 95% interval covers 0.9
    in under half the seeds (the far lags' means sit far below 0.9^k), and every one of those fits is
    flagged, with the warning, the attrs and the summary saying so."""
    seeds, covered = 100, 0
    for seed in range(seeds):
        with pytest.warns(UnreliableFitWarning):
            fit = fit_decay(resetting_table(seed, n=256, R=30), tau=0)
        assert not fit.reliable and fit.heavy_lags[-1] == 29
        lower, upper = fit.conf_int(0.05)
        covered += lower <= 0.9 <= upper
    assert covered < seeds / 2
    assert fit.to_attrs()["heavy_lags"].endswith(",29") and "NO: heavy lags" in str(fit.summary())


def test_lognormal_variance_matches_its_formula():
    """V_k = E w²/(E w)² · Var r/(E r)² / n for anchors w = φ_{s,0} and ratios r = φ_{s,k}/φ_{s,0}, both
    log-normal, r with a point mass at zero: exp(s²_log w) (exp(s²_log r)/p − 1) / n."""
    rng = np.random.default_rng(0)
    table = rng.lognormal(0.0, 1.0, (50, 4))
    table[:10, 2] = 0.0   # a point mass at zero at lag 2
    table[:, 3] = 0.0     # a lag whose mean is zero
    table[0, 0] = 0.0     # a sample without an anchor is left out
    got = lognormal_variance(table)
    rows = table[1:]
    n = rows.shape[0]
    weight = np.exp(np.var(np.log(rows[:, 0]), ddof=1))
    expected = []
    for k in range(3):
        ratio = rows[:, k] / rows[:, 0]
        positive = ratio[ratio > 0]
        expected.append(weight * (np.exp(np.var(np.log(positive), ddof=1)) / (positive.size / n) - 1) / n)
    np.testing.assert_allclose(got, expected + [0.0], rtol=1e-12)
    assert got[0] == 0.0
    # A common per-sample scale, however heavy, does not move the ratios: nothing to flag.
    np.testing.assert_array_equal(lognormal_variance(rows[:, :1] * 0.9 ** np.arange(5)), np.zeros(5))


def test_reliability_limit_separates_the_two_resetting_regimes():
    """V_k at the last lag: about 0.012 with 1024 windows over 5 lags, 0.048 with 256 (> the limit)."""
    var = (np.exp(4 * np.log(1.5 / 0.3) ** 2 / 4) - 1)  # log-gains ±0.80 around their mean
    assert var / 1024 < HEAVY_TAIL_LIMIT < var / 256
    assert fit_decay(resetting_table(0, n=1024, R=5), tau=0).reliable
    with pytest.warns(UnreliableFitWarning):
        assert not fit_decay(resetting_table(0, n=256, R=5), tau=0).reliable


# --- the estimators against direct numpy ------------------------------------


def test_eq_21_max_anchored_and_quantile_match_direct_loops():
    ds = noisy_geometric_table(5, R=30)
    tau = 18
    log_mean = np.log(ds.phi.values.mean(axis=0))[tau:]
    pairs = slopes_between_all_pairs(log_mean)

    fit = fit_decay(ds, method="max", tau=tau, n_boot=50)
    assert fit.beta == pytest.approx(np.exp(pairs.max()), rel=1e-12)  # Eq. 21: every pair τ ≤ k < k' < R

    anchored = [(log_mean[k] - log_mean[0]) / k for k in range(1, log_mean.size)]
    assert fit_decay(ds, method="anchored", tau=tau, n_boot=50).beta == pytest.approx(np.exp(max(anchored)), rel=1e-12)

    for q in (0.95, 0.5):
        fit = fit_decay(ds, method="quantile", tau=tau, q=q, n_boot=50)
        assert fit.beta == pytest.approx(np.exp(np.quantile(pairs, q)), rel=1e-12)
        assert fit.to_attrs()["q"] == q


@small_batch
def test_eq_22_regression_is_the_printed_sum_over_pairs():
    """Eq. 22: log β̃ = Σ_{k,k'} (log φ̄_k − log φ̄_k')(k − k') / Σ_{k,k'} (k − k')², over the window."""
    ds = noisy_geometric_table(2, R=40)
    tau = 25
    log_mean = np.log(ds.phi.values.mean(axis=0))[tau:]
    k = np.arange(log_mean.size)
    printed = np.sum(np.subtract.outer(log_mean, log_mean) * np.subtract.outer(k, k)) / np.sum(
        np.subtract.outer(k, k) ** 2)
    assert fit_decay(ds, tau=tau, weights="ols").beta == pytest.approx(np.exp(printed), rel=1e-10)


@small_batch
@pytest.mark.parametrize("weights", ["wls", "ols"])
def test_regression_matches_numpy_slope_and_delta_method_interval(weights):
    ds = noisy_geometric_table(3, R=40)
    tau = 30
    fit = fit_decay(ds, tau=tau, weights=weights, alpha=0.1)

    table = ds.phi.values[:, tau:]
    n, L = table.shape
    mean = table.mean(axis=0)
    x = np.arange(L, dtype=float)
    w = n * mean**2 / table.var(axis=0, ddof=1) if weights == "wls" else np.ones(L)
    slope, intercept = np.polyfit(x, np.log(mean), 1, w=np.sqrt(w))
    assert fit.beta == pytest.approx(np.exp(slope), rel=1e-10)

    # Delta method: slope = a·log φ̄ with a the WLS slope row; its influence per sample is a·(φ_s/φ̄ − 1).
    X = np.column_stack([np.ones(L), x])
    a = np.linalg.solve(X.T @ (w[:, None] * X), X.T * w)[1]
    influence = (table / mean - 1) @ a
    correction = n / (n - 1) * (n * L - 1) / (n * L - 2)  # statsmodels' small-sample factor
    se = np.sqrt(correction * np.sum(influence**2)) / n
    half = stats.t.ppf(0.95, n - 1) * se
    np.testing.assert_allclose(fit.conf_int(), np.exp([slope - half, slope + half]), rtol=1e-10)

    band = fit.band([tau, tau + 5, 45])
    np.testing.assert_allclose(band["mean"], np.exp(intercept + slope * np.array([0, 5, 15])), rtol=1e-10)
    assert (band.lower < band["mean"]).all() and (band["mean"] < band.upper).all()


def test_clustered_covariance_is_statsmodels_cluster_sandwich():
    """The band's width at each lag is the t interval of x·params under the clustered covariance."""
    ds = noisy_geometric_table(4, R=30)
    fit = fit_decay(ds, tau=20, weights="ols")
    table = ds.phi.values[:, 20:]
    n, L = table.shape
    mean = table.mean(axis=0)
    pseudo = np.log(mean) + table / mean - 1
    X = np.tile(np.column_stack([np.ones(L), np.arange(L)]), (n, 1))
    reference = sm.OLS(pseudo.ravel(), X).fit(cov_type="cluster", cov_kwds={"groups": np.repeat(np.arange(n), L)})
    lags = np.array([20, 25, 29])
    design = np.column_stack([np.ones(3), lags - 20])
    se = np.sqrt(np.einsum("ij,jk,ik->i", design, reference.cov_params(), design))
    q = stats.t.ppf(0.975, n - 1)
    band = fit.band(lags)
    np.testing.assert_allclose(np.log(band.lower), design @ reference.params - q * se, rtol=1e-9)
    np.testing.assert_allclose(np.log(band.upper), design @ reference.params + q * se, rtol=1e-9)


@small_batch
@pytest.mark.parametrize("method", ["max", "anchored", "quantile"])
def test_max_type_interval_inverts_the_studentized_bootstrap(method):
    """Slopes, their delta-method errors, one resample's studentized deviations and the limits, from numpy."""
    ds = noisy_geometric_table(5, n=40, R=30)
    tau, B, seed, alpha = 22, 199, 3, 0.1
    fit = fit_decay(ds, method=method, tau=tau, n_boot=B, seed=seed)
    table = ds.phi.values[:, tau:]
    n, L = table.shape
    pairs = {"max": [(k, k + 1) for k in range(L - 1)], "anchored": [(0, k) for k in range(1, L)],
             "quantile": [(a, b) for a in range(L) for b in range(a + 1, L)]}[method]

    def slopes_and_se(rows):
        mean = rows.mean(axis=0)
        s = np.array([(np.log(mean[b]) - np.log(mean[a])) / (b - a) for a, b in pairs])
        se = np.array([np.sqrt(np.sum(((rows[:, b] / mean[b] - rows[:, a] / mean[a]) / (b - a)) ** 2)) / n
                       for a, b in pairs])
        return s, se

    s, se = slopes_and_se(table)
    np.testing.assert_allclose(fit.slopes, s, rtol=1e-12)
    np.testing.assert_allclose(fit.slope_se, se, rtol=1e-10)
    # The bootstrap resamples whole samples (rows) with replacement, drawn as default_rng(seed).integers.
    rows = np.random.default_rng(seed).integers(0, n, (B, n))
    for b in (0, 57, B - 1):
        s_b, se_b = slopes_and_se(table[rows[b]])
        np.testing.assert_allclose(fit.boot_t[b], (s_b - s) / se_b, rtol=1e-8)

    T = fit.boot_t
    m = len(pairs) if method != "quantile" else int(np.ceil(0.95 * len(pairs)))
    kth = lambda values: np.sort(values, axis=-1)[..., m - 1]  # noqa: E731
    low_t = np.sort(T, axis=0)[int(np.ceil(alpha / 2 * B)) - 1]  # each slope's α/2 bootstrap-t point
    miss_above = np.mean(kth(T - low_t) < 0)
    c = np.sort(kth(T))[int(np.ceil((1 - alpha + miss_above) * B)) - 1]
    np.testing.assert_allclose(fit.conf_int(alpha), np.exp([kth(s - c * se), kth(s - low_t * se)]), rtol=1e-12)


def test_zero_norms_are_left_out_of_the_log_fit():
    table = noisy_geometric_table(6, R=20).phi.values
    table[:, 15:] = 0.0  # the norm vanishes past lag 14
    ds = table_dataset(table)

    vanished = fit_decay(ds)  # default tau = 18: nothing left to decay
    assert vanished.beta == 0.0 and vanished.decays and vanished.reliable
    np.testing.assert_array_equal(vanished.conf_int(), [0.0, 0.0])

    mixed = fit_decay(ds, tau=10)  # lags 10..14 positive, 15..19 zero
    positive_only = fit_decay(table_dataset(table[:, :15]), tau=10)
    assert mixed.beta == pytest.approx(positive_only.beta, rel=1e-12)
    np.testing.assert_allclose(mixed.conf_int(), positive_only.conf_int(), rtol=1e-12)
    np.testing.assert_array_equal(mixed.fit_lags, np.arange(10, 15))
    assert fit_decay(ds, tau=10, method="max", n_boot=50).beta == pytest.approx(
        fit_decay(table_dataset(table[:, :15]), tau=10, method="max", n_boot=50).beta, rel=1e-12)


# --- results object ----------------------------------------------------------


def test_results_object_summary_attrs_and_default_tau():
    ds = noisy_geometric_table(7, R=50)
    fit = fit_decay(ds)
    assert fit.tau == 45 and fit.tau_rule == "default 0.9R"
    lower, upper = fit.conf_int()
    assert lower < fit.beta < upper
    np.testing.assert_array_equal(fit.conf_int(alpha=0.05), [lower, upper])  # the fit's level is 0.95
    narrow = fit.conf_int(alpha=0.5)
    assert lower < narrow[0] < fit.beta < narrow[1] < upper
    attrs = fit.to_attrs()
    assert all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in attrs.values())
    assert attrs["beta"] == fit.beta and attrs["decays"] == int(upper < 1)
    assert (attrs["beta_lower"], attrs["beta_upper"]) == (lower, upper) and attrs["level"] == 0.95
    assert attrs["reliable"] == 1 and attrs["heavy_lags"] == "" and attrs["heavy_tail_limit"] == HEAVY_TAIL_LIMIT
    text = str(fit.summary())
    assert all(f"{value:.6g}" in text for value in (fit.beta, lower, upper))
    assert "wls" in text and "45 (default 0.9R)" in text and "interval reliable" in text
    assert "Warning" not in text


def test_conf_int_takes_alpha_and_still_takes_level_with_a_warning():
    fit = fit_decay(noisy_geometric_table(9, R=30), method="anchored", n_boot=200)
    with pytest.warns(DeprecationWarning, match="alpha = 1 - level"):
        old = fit.conf_int(level=0.9)
    np.testing.assert_array_equal(old, fit.conf_int(alpha=0.1))
    with pytest.warns(DeprecationWarning):
        band = fit.band([27, 29], level=0.9)
    xr.testing.assert_identical(band, fit.band([27, 29], alpha=0.1))
    assert band.attrs["level"] == pytest.approx(0.9)
    with pytest.raises(InputError, match="not both"):
        fit.conf_int(0.1, level=0.9)
    with pytest.raises(InputError, match="alpha must be"):
        fit.conf_int(1.5)


@small_batch
def test_plot_decay_draws_the_mean_fit_and_tau():
    ds = noisy_geometric_table(8, n=16, R=30)
    fit = fit_decay(ds)
    fig = report.plot_decay(ds, fit)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["mean phi"].get_ydata(), ds.phi.mean("sample"))
    fitted = next(line for label, line in lines.items() if label.startswith("regression fit"))
    np.testing.assert_allclose(fitted.get_ydata(), fit.band(np.arange(fit.tau, 30))["mean"])
    assert lines[f"τ = {fit.tau}"].get_xdata()[0] == fit.tau
    assert len(ax.get_lines()) == 16 + 3  # per-sample lines, mean, fit, tau


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"norm": "grad"}, "unknown norm"),
        ({"norm": "psi"}, "psi=True"),
        ({"method": "ols"}, "unknown method"),
        ({"weights": "gls"}, "unknown weights"),
        ({"tau": -1}, "outside the window"),
        ({"tau": 19}, "outside the window"),
        ({"tau": 2.5}, "tau must be"),
        ({"tau": "late"}, "tau must be"),
        ({"level": 1.5}, "level must be"),
        ({"method": "quantile", "q": 1.0}, "q must be"),
        ({"method": "max", "n_boot": 0}, "n_boot must be"),
        ({"method": "quantile", "tau": 0, "n_boot": 10**6}, "shorter window"),
    ],
)
@pytest.mark.filterwarnings("ignore:level= is deprecated:DeprecationWarning")
def test_bad_input_says_what_to_fix(kwargs, message):
    with pytest.raises(InputError, match=message):
        fit_decay(noisy_geometric_table(0, R=20), **kwargs)
