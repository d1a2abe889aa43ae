"""fit_decay against systems whose decay rate is known in closed form."""
import numpy as np
import pytest
import statsmodels.api as sm
import torch
import xarray as xr
from scipy import stats
from torch import nn

import biaskit
from biaskit import report
from biaskit.decay import fit_decay
from biaskit.errors import InputError
from helpers import LinearCell


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


def table_dataset(table):
    return xr.Dataset({"phi": (("sample", "lag"), np.asarray(table, dtype=np.float64))})


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
    assert fit.decays


def test_unstable_resetting_rnn_decays_in_expectation_not_uniformly():
    """Gains 1.5 (keep) or 0.3 (reset) with probability 1/2 each: E a = 0.9 < 1 < 1.5.

    The loss is linear in h (L = w·h_s, target 1), so ∂L/∂h_s = w for every
    sample and φ_{s,k} = |w| · Π of the last k gains: it grows along every
    path without a reset, yet E φ_k = |w| 0.9^k.
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

    fit = fit_decay(ds, tau=0)
    assert fit.beta < 1
    assert fit.decays


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


@pytest.mark.parametrize(
    "kwargs", [{}, {"weights": "ols"}, {"method": "max"}, {"method": "anchored"}, {"method": "quantile"}]
)
def test_interval_covers_true_beta_in_at_least_90_percent_of_50_seeds(kwargs):
    """The truth is E φ_k ∝ 0.9^k by construction of the table (see noisy_geometric_table)."""
    beta = 0.9
    covered = 0
    for seed in range(50):
        lower, upper = fit_decay(noisy_geometric_table(seed, beta), **kwargs).conf_int(alpha=0.05)
        covered += lower <= beta <= upper
    assert covered >= 45


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


def test_eq_22_regression_is_the_printed_sum_over_pairs():
    """Eq. 22: log β̃ = Σ_{k,k'} (log φ̄_k − log φ̄_k')(k − k') / Σ_{k,k'} (k − k')², over the window."""
    ds = noisy_geometric_table(2, R=40)
    tau = 25
    log_mean = np.log(ds.phi.values.mean(axis=0))[tau:]
    k = np.arange(log_mean.size)
    printed = np.sum(np.subtract.outer(log_mean, log_mean) * np.subtract.outer(k, k)) / np.sum(
        np.subtract.outer(k, k) ** 2)
    assert fit_decay(ds, tau=tau, weights="ols").beta == pytest.approx(np.exp(printed), rel=1e-10)


@pytest.mark.parametrize("weights", ["wls", "ols"])
def test_regression_matches_numpy_slope_and_delta_method_interval(weights):
    ds = noisy_geometric_table(3, R=40)
    tau = 30
    fit = fit_decay(ds, tau=tau, weights=weights, level=0.9)

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
    assert vanished.beta == 0.0 and vanished.decays
    np.testing.assert_array_equal(vanished.conf_int(), [0.0, 0.0])

    mixed = fit_decay(ds, tau=10)  # lags 10..14 positive, 15..19 zero
    positive_only = fit_decay(table_dataset(table[:, :15]), tau=10)
    assert mixed.beta == pytest.approx(positive_only.beta, rel=1e-12)
    np.testing.assert_allclose(mixed.conf_int(), positive_only.conf_int(), rtol=1e-12)
    np.testing.assert_array_equal(mixed.fit_lags, np.arange(10, 15))
    with pytest.raises(InputError, match="zero at lag"):
        fit_decay(ds, tau=10, method="max")


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
    text = str(fit.summary())
    assert f"{fit.beta:.6g}" in text and "wls" in text and "45" in text


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
def test_bad_input_says_what_to_fix(kwargs, message):
    with pytest.raises(InputError, match=message):
        fit_decay(noisy_geometric_table(0, R=20), **kwargs)
