"""fit_decay on windows whose mean norm is exactly zero at some lags past τ but not all (float32
underflow with denormals flushed, a nilpotent recurrence): every estimator against the printed
equations evaluated on the lags with a positive mean, and the trainer's controller on such a model."""

import math

import numpy as np
import pytest
import torch
import xarray as xr
from test_adaptive import ConstantModel, LinearModel

from biaskit.decay import default_tau, fit_decay
from biaskit.errors import InputError
from trainers.adaptive import Controller


def collapsed_table(seed=0, n=48, R=30, collapse=22, beta=0.85, dtype=np.float64):
    """φ_{s,k} = β^k c_s ε_{s,k} (log-normal ε), exactly 0 from lag ``collapse`` on in every sample."""
    rng = np.random.default_rng(seed)
    table = beta ** np.arange(R) * rng.uniform(0.5, 1.5, (n, 1)) * rng.lognormal(-0.045, 0.3, (n, R))
    table[:, collapse:] = 0.0
    return table.astype(dtype)


def dataset(table):
    return xr.Dataset({"phi": (("sample", "lag"), table)})


def pair_slopes(log_mean, lags):
    """(ℓ_k' − ℓ_k)/(k' − k) for every pair of the given lags, k < k', by a double loop."""
    return np.array([(log_mean[b] - log_mean[a]) / (lags[b] - lags[a])
                     for a in range(lags.size) for b in range(a + 1, lags.size)])


@pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_estimator_is_its_printed_equation_on_the_positive_lags(dtype):
    """τ = 14, R = 30, zeros from lag 22: Eq. 21, the anchored max, the quantile and Eq. 22 on lags 14..21."""
    table = collapsed_table(dtype=dtype)
    ds, tau = dataset(table), 14
    mean = table.astype(np.float64).mean(axis=0)
    lags = np.arange(tau, 22)
    log_mean = np.log(mean[lags])
    slopes = pair_slopes(log_mean, lags)

    fits = {m: fit_decay(ds, method=m, tau=tau, n_boot=200) for m in ("max", "anchored", "quantile")}
    assert fits["max"].beta == pytest.approx(np.exp(slopes.max()), rel=1e-12)  # Eq. 21
    anchored = (log_mean[1:] - log_mean[0]) / (lags[1:] - tau)
    assert fits["anchored"].beta == pytest.approx(np.exp(anchored.max()), rel=1e-12)
    assert fits["quantile"].beta == pytest.approx(np.exp(np.quantile(slopes, 0.95)), rel=1e-12)
    k = lags - tau
    eq22 = np.sum(np.subtract.outer(log_mean, log_mean) * np.subtract.outer(k, k)) / np.sum(
        np.subtract.outer(k, k) ** 2)
    regression = fit_decay(ds, tau=tau, weights="ols")
    assert regression.beta == pytest.approx(np.exp(eq22), rel=1e-9)

    # The same fits, intervals included, as on the table cut at the collapse (same bootstrap draws).
    cut = dataset(table[:, :22])
    for method, fit in fits.items():
        np.testing.assert_array_equal(fit.fit_lags, lags)
        same = fit_decay(cut, method=method, tau=tau, n_boot=200)
        np.testing.assert_allclose(fit.conf_int(), same.conf_int(), rtol=1e-12)
        low, high = fit.conf_int()
        assert 0 < low <= fit.beta <= high
    np.testing.assert_allclose(regression.conf_int(), fit_decay(cut, tau=tau, weights="ols").conf_int(),
                               rtol=1e-10)


@pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")
def test_vanished_past_tau_is_beta_zero_for_every_method():
    table = collapsed_table(collapse=22)
    for method in ("regression", "max", "anchored", "quantile"):
        fit = fit_decay(dataset(table), method=method, tau=21)  # lag 21 positive, 22..29 zero
        assert fit.method == "vanished" and fit.beta == 0.0
        np.testing.assert_array_equal(fit.conf_int(), [0.0, 0.0])


@pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")
def test_a_restart_from_zero_is_refused_by_the_max_type_and_left_out_by_the_regression():
    table = collapsed_table(collapse=30)
    table[:, 18] = 0.0  # zero at lag 18, positive again at 19
    ds = dataset(table)
    for method in ("max", "anchored", "quantile"):
        with pytest.raises(InputError, match="zero at lag 18 but positive at lag 19.*tau past lag 18"):
            fit_decay(ds, method=method, tau=14, n_boot=50)
    lags = np.array([14, 15, 16, 17, *range(19, 30)])
    log_mean = np.log(table.mean(axis=0)[lags])
    slope = np.polyfit(lags, log_mean, 1)[0]  # Eq. 22 is the OLS slope
    assert fit_decay(ds, tau=14, weights="ols").beta == pytest.approx(np.exp(slope), rel=1e-9)
    assert fit_decay(ds, method="max", tau=19, n_boot=50).beta == pytest.approx(
        np.exp(pair_slopes(np.log(table.mean(axis=0)[19:]), np.arange(19, 30)).max()), rel=1e-12)


@pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")
def test_auto_tau_tests_the_window_up_to_the_collapse():
    """A kink (steep decay over lags 0..5) before geometric decay, then a collapse at 22: τ="auto"
    picks the τ it picks on the table cut at the collapse, and the fit is the same."""
    table = collapsed_table(seed=3, n=64, collapse=22)
    table[:, :6] *= np.exp(1.2 * (6 - np.arange(6)))
    full = fit_decay(dataset(table), tau="auto", weights="ols")
    cut = fit_decay(dataset(table[:, :22]), tau="auto", weights="ols")
    assert 0 < full.tau == cut.tau < 20 and full.tau_rule.startswith("auto: first log-linear")
    assert full.beta == pytest.approx(cut.beta, rel=1e-10)
    for method in ("max", "quantile"):
        assert fit_decay(dataset(table), method=method, tau="auto", n_boot=50).beta == pytest.approx(
            fit_decay(dataset(table[:, :22]), method=method, tau="auto", n_boot=50).beta, rel=1e-12)


class NilpotentModel(LinearModel):
    """W = c·S with S the down-shift (S e_i = e_{i+1}), so (Wᵀ)^k w = c^k (w_k, …, w_{n−1}, 0, …):
    φ_{s,k} = |∂ℓ_s/∂out| · c^k ‖w_{k:}‖ with w the readout's weights, exactly 0 from lag n on."""

    def __init__(self, c=0.8, n=8):
        super().__init__(1.0, n=n)
        with torch.no_grad():
            self.cell.W.copy_(c * torch.diag(torch.ones(n - 1, dtype=torch.float64), -1))


@pytest.mark.parametrize("method", ["max", "quantile", "regression"])
def test_the_controller_fits_a_model_whose_norm_collapses_inside_the_window(method):
    """Window 12, τ = 5, zeros from lag 8: the paper controller's β is the closed form on lags 5..7
    (before, max and quantile raised and the record said "no fit")."""
    torch.manual_seed(0)
    model, c = NilpotentModel(), 0.8
    inputs, targets = torch.randn(600, 2, dtype=torch.float64), torch.randn(600, dtype=torch.float64)
    record = Controller(delta=0.1, window=12, windows=16, K_min=1, K_max=11, controller="paper", groups=4,
                        tau=5, beta_method=method).measure(model, inputs, targets, 3, torch.Generator().manual_seed(0))
    w = model.head.weight.detach()[0].numpy()
    log_norm = np.array([k * math.log(c) + 0.5 * math.log(np.sum(w[k:] ** 2)) for k in (5, 6, 7)])
    slopes = pair_slopes(log_norm, np.array([5, 6, 7]))
    want = {"max": slopes.max(), "quantile": np.quantile(slopes, 0.95),
            "regression": np.polyfit([5, 6, 7], log_norm, 1)[0]}[method]
    assert record.K_rule != "no fit" and record.kappa_hat is not None
    assert record.beta == pytest.approx(math.exp(want), rel=1e-9)


def sparse_tail(ds):
    """``ds`` with its groups' contributions exactly 0 at every lag of [τ, R) but the last (float32
    underflow at some lags, not all): one positive lag, too few to fit the tail's decay."""
    tau = default_tau(ds.sizes["lag"])
    contribution = ds["group_contribution"].copy()
    contribution[{"lag": slice(tau, -1)}] = 0.0
    return ds.assign(group_contribution=contribution)


def test_the_exact_controller_survives_a_tail_too_sparse_to_fit(monkeypatch):
    """Window 10 (τ = 8), the contributions 0 at lag 8 and positive at 9: the fit of the tail past the
    window cannot be made, so that tail is unbounded, every limit infinite, the reason is said, and the
    controller goes on (before, the fit's InputError stopped the training run)."""
    import biaskit
    from biaskit.bias import not_reached
    from biaskit.probe import probing

    torch.manual_seed(0)
    model = ConstantModel()
    inputs, targets = torch.ones(400, 1, dtype=torch.float64), torch.full((400,), 3.0, dtype=torch.float64)
    with probing(model, inputs, targets, length=10, count=16, generator=torch.Generator().manual_seed(0)) as probe:
        ds = sparse_tail(biaskit.decompose(probe.system, probe.inputs, probe.targets, start=probe.start, groups=4))
    table = ds["group_contribution"].transpose("group", "lag").values
    with pytest.raises(InputError, match="only 1 lag"):  # the fit the exact limit needs
        fit_decay(xr.Dataset({"psi": (("sample", "lag"), table)}), norm="psi", tau=8, weights="ols")
    exact = biaskit.exact_kappa(ds, [0.5], alpha=0.1)
    assert math.isinf(float(exact["beyond_window"])) and math.isnan(exact.attrs["tail_fit_beta"])
    assert int(exact["gradient_resolved"]) and np.isinf(exact["rel_bias_upper"].values).all()
    assert "too few of its last lags have a positive mean" in not_reached(exact, 0.5, 16)["why"]
    decompose = biaskit.decompose
    monkeypatch.setattr(biaskit, "decompose", lambda *args, **kwargs: sparse_tail(decompose(*args, **kwargs)))
    record = Controller(delta=0.5, window=10, windows=16, K_min=1, K_max=9, groups=4).measure(
        model, inputs, targets, 3, torch.Generator().manual_seed(0))
    assert math.isinf(record.rel_bias_exact_upper) and record.gradient_resolved == 1
    assert record.K == 6 and record.K_rule == "none below delta"  # grows by the rate limit, 2×
