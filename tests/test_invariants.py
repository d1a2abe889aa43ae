"""Invariants that kill mutants of benchmarks/mutants.py the other tests let through, each against an
independent computation: detach-based truncation with the modules' own forward passes, closed forms,
or a statistic recomputed from its definition on per-window gradients. Nothing here reads a
hard-coded result."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from helpers import final_output, make_module, naive_gradient
from scipy import optimize, stats
from test_adaptive import LinearModel
from torch import nn

import biaskit
from biaskit.decay import default_tau, fit_decay
from biaskit.decompose import GenericPath
from biaskit.fastpath import FastPath
from biaskit.synthetic import warm_up
from trainers.adaptive import Controller
from trainers.tasks.token_model import TokenLSTM

pytestmark = pytest.mark.filterwarnings("ignore::biaskit.decay.UnreliableFitWarning")


def chunks_of(steps: int, fast: bool = False):
    """The path (fast or generic) forced into chunks of ``steps`` steps (real windows run in many)."""
    return FastPath(steps=steps) if fast else GenericPath(steps=steps)


def flat(grads: dict, names) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in names])


# --- the running tails over several chunks ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LSTM", "LeakyCell"], ids=["fast", "generic"])
def test_tails_group_pieces_and_lag_contributions_over_several_chunks_match_naive_truncation(kind):
    """Chunks of two steps, so every tail carries earlier chunks: the total tail, each group's tail and
    its dot product with the total, each group's full gradient, and each lag's mean contribution
    against sums of detach-based truncated gradients of each group's windows."""
    torch.manual_seed(0)
    B, R, groups = 5, 7, 3
    module = make_module(kind, input_size=3, hidden=5, layers=2).double()
    head, loss_fn = nn.Linear(5, 3).double(), nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(B, R, 3, dtype=torch.float64), torch.randint(0, 3, (B,))
    system = biaskit.wrap(module, head, loss_fn)
    ds = biaskit.decompose(system, x, y, groups=groups, psi=False,
                           metric=torch.eye(system.layout.size, dtype=torch.float64),
                           _path=chunks_of(2, fast=kind == "LSTM"))
    members = [m.tolist() for m in torch.arange(B).tensor_split(groups)]
    names = list(naive_gradient(module, head, loss_fn, x, y))
    module_names = [n for n, _ in module.named_parameters()]

    def summed(rows, K=None, keep=names):  # Σ over the windows ``rows`` of the gradient of each one's loss
        return flat(naive_gradient(module, head, loss_fn, x[rows], y[rows], K), keep) * len(rows)

    everyone = list(range(B))
    full = summed(everyone)
    full_g = [summed(rows) for rows in members]
    for K in range(R):
        tail = full - summed(everyone, K)
        assert ds["abs_bias"].sel(K=K).item() == pytest.approx(float(tail.norm()) / B, rel=1e-8, abs=1e-15)
        for g, rows in enumerate(members):
            tail_g = full_g[g] - summed(rows, K)
            assert ds["group_tail_sq"].sel(K=K, group=g).item() == pytest.approx(
                float(tail_g @ tail_g) / B**2, rel=1e-8, abs=1e-16), (K, g)
            assert ds["group_tail_dot"].sel(K=K, group=g).item() == pytest.approx(
                float(tail_g @ tail) / B**2, rel=1e-8, abs=1e-16), (K, g)
    for g in range(groups):
        assert ds["group_grad_sq"].sel(group=g).item() == pytest.approx(float(full_g[g] @ full_g[g]) / B**2, rel=1e-9)
        assert ds["group_grad_dot"].sel(group=g).item() == pytest.approx(float(full_g[g] @ full) / B**2, rel=1e-9)
    previous = torch.zeros_like(summed(everyone, 0, module_names))
    for k in range(R):  # lag k's mean contribution is the mean of ĝ_k − ĝ_{k−1} over the module's parameters
        now = summed(everyone, k, module_names)
        assert ds["lag_contribution"].sel(lag=k).item() == pytest.approx(float((now - previous).norm()) / B,
                                                                         rel=1e-8, abs=1e-15), k
        previous = now


class Emitting(nn.Module):
    """forward(x, h) -> (output, new state), the output reading the incoming state and x through its
    own weights: the last step's output has a parameter partial of its own."""

    step_output = True

    def __init__(self, features=3, n=4):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(n, n) / 2), nn.Parameter(torch.randn(n, features))
        self.V = nn.Parameter(torch.randn(n, n + features) / 2)

    def initial_state(self, batch):
        return torch.zeros(batch, self.W.shape[0])

    def forward(self, x, h):
        return torch.tanh(torch.cat([h, x], dim=1) @ self.V.T), torch.tanh(h @ self.W.T + x @ self.U.T)


def test_an_output_step_over_several_chunks_counts_its_output_at_the_last_step():
    """The output's cotangent belongs to the last step, in the last chunk: every K against the cell run
    by hand with the state entering step R−1−K detached."""
    torch.manual_seed(0)
    B, R = 4, 7
    cell, head = Emitting().double(), nn.Linear(4, 2).double()
    x, y = torch.randn(B, R, 3, dtype=torch.float64), torch.randn(B, 2, dtype=torch.float64)

    def gradient(K=None):
        h, out = cell.initial_state(B).double(), None
        for t in range(R):
            if K is not None and t == R - 1 - K:
                h = h.detach()
            out, h = cell(x[:, t], h)
        loss = (head(out) - y).pow(2).sum(1).mean()
        params = [*cell.parameters(), *head.parameters()]
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # K = 0: the output alone reads W, U not
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])

    ds = biaskit.decompose(biaskit.wrap(cell, head, lambda o, t: (o - t).pow(2).sum(1)), x, y, psi=False,
                           metric=torch.eye(4, dtype=torch.float64), _path=chunks_of(2))
    full = gradient()
    assert ds.attrs["grad_norm"] == pytest.approx(float(full.norm()), rel=1e-10)
    for K in range(R):
        want = float((gradient(K) - full).norm() / full.norm())
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(want, rel=1e-8, abs=1e-13), K


def test_a_readout_tied_to_the_embedding_is_one_coordinate_of_the_gradient():
    """TokenLSTM with tied weights: the shared matrix is one parameter, its gradient the sum of what the
    embedding and the readout give it; every K against the model's own layers, detach-based."""
    torch.manual_seed(0)
    B, R = 5, 6
    model = TokenLSTM(vocab=6, embedding=4, hidden=4, layers=1, tie_weights=True).double()
    assert model.head.weight is model.embedding.weight
    tokens, y = torch.randint(0, 6, (B, R)), torch.randint(0, 6, (B,))
    loss_fn = nn.CrossEntropyLoss()

    def gradient(K=None):
        emb = model.embedding(tokens)
        split = 0 if K is None else R - 1 - K
        if split:
            _, (h, c) = model.lstm(emb[:, :split])
            out, _ = model.lstm(emb[:, split:], (h.detach(), c.detach()))
        else:
            out, _ = model.lstm(emb)
        grads = torch.autograd.grad(loss_fn(model.head(out[:, -1]), y), list(model.parameters()))
        return torch.cat([g.flatten() for g in grads])

    ds = biaskit.decompose(model.system(), tokens, y, psi=False, metric=torch.eye(8, dtype=torch.float64))
    full = gradient()
    assert ds.attrs["grad_norm"] == pytest.approx(float(full.norm()), rel=1e-10)
    assert ds.attrs["n_params"] == full.numel()  # the shared matrix counted once
    for K in range(R):
        want = float((gradient(K) - full).norm() / full.norm())
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(want, rel=1e-8, abs=1e-13), K


@pytest.mark.parametrize("tied", ["weight_hh_l0", "bias_ih_l0"])
def test_a_readout_tied_to_a_recurrent_weight_adds_to_its_coordinates(tied):
    """A readout whose weight (or bias) is the LSTM's own: the fast path keeps a layer's weights side by
    side in one block and must split them back so the readout's gradient lands on the right entries."""
    torch.manual_seed(0)
    B, R, H = 5, 6, 3
    lstm = nn.LSTM(2, H, batch_first=True).double()
    head = nn.Linear(H, 4 * H).double()
    setattr(head, "weight" if tied == "weight_hh_l0" else "bias", getattr(lstm, tied))
    x, y = torch.randn(B, R, 2, dtype=torch.float64), torch.randint(0, 4 * H, (B,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    ds = biaskit.decompose(biaskit.wrap(lstm, head, loss_fn), x, y, psi=False, metric=False)
    assert ds.attrs["path"].startswith("fast")

    unique = list({id(p): p for p in [*lstm.parameters(), *head.parameters()]}.values())  # the tie once

    def flat_gradient(K=None):
        out = final_output(lstm, x, None if K is None else R - 1 - K)
        grads = torch.autograd.grad(loss_fn(head(out), y).mean(), unique)
        return torch.cat([g.flatten() for g in grads])

    full = flat_gradient()
    assert ds.attrs["grad_norm"] == pytest.approx(float(full.norm()), rel=1e-10)
    for K in range(R):
        want = float((flat_gradient(K) - full).norm() / full.norm())
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(want, rel=1e-8, abs=1e-13), K


def test_an_rnn_whose_weights_are_tied_to_each_other_leaves_the_fast_path_and_is_measured_right():
    """nn.RNN with W_hh the same tensor as W_ih (input size = hidden): module.parameters() lists it once,
    so the fast path, which names each weight, must not take it; every K against detach-based truncation."""
    torch.manual_seed(0)
    B, R, H = 5, 7, 3
    rnn, head = nn.RNN(H, H, batch_first=True).double(), nn.Linear(H, 2).double()
    rnn.weight_hh_l0 = rnn.weight_ih_l0
    x, y = torch.randn(B, R, H, dtype=torch.float64), torch.randint(0, 2, (B,))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    ds = biaskit.decompose(biaskit.wrap(rnn, head, loss_fn), x, y, psi=False, metric=torch.eye(H, dtype=torch.float64))
    assert not ds.attrs["path"].startswith("fast")

    def flat_gradient(K=None):
        grads = naive_gradient(rnn, head, loss_fn, x, y, K)
        return torch.cat([g.flatten() for g in grads.values()])

    full = flat_gradient()
    assert ds.attrs["n_params"] == full.numel() == H * H + 2 * H + 2 * H + 2
    for K in range(R):
        want = float((flat_gradient(K) - full).norm() / full.norm())
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(want, rel=1e-8, abs=1e-13), K


def test_a_step_with_no_trainable_parameter_and_meaningless_metric_sizes_are_refused():
    torch.manual_seed(0)
    rnn, head = nn.RNN(2, 3, batch_first=True), nn.Linear(3, 2)
    x, y = torch.randn(4, 5, 2), torch.randint(0, 2, (4,))
    frozen_rnn = nn.RNN(2, 3, batch_first=True).requires_grad_(False)
    frozen = biaskit.wrap(frozen_rnn, head, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(biaskit.InputError, match="no trainable parameters"):
        biaskit.decompose(frozen, x, y)
    system = biaskit.wrap(rnn, head, nn.CrossEntropyLoss(reduction="none"))
    for bad in ({"probes": 0}, {"metric_rows": 0}, {"probes": -1}, {"metric_rows": 2.5}):
        with pytest.raises(biaskit.InputError, match="positive whole number"):
            biaskit.decompose(system, x, y, **bad)


# --- exact_kappa: the statistic from its definition ---------------------------------------------------------


def _u_statistic(sums: np.ndarray, sizes: np.ndarray) -> float:
    """Σ_{g≠h} <S_g, S_h> / Σ_{g≠h} n_g n_h for group sums S_g of n_g windows: unbiased for ||E X||²."""
    gram = sums @ sums.T
    return (gram.sum() - np.trace(gram)) / (sizes.sum() ** 2 - (sizes**2).sum())


def _jackknife(sums_a, sums_b, sizes):
    """Delete-one-group jackknife (co)variances of the U-statistics of two per-group sums."""
    G = sizes.size
    keep = [np.arange(G) != g for g in range(G)]
    a_out = np.array([_u_statistic(sums_a[m], sizes[m]) for m in keep])
    b_out = np.array([_u_statistic(sums_b[m], sizes[m]) for m in keep])
    da, db = a_out - a_out.mean(), b_out - b_out.mean()
    return (G - 1) / G * (da @ da), (G - 1) / G * (da @ db), (G - 1) / G * (db @ db)


def _fieller_upper(a, b, v_aa, v_ab, v_bb, t) -> float:
    """The largest x with a − x·b ≥ −t·sd(a − x·b), found by root bracketing (b resolved)."""
    def margin(x):
        return a - x * b + t * np.sqrt(max(v_aa - 2 * x * v_ab + x * x * v_bb, 0.0))

    low = a / b
    high = abs(low) + 1.0
    while margin(high) >= 0:
        high *= 2
    return optimize.brentq(margin, low, high, xtol=1e-15, rtol=1e-13)


def test_exact_kappa_is_fieller_on_a_delete_one_group_jackknife_of_u_statistics():
    """Noisy windows in four groups of unequal size (3, 3, 3, 2). Inside the window the upper limit,
    less the beyond-window term, is Fieller's limit of a/b computed here from per-window
    detach-based gradients: U-statistics over the groups' sums, their jackknife by actually deleting
    each group, the limit by bracketing its root, with t at G−1 degrees of freedom. The beyond-window
    term is the decay fit's band at the last lag R−1 carried on geometrically at the upper limit of
    β, summed term by term from lag R, over the lower limit sqrt(b − t·sd(b)) of ||E g||; past the
    window (K ≥ R) the same sum from lag K+1."""
    torch.manual_seed(0)
    B, R, G, level = 11, 6, 4, 0.9
    gru, head = nn.GRU(3, 4, batch_first=True).double(), nn.Linear(4, 1).double()

    def loss_fn(o, t):
        return (o[:, 0] - t) ** 2

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(B, R, 3, dtype=torch.float64, generator=gen)
    y = 5 + x[:, :3, 0].sum(1)  # an offset: the mean gradient stands out of the noise
    ds = biaskit.decompose(biaskit.wrap(gru, head, loss_fn), x, y, groups=G, psi=False,
                           metric=torch.eye(4, dtype=torch.float64))
    ek = biaskit.exact_kappa(ds, [0.5], alpha=1 - level, K_range=(0, R + 6))
    names = list(naive_gradient(gru, head, loss_fn, x[:1], y[:1]))

    def window(s, K=None):
        return flat(naive_gradient(gru, head, loss_fn, x[s:s + 1], y[s:s + 1], K), names).numpy()

    members = [m.tolist() for m in torch.arange(B).tensor_split(G)]
    sizes = np.array([len(m) for m in members], dtype=np.float64)
    full = [window(s) for s in range(B)]
    grad_sums = np.stack([sum(full[s] for s in rows) for rows in members])
    b = _u_statistic(grad_sums, sizes)
    t = stats.t.ppf(level, G - 1)
    _, _, v_bb = _jackknife(grad_sums, grad_sums, sizes)
    assert b > t * np.sqrt(v_bb) and int(ek["gradient_resolved"]) == 1  # the premise: a finite limit
    grad_low = np.sqrt(b - t * np.sqrt(v_bb))

    groups_table = xr.Dataset({"psi": (("sample", "lag"), ds["group_contribution"].transpose("group", "lag").values)})
    fit = fit_decay(groups_table, norm="psi", tau=default_tau(R), weights="ols", alpha=1 - level)
    alpha = 2 * (1 - level)  # the two-sided band whose upper end is the one-sided limit
    last = float(fit.band([R - 1], alpha)["upper"][0])
    beta_upper = fit.conf_int(alpha)[1]
    assert 0 < fit.beta < 1 and beta_upper < 1

    def past(K, rate):  # Σ_{k>K} last · rate^(k−(R−1)), term by term
        return sum(last * rate ** (k - (R - 1)) for k in range(K + 1, K + 4000)) / grad_low

    beyond = past(R - 1, beta_upper)  # at β's upper limit, inside the window as past it
    assert float(ek["beyond_window"]) == pytest.approx(beyond, rel=1e-9)
    for K in range(R - 1):
        tails = [full[s] - window(s, K) for s in range(B)]
        tail_sums = np.stack([sum(tails[s] for s in rows) for rows in members])
        a = _u_statistic(tail_sums, sizes)
        v_aa, v_ab, v_bb = _jackknife(tail_sums, grad_sums, sizes)
        want = np.sqrt(max(_fieller_upper(a, b, v_aa, v_ab, v_bb, t), 0.0))
        assert ek["rel_bias_upper"].sel(K=K).item() == pytest.approx(want + beyond, rel=1e-6, abs=1e-12), K
        lower = np.sqrt(max(a - t * np.sqrt(v_aa), 0.0) / (b + t * np.sqrt(v_bb)))  # Bonferroni, each at level
        assert ek["rel_bias_lower"].sel(K=K).item() == pytest.approx(lower, rel=1e-6, abs=1e-12), K
    for K in range(R, R + 7):
        assert ek["rel_bias_upper"].sel(K=K).item() == pytest.approx(past(K, beta_upper), rel=1e-9), K


# --- synthetic gradients: warm_up ----------------------------------------------------------------------------


def test_warm_up_calls_the_dni_at_boundaries_counted_back_from_the_end_of_the_burn_in():
    """A burn-in of 10 steps with K = 4 is not a whole number of chunks: the boundaries fall after steps
    2, 6 and 10, so that one falls where the window starts; each state the DNI sees is the LSTM's own
    state after that many steps."""
    torch.manual_seed(0)
    lstm = nn.LSTM(2, 3, 1, batch_first=True).double()
    system = biaskit.wrap(lstm, nn.Linear(3, 2).double(), nn.CrossEntropyLoss(reduction="none"))
    burn = torch.randn(4, 10, 2, dtype=torch.float64)
    seen = []

    def dni(state, memory):
        seen.append(state.clone())
        return torch.zeros_like(state), (0 if memory is None else memory) + 1

    start, memory = warm_up(system, dni, burn, 4)
    assert memory == len(seen) == 3
    for state, steps in zip(seen, (2, 6, 10)):
        _, (h, c) = lstm(burn[:, :steps])
        torch.testing.assert_close(state, torch.cat([h[0], c[0]], dim=1))
    _, (h, c) = lstm(burn)
    torch.testing.assert_close(start[0], h)
    torch.testing.assert_close(start[1], c)


# --- the controller ------------------------------------------------------------------------------------------


def test_the_exact_controller_keeps_K_while_the_mean_gradient_is_unresolved():
    """Targets of pure noise a thousand times the model's output: the windows' mean gradient is noise,
    nothing certifies any K, and the controller keeps the K in use rather than jumping to K_max."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(600, 2, dtype=torch.float64, generator=gen)
    targets = 1000 * torch.randn(600, dtype=torch.float64, generator=gen)
    controller = Controller(delta=0.1, window=12, windows=16, K_min=1, K_max=40, groups=4, level=0.9)
    record = controller.measure(LinearModel(0.5, n=3), inputs, targets, 5, torch.Generator().manual_seed(1))
    assert record.gradient_resolved == 0 and record.kappa_reached == 0  # the premise
    assert record.K == 5


# --- decay: the regression's fitted curve ---------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["ols", "wls"])
def test_the_regression_band_is_the_fitted_line_through_the_log_lag_means(weights):
    """The band's mean at every lag, inside the fitted window and past it, is exp of the (weighted)
    least-squares line through log φ̄_k over [τ, R), with weights 1/Var(log φ̄_k) ≈ n φ̄_k² / s_k² for
    wls; the band's limits lie on either side of it."""
    rng = np.random.default_rng(0)
    n, R, tau = 40, 12, 3
    table = 0.8 ** np.arange(R) * rng.lognormal(0, 0.3, (n, R))
    fit = fit_decay(xr.Dataset({"phi": (("sample", "lag"), table)}), tau=tau, weights=weights)
    window = table[:, tau:]
    mean = window.mean(0)
    w = n * mean**2 / window.var(0, ddof=1) if weights == "wls" else np.ones(R - tau)
    slope, intercept = np.polyfit(np.arange(tau, R), np.log(mean), 1, w=np.sqrt(w))
    assert fit.beta == pytest.approx(np.exp(slope), rel=1e-10)
    lags = np.arange(0, 2 * R)
    band = fit.band(lags)
    np.testing.assert_allclose(band["mean"].values, np.exp(intercept + slope * lags), rtol=1e-9)
    assert (band["lower"].values < band["mean"].values).all() and (band["mean"].values < band["upper"].values).all()


def test_exact_kappa_stays_finite_when_the_decay_is_exactly_geometric():
    """Identical windows of h' = 0.8 h + 0.5 x from 0.5/(1 − 0.8): the regression's clustered
    covariance is rounding, and its band once came out NaN, and every limit with it."""
    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor([0.8], dtype=torch.float64))
            self.u = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))

        def initial_state(self, batch):
            return torch.full((batch, 1), 0.5 / (1 - 0.8), dtype=torch.float64)

        def forward(self, x, h):
            return self.a * h + self.u * x

    head = torch.nn.Linear(1, 1).double()
    with torch.no_grad():
        head.weight.fill_(1.3)
        head.bias.zero_()
    ds = biaskit.decompose(biaskit.wrap(Scalar(), head, lambda o, t: 0.5 * (o[:, 0] - t) ** 2),
                           torch.ones(12, 16, 1, dtype=torch.float64), torch.full((12,), 4.0, dtype=torch.float64),
                           psi=False, groups=4)
    ek = biaskit.exact_kappa(ds, [0.5], K_range=(0, 30))
    assert np.isfinite(float(ek["beyond_window"])) and np.isfinite(ek["rel_bias_upper"].values).all()
    upper = ek["rel_bias_upper"].values
    assert (np.diff(upper) <= 1e-12 * upper[:-1]).all()  # no jump at the window's edge
