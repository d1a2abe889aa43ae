"""bias_bound and calibration against closed forms and direct evaluation of Eq. 23-25."""
import math

import numpy as np
import pytest
import torch
import xarray as xr
from helpers import LinearCell
from torch import nn

import biaskit
from biaskit import report
from biaskit.bias import abs_bound, bias_bound, calibration, rel_bound
from biaskit.decay import fit_decay
from biaskit.errors import InputError

# The bounds are checked against their formulas whatever the fit's reliability; test_decay tests the flag.
pytestmark = pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")


def nilpotent_rnn(k=4, features=3, batch=16, R=20, seed=0):
    """W is the k×k shift matrix, W^k = 0: nothing before lag k reaches the loss."""
    g = torch.Generator().manual_seed(seed)
    W = torch.diag(torch.ones(k - 1, dtype=torch.float64), diagonal=1)
    cell = LinearCell(W, torch.randn(k, features, generator=g, dtype=torch.float64))
    system = biaskit.wrap(cell, nn.Linear(k, 2).double(), nn.CrossEntropyLoss(reduction="none"))
    x = torch.randn(batch, R, features, generator=g, dtype=torch.float64)
    return biaskit.decompose(system, x, torch.randint(0, 2, (batch,), generator=g), psi=False)


@pytest.fixture(scope="module")
def nilpotent_ds():
    return nilpotent_rnn(4)


@pytest.fixture(scope="module")
def lstm_ds():
    torch.manual_seed(0)
    system = biaskit.wrap(
        nn.LSTM(3, 8, 1, batch_first=True), nn.Linear(8, 2), nn.CrossEntropyLoss(reduction="none")
    )
    return biaskit.decompose(system, torch.randn(16, 40, 3), torch.randint(0, 2, (16,)), psi=False)


def table_dataset(table):
    return xr.Dataset({"phi": (("sample", "lag"), np.asarray(table, dtype=np.float64))})


def geometric_table(seed=0, beta=0.7, n=32, R=30):
    rng = np.random.default_rng(seed)
    return table_dataset(beta ** np.arange(R) * rng.lognormal(0, 0.4, (n, R)))


def direct_abs_bound(mean, beta, tau, K, horizon=2_000):
    """Σ_{k>K} of φ̄_k before τ and φ̄_τ β^{k−τ} from τ on, summed term by term (the proof's B.3–B.4, M̂ = 1)."""
    total = 0.0
    for k in range(K + 1, horizon):
        total += mean[k] if k < tau else mean[tau] * beta ** (k - tau)
    return total


def printed_abs_bound(mean, beta, tau, K):
    """Eq. 23 as printed, case by case (M̂ = 1)."""
    if K < tau:
        return sum(mean[K + 1: tau]) + mean[tau] / (1 - beta)
    return mean[tau] * beta ** (K - tau) / (1 - beta)


def direct_rel_bounds(mean, abs_values, denominator):
    """Eq. 24 for K = 0, 1, ... given Ê(K) (``abs_values``), with ||ĝ_k|| ≈ Σ_{j≤k} φ̄_j and the max over
    k ≤ K ("printed") or over every k < R ("all")."""
    R = len(mean)
    lowers = [sum(mean[: k + 1]) - abs_values[k] for k in range(R)]
    out = []
    for K, bound in enumerate(abs_values):
        lower = max(lowers[: (min(K, R - 1) if denominator == "printed" else R - 1) + 1])
        out.append(bound / lower if lower > 0 else math.inf)
    return out


ABS_FORMS = {"printed": printed_abs_bound, "proof": direct_abs_bound}


# --- closed-form systems -----------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"tau": "auto"}, {"method": "max"}])
def test_nilpotent_rnn_norm_vanishes_past_k_and_kappa_is_at_most_k(nilpotent_ds, kwargs):
    k, ds = 4, nilpotent_ds
    phi = ds.phi.values
    assert (phi[:, k:] == 0).all()
    assert (phi[:, :k].mean(axis=0) > 0).all()
    assert (ds.rel_bias.values[k - 1:] == 0).all()  # no lag past k-1 contributes

    fit = fit_decay(ds, **kwargs)
    assert fit.beta == 0.0 and fit.decays
    deltas = [0.5, 0.1, 1e-3, 1e-9]
    anchor = phi[:, fit.tau].mean()  # 0 at the default tau; the mean at lag 3 when tau="auto" stops there
    for tail in ("proof", "printed"):
        bound = bias_bound(ds, fit, deltas, tail=tail)
        assert (bound.kappa.values <= k).all()
        assert bound.kappa_reached.values.all()
        assert (bound.abs_bias_bound.sel(K=slice(k, None)) == 0).all()
        # At K = k-1 the proof's tail φ̄_τ β^{K+1−τ} is 0; the printed φ̄_τ β^{K−τ} is φ̄_τ (0^0 = 1) when τ = k-1.
        at_last = float(bound.abs_bias_bound.sel(K=k - 1))
        assert at_last == pytest.approx(anchor if tail == "printed" and fit.tau == k - 1 else 0.0, rel=1e-12, abs=0)


def test_calibration_holds_at_ties_where_bound_and_exact_bias_are_both_zero(nilpotent_ds):
    """Past lag k-1 the nilpotent RNN's exact bias is 0 and so is the bound: a tie holds (≥, not >)."""
    ds = nilpotent_ds
    bound = bias_bound(ds, fit_decay(ds), [0.1])
    cal = calibration(ds, bound)
    ties = cal.sel(K=slice(3, None))
    assert ties.K.size == 17
    assert (ties.rel_bias == 0).all() and (ties.rel_bias_bound == 0).all()
    assert (ties.holds == 1).all()
    np.testing.assert_array_equal(cal.holds, (cal.rel_bias_bound.values >= cal.rel_bias.values).astype(np.int8))
    assert float(cal.fraction_holds) == 1.0
    assert np.isnan(ties.ratio).all()


# --- Eq. 23-25 against direct evaluation ------------------------------------


@pytest.mark.parametrize("tail", ["printed", "proof"])
@pytest.mark.parametrize("denominator", ["printed", "all"])
@pytest.mark.parametrize("tau", [0, 7, 28])
def test_bounds_match_direct_evaluation_of_eq_23_and_24(tau, tail, denominator):
    ds = geometric_table(1)
    fit = fit_decay(ds, tau=tau)
    mean = ds.phi.values.mean(axis=0)
    bound = bias_bound(ds, fit, [0.1], (0, 45), tail=tail, denominator=denominator)  # K ≥ 30: the tail extrapolates
    np.testing.assert_array_equal(bound.K, np.arange(46))

    abs_fn = ABS_FORMS[tail]
    expected_abs = [abs_fn(mean, fit.beta, tau, K) for K in range(46)]
    np.testing.assert_allclose(bound.abs_bias_bound, expected_abs, rtol=1e-10)
    np.testing.assert_allclose(bound.rel_bias_bound, direct_rel_bounds(mean, expected_abs, denominator), rtol=1e-10)
    assert bound.attrs["tau"] == tau and bound.attrs["beta"] == fit.beta
    assert bound.attrs["tail"] == tail and bound.attrs["denominator"] == denominator
    if tail == "proof" and denominator == "all":
        # the earlier behaviour, pinned as it was: ||g|| / M ≥ max over every K' < R of (Σ_{k≤K'} φ̄_k − Ê(K'))
        grad_lower = max(mean[: K + 1].sum() - expected_abs[K] for K in range(30))
        np.testing.assert_allclose(bound.rel_bias_bound, np.array(expected_abs) / grad_lower, rtol=1e-10)


def test_printed_tail_is_the_proofs_over_beta_past_tau_and_equal_before():
    mean = geometric_table(4).phi.values.mean(axis=0)
    K = np.arange(40)
    printed, proof = (abs_bound(mean, 0.7, 12, K, tail=t) for t in ("printed", "proof"))
    np.testing.assert_array_equal(printed[:12], proof[:12])
    np.testing.assert_allclose(proof[12:], 0.7 * printed[12:], rtol=1e-14)


def test_printed_denominator_is_at_most_the_all_lags_one_and_equal_from_R_minus_1():
    mean = geometric_table(5).phi.values.mean(axis=0)
    K = np.arange(45)
    printed, every = (rel_bound(mean, 0.7, 20, K, denominator=d) for d in ("printed", "all"))
    assert (printed >= every).all()  # a max over fewer k is smaller, so the bound is larger
    np.testing.assert_array_equal(printed[29:], every[29:])
    assert np.isinf(printed[0]) and np.isfinite(every[0])  # Σ_{k≤0} φ̄_k − Ê(0) < 0: no lower bound on ||g|| yet


@pytest.mark.parametrize("tail", ["printed", "proof"])
def test_abs_bound_keeps_relative_precision_over_thirty_orders_of_magnitude(tail):
    """φ̄_k from 1 down to 1e-30: Ê(K) against math.fsum of its terms, to 1e-12 relative, at every K."""
    R = 61
    mean = 10.0 ** (-30 * np.arange(R) / (R - 1))
    beta = 10.0 ** (-0.5)
    K = np.arange(R + 5)
    for tau in (1, 30, R - 2):
        got = abs_bound(mean, beta, tau, K, tail=tail)
        shift = 0 if tail == "printed" else 1
        for k in K:
            head = [mean[j] for j in range(k + 1, tau)]
            expected = math.fsum(head + [mean[tau] * beta ** max(k + shift - tau, 0) / (1 - beta)])
            assert got[k] == pytest.approx(expected, rel=1e-12, abs=0), (tau, k)
    # Through bias_bound too, on a table whose every sample is that mean.
    ds = table_dataset(np.tile(mean, (2, 1)))
    fit = fit_decay(ds, tau=R - 2)
    bound = bias_bound(ds, fit, [0.1], tail=tail)
    expected = [math.fsum([mean[j] for j in range(k + 1, R - 2)] + [
        mean[R - 2] * fit.beta ** max(k + (tail == "proof") - (R - 2), 0) / (1 - fit.beta)]) for k in range(R)]
    np.testing.assert_allclose(bound.abs_bias_bound, expected, rtol=1e-12)


def test_no_decay_means_no_finite_bound():
    table = 1.05 ** np.arange(20) * np.random.default_rng(2).lognormal(0, 0.1, (16, 20))
    ds = table_dataset(table)
    fit = fit_decay(ds, tau=0)
    assert fit.beta > 1 and not fit.decays
    bound = bias_bound(ds, fit, [0.1, 0.5], (5, 14))
    assert np.isinf(bound.abs_bias_bound).all() and np.isinf(bound.rel_bias_bound).all()
    np.testing.assert_array_equal(bound.kappa, [14, 14])  # clipped to the largest K in range
    np.testing.assert_array_equal(bound.kappa_reached, [0, 0])


def test_kappa_is_the_smallest_K_below_delta_and_monotone_in_delta():
    ds = geometric_table(3)
    fit = fit_decay(ds, tau=10)
    deltas = np.logspace(-12, -0.01, 60)
    K_range = np.arange(2, 40)
    bound = bias_bound(ds, fit, deltas, (2, 39))
    np.testing.assert_array_equal(bound.K, K_range)
    relative = bound.rel_bias_bound.values
    for delta, kappa, reached in zip(deltas, bound.kappa.values, bound.kappa_reached.values):
        below = [K for K, r in zip(K_range, relative) if r < delta]
        assert kappa == (below[0] if below else K_range[-1])
        assert reached == int(bool(below))
    assert (np.diff(bound.kappa.values) <= 0).all()  # a looser tolerance never needs a longer K
    assert not bound.kappa_reached.values[0]  # δ = 1e-12 is out of reach within K < 40


@pytest.mark.parametrize("denominator", ["printed", "all"])
def test_kappa_is_eq_25_of_the_direct_relative_bound(denominator):
    """κ̂(δ) = min{K_min ≤ K ≤ K_max : Δ̂(K) < δ}, K_max with kappa_reached = 0 when no K reaches δ."""
    ds = geometric_table(6)
    fit = fit_decay(ds, tau=12)
    mean = ds.phi.values.mean(axis=0)
    deltas = [0.5, 0.05, 1e-3, 1e-6, 1e-30]
    K_min, K_max = 3, 35
    bound = bias_bound(ds, fit, deltas, (K_min, K_max), denominator=denominator)
    relative = direct_rel_bounds(mean, [printed_abs_bound(mean, fit.beta, 12, K) for K in range(K_max + 1)],
                                 denominator)
    for delta, kappa, reached in zip(deltas, bound.kappa.values, bound.kappa_reached.values):
        below = [K for K in range(K_min, K_max + 1) if relative[K] < delta]
        assert (kappa, reached) == ((below[0], 1) if below else (K_max, 0))
    assert bound.kappa_reached.values[0] == 1 and bound.kappa_reached.values[-1] == 0


# --- calibration against the exact bias ----------------------------------------


def test_calibration_against_the_exact_relative_bias(lstm_ds):
    fit = fit_decay(lstm_ds)
    deltas = [0.5, 0.1, 0.01, 1e-4]
    bound = bias_bound(lstm_ds, fit, deltas, (0, 59))
    cal = calibration(lstm_ds, bound)

    np.testing.assert_array_equal(cal.K, np.arange(40))  # the exact bias exists only inside the window
    exact = lstm_ds.rel_bias.values
    estimate = bound.rel_bias_bound.values[:40]
    np.testing.assert_array_equal(cal.holds, estimate >= exact)
    assert float(cal.fraction_holds) == pytest.approx(np.mean(estimate >= exact))
    positive = exact > 0
    assert float(cal.median_ratio) == pytest.approx(np.median(estimate[positive] / exact[positive]))
    assert np.isnan(cal.ratio.values[~positive]).all()
    for delta, kappa_exact in zip(deltas, cal.kappa_exact.values):
        assert kappa_exact == min(K for K in range(40) if exact[K] < delta)
    np.testing.assert_array_equal(cal.kappa, bound.kappa)


def test_results_round_trip_through_netcdf(lstm_ds, tmp_path):
    fit = fit_decay(lstm_ds, method="max", tau="auto")
    bound = bias_bound(lstm_ds, fit, [0.1, 0.01])
    cal = calibration(lstm_ds, bound)
    for name, ds in [("bound", bound), ("calibration", cal)]:
        back = report.load(report.save(ds, tmp_path / f"{name}.nc"))
        xr.testing.assert_identical(back, ds)
        assert all(isinstance(v, (str, int, float, np.integer, np.floating)) for v in back.attrs.values())


def test_plot_bias_draws_exact_and_bound(lstm_ds):
    fit = fit_decay(lstm_ds)
    bound = bias_bound(lstm_ds, fit, [0.1, 0.01])
    fig = report.plot_bias(lstm_ds, bound)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["exact δ(K)"].get_ydata(), lstm_ds.rel_bias)
    np.testing.assert_allclose(lines["bound Δ̂(K)"].get_ydata(), bound.rel_bias_bound)


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "deltas, K_range, message",
    [
        ([0.1], (5, 2), "K_range \\(5, 2\\) is empty"),
        ([0.1], (-1, 2), "pair \\(K_min, K_max\\)"),
        ([0.1], (0.5, 2.0), "pair \\(K_min, K_max\\)"),
        ([0.1], [1, 2, 3], "pair \\(K_min, K_max\\)"),
        ([0.0], None, "in \\(0, 1\\)"),
        ([1.5], None, "in \\(0, 1\\)"),
        ([], None, "in \\(0, 1\\)"),
    ],
)
def test_bad_input_says_what_to_fix(deltas, K_range, message):
    ds = geometric_table()
    with pytest.raises(InputError, match=message):
        bias_bound(ds, fit_decay(ds), deltas, K_range)


@pytest.mark.parametrize("kwargs, message", [({"tail": "paper"}, "unknown tail"),
                                             ({"denominator": "max"}, "unknown denominator")])
def test_bad_option_says_what_to_use(kwargs, message):
    ds = geometric_table()
    with pytest.raises(InputError, match=message):
        bias_bound(ds, fit_decay(ds), [0.1], **kwargs)


def test_calibration_needs_the_exact_bias():
    ds = geometric_table()
    bound = bias_bound(ds, fit_decay(ds), [0.1])
    with pytest.raises(InputError, match="rel_bias"):
        calibration(ds, bound)


# --- exact_kappa: the exact bias with a confidence limit ----------------------------------------------


class ScalarLinear(nn.Module):
    """h_t = a h_{t-1} + u x_t: with every window the same, the bias is a sum written out below."""

    def __init__(self, a, u):
        super().__init__()
        self.a, self.u = nn.Parameter(torch.tensor([a], dtype=torch.float64)), \
            nn.Parameter(torch.tensor([u], dtype=torch.float64))

    def initial_state(self, batch):
        return torch.zeros(batch, 1, dtype=torch.float64)

    def forward(self, x, h):
        return self.a * h + self.u * x


def test_exact_kappa_on_a_linear_rnn_whose_bias_is_a_closed_sum():
    """Identical windows: no sampling noise, so the limit is the exact bias itself.

    With x_t = 1, h_t = u Σ_{j<t} a^j, the loss ½(w h_R − y)² has e = w h_R − y and the
    lag-k contribution e·w·a^k·(h_{R−k−1}, 1) to (a, u); the readout's gradient is e·(h_R, 1).
    """
    a, u, w, target, R, windows = 0.6, 0.8, 1.3, 5.0, 50, 12
    cell, head = ScalarLinear(a, u), nn.Linear(1, 1).double()
    with torch.no_grad():
        head.weight.fill_(w)
        head.bias.zero_()
    ds = biaskit.decompose(biaskit.wrap(cell, head, lambda o, t: 0.5 * (o[:, 0] - t) ** 2),
                           torch.ones(windows, R, 1, dtype=torch.float64),
                           torch.full((windows,), target, dtype=torch.float64), psi=False, groups=4)
    h = np.array([u * sum(a**j for j in range(t)) for t in range(R + 1)])  # h[t] after t steps
    e = w * h[R] - target
    lag = np.array([[e * w * a**k * h[R - k - 1], e * w * a**k] for k in range(R)])
    g = np.concatenate([lag.sum(0), [e * h[R], e]])
    closed = np.array([np.linalg.norm(lag[K + 1:].sum(0)) for K in range(R)]) / np.linalg.norm(g)
    np.testing.assert_allclose(ds["rel_bias"].values, closed, rtol=1e-9, atol=1e-15)
    deltas = [0.5, 0.1, 1e-3, 1e-6]
    ek = biaskit.exact_kappa(ds, deltas, K_range=(0, 70))
    assert int(ek["gradient_resolved"]) == 1
    np.testing.assert_allclose(ek["rel_bias_upper"].sel(K=slice(0, R - 1)).values, closed,
                               rtol=1e-6, atol=float(ek["beyond_window"]) + 1e-12)
    assert float(ek["beyond_window"]) < 1e-9  # a^50: nothing left past the window
    for delta, kappa in zip(deltas, ek["kappa"].values):
        assert kappa == next(K for K in range(R) if closed[K] + float(ek["beyond_window"]) < delta)
    assert ek["extrapolated"].sel(K=slice(R, None)).all() and not ek["extrapolated"].sel(K=slice(0, R - 1)).any()
    past = ek["rel_bias_upper"].sel(K=slice(R, None)).values
    assert (np.diff(past) < 0).all() and past[0] <= float(ek["beyond_window"]) * 1.0001


def _population_and_batches(loss, seed=1, N=4096, R=40, F=3, H=6):
    torch.manual_seed(0)
    gru = nn.GRU(F, H, batch_first=True).double()
    with torch.no_grad():
        gru.weight_hh_l0 *= 2
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, R, F, dtype=torch.float64, generator=gen)
    if loss == "strong":  # a common offset in the targets: the mean gradient stands out of the noise
        head, loss_fn, Y = nn.Linear(H, 1).double(), (lambda o, t: (o[:, 0] - t) ** 2), 3 + X[:, :8, 0].sum(1)
    else:  # labels from the inputs, an untrained model: the mean gradient is mostly noise in 64 windows
        head, loss_fn = nn.Linear(H, 2).double(), nn.CrossEntropyLoss(reduction="none")
        Y = (X[:, :8, 0].sum(1) > 0).long()
    system = biaskit.wrap(gru, head, loss_fn)
    population = biaskit.decompose(system, X, Y, psi=False, groups=3)["rel_bias"].values
    return system, X, Y, population, gen


def test_the_upper_limit_covers_the_population_bias_at_its_level():
    """4,096 windows stand in for the population; 120 batches of 64 windows each give a limit at 80%
    and at 95%. The window is long enough (40 steps) for the tail past it to be negligible."""
    system, X, Y, population, gen = _population_and_batches("strong")
    Ks, n = [1, 3], 120
    assert all(0.1 < population[K] < 0.9 for K in Ks)
    covered = {0.8: np.zeros(len(Ks)), 0.95: np.zeros(len(Ks))}
    eye = torch.eye(6, dtype=torch.float64)
    for _ in range(n):
        pick = torch.randperm(X.shape[0], generator=gen)[:64]
        ds = biaskit.decompose(system, X[pick], Y[pick], psi=False, metric=eye)
        for level in covered:
            limit = biaskit.exact_kappa(ds, [0.5], alpha=1 - level)["rel_bias_upper"].sel(K=Ks).values
            covered[level] += limit >= population[Ks]
    for level, count in covered.items():
        margin = 3 * np.sqrt(level * (1 - level) / n)
        assert (np.abs(count / n - level) <= margin).all(), (level, count / n)


def test_an_unresolved_mean_gradient_certifies_nothing():
    system, X, Y, population, gen = _population_and_batches("weak")
    eye = torch.eye(6, dtype=torch.float64)
    covered, unresolved = 0, 0
    for _ in range(40):
        pick = torch.randperm(X.shape[0], generator=gen)[:64]
        ek = biaskit.exact_kappa(biaskit.decompose(system, X[pick], Y[pick], psi=False, metric=eye), [0.5])
        unresolved += int(ek["gradient_resolved"]) == 0
        covered += int(ek["rel_bias_upper"].sel(K=2) >= population[2])
        if int(ek["gradient_resolved"]) == 0:
            assert np.isinf(ek["rel_bias_upper"].values).all() and not ek["kappa_reached"].any()
    assert unresolved >= 30 and covered >= 38


def test_an_unresolved_mean_gradient_certifies_no_K_past_the_window_even_where_the_fit_says_zero():
    """Old lags whose contributions underflow to exactly 0 make the fitted tail past the window 0;
    while the mean gradient is not resolved, that must not certify a K ≥ R (it did: 0 / 0 taken as 0)."""
    system, X, Y, _, gen = _population_and_batches("weak")
    pick = torch.randperm(X.shape[0], generator=gen)[:64]
    ds = biaskit.decompose(system, X[pick], Y[pick], psi=False, metric=False)
    R = ds.sizes["K"]
    ds["group_contribution"][:, R // 2:] = 0.0  # every group's contribution past the middle underflowed
    ek = biaskit.exact_kappa(ds, [0.5], K_range=(0, R + 20))
    assert int(ek["gradient_resolved"]) == 0
    assert np.isinf(ek["rel_bias_upper"].values).all() and not ek["kappa_reached"].any()


def test_exact_kappa_refuses_what_it_cannot_use():
    ds = geometric_table()
    with pytest.raises(InputError, match="pass the output of biaskit.decompose"):
        biaskit.exact_kappa(ds, [0.5])
    system, X, Y, _, _ = _population_and_batches("strong", N=64)
    two = biaskit.decompose(system, X, Y, psi=False, groups=2)
    with pytest.raises(InputError, match="at least 3 groups"):
        biaskit.exact_kappa(two, [0.5])
    with pytest.raises(InputError, match="level must be"), \
            pytest.warns(DeprecationWarning, match="level= is deprecated"):
        biaskit.exact_kappa(biaskit.decompose(system, X, Y, psi=False), [0.5], level=1.0)
