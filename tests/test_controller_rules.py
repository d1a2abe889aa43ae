"""The controller's rules (issue: a controller that keeps its promise) and why an audit's δ is not reached."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_adaptive import LinearModel

import biaskit
from biaskit.bias import not_reached
from biaskit.probe import probing
from trainers.adaptive import (
    PLANNED_SHARE,
    Controller,
    UpdateRecord,
    UpdateSchedule,
    choose_K,
    limit_change,
    next_interval,
    paper_rule,
    windows_needed,
)


@pytest.mark.parametrize("K, target, want", [
    (15, 100, 30),   # none below delta: doubled toward K_max, never the jump itself
    (15, 2, 8),      # certified shorter: at most halved
    (15, 12, 12),    # within the factor: the target
    (3, 2, 2),
    (1, 100, 2),     # at least one step
    (60, 100, 100),  # capped at K_max
])
def test_K_moves_by_at_most_the_factor_per_update(K, target, want):
    assert limit_change(K, target, 2.0, 2, 100) == want


def test_the_step_grows_by_at_most_the_root_of_the_factor_over_any_run_of_updates():
    """lr·√K: with K at most doubled per update, one update multiplies the step by at most √2."""
    K = 2
    for target in (100, 100, 3, 100, 50, 100):
        new = limit_change(K, target, 2.0, 2, 100)
        assert math.sqrt(new) / math.sqrt(K) <= math.sqrt(2) + 1e-12
        K = new


def test_a_single_certification_of_a_short_K_does_not_shorten_it():
    """The stall: at a plateau the bias at short K is tiny, and one certification of K = 2 would
    collapse K below the task's dependency. It takes two in a row, and then halves."""
    assert limit_change(15, 2, 2.0, 2, 100, shorten=False) == 15
    assert limit_change(15, 2, 2.0, 2, 100, shorten=True) == 8
    assert limit_change(15, 40, 2.0, 2, 100, shorten=False) == 30  # growing needs no second opinion


def test_the_exact_controller_shortens_only_after_two_certifications_in_a_row():
    """The constant-stream system certifies K = 1 at δ = 0.5: the first update keeps K = 8, the second
    (told of the first) halves it."""
    from test_adaptive import ConstantModel

    model = ConstantModel()
    inputs, targets = torch.ones(400, 1, dtype=torch.float64), torch.full((400,), 3.0, dtype=torch.float64)
    controller = Controller(delta=0.5, window=40, windows=24, K_min=1, K_max=60, groups=4)
    first = controller.measure(model, inputs, targets, 8, torch.Generator().manual_seed(0))
    assert (first.K_rule, first.K_target, first.K) == ("certified", 1, 8)
    second = controller.measure(model, inputs, targets, 8, torch.Generator().manual_seed(1), previous=first)
    assert (second.K_rule, second.K) == ("certified", 4)


def test_unresolved_takes_the_papers_kappa_hat_when_it_is_longer():
    inf = [math.inf] * 4
    assert choose_K(range(2, 6), inf, 0.5, 7, 50, False, 0.1, kappa_hat=12) == (12, False, "estimated")
    assert choose_K(range(2, 6), inf, 0.5, 7, 50, False, 0.1, kappa_hat=5) == (7, False, "held")
    assert choose_K(range(2, 6), inf, 0.5, 7, 50, False, 0.1, kappa_hat=None) == (7, False, "held")


def test_K_shortens_by_at_most_its_own_factor_and_grows_by_the_other():
    assert limit_change(16, 8, 2.0, 2, 100, shrink=1.25) == 13  # ceil(16 / 1.25)
    assert limit_change(16, 100, 2.0, 2, 100, shrink=1.25) == 32
    assert limit_change(4, 2, 2.0, 2, 100, shrink=1.25) == 3  # at least one step
    assert limit_change(16, 8, 2.0, 2, 100) == 8  # by default as far as it grows


def test_unresolved_grows_while_the_point_estimate_is_above_delta_when_asked():
    Ks, inf = list(range(2, 12)), [math.inf] * 10
    points = [0.9, 0.8, 0.7, 0.6, 0.45, 0.3, 0.2, 0.15, 0.08, 0.05]  # K = 2..11
    assert choose_K(Ks, inf, 0.1, 6, 50, False, 0.0, None, points) == (10, False, "point estimate")
    assert choose_K(Ks, inf, 0.01, 6, 50, False, 0.0, None, points) == (50, False, "point estimate")  # none: K_max
    assert choose_K(Ks, inf, 0.5, 6, 50, False, 0.0, None, points) == (6, False, "held")  # 0.45 is below 0.5
    assert choose_K(Ks, inf, 0.1, 6, 50, False, 0.0, None, None) == (6, False, "held")  # not asked
    limits = [math.inf] * 8 + [0.09, 0.06]
    assert choose_K(Ks, limits, 0.1, 6, 50, False, 0.0, None, points) == (10, True, "certified")  # a limit first


@pytest.mark.parametrize("options, message", [
    ({"max_shrink": 1.0}, "--max-shrink must be a factor above 1"),
    ({"max_shrink": 3.0}, "at most --max-change 2"),
])
def test_a_shrink_factor_outside_its_range_is_refused(options, message):
    from trainers import config as configs

    with pytest.raises(biaskit.InputError, match=message):
        configs.full_config("copy", {}, {"delta": 0.5, **options})


def test_the_paper_controller_never_says_certified():
    assert paper_rule(9, True, 15, 100) == (9, True, "estimated")
    assert paper_rule(100, False, 15, 100) == (100, False, "none below delta")
    assert paper_rule(None, False, 15, 100) == (15, False, "no fit")
    torch.manual_seed(0)
    inputs, targets = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    for beta, delta in ((0.5, 0.1), (0.999, 0.01)):
        record = Controller(delta=delta, window=40, windows=16, K_min=1, K_max=100, controller="paper",
                            groups=4).measure(LinearModel(beta), inputs, targets, 5, torch.Generator().manual_seed(0))
        assert record.K_rule in ("estimated", "none below delta")
        assert record.K <= 10


def test_the_paper_controller_reads_phi_alone_between_audits():
    """Between its exact audits it measures φ only (no exact bias in the record); its κ̂ is the same
    as from a full decomposition of the same windows."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    controller = Controller(delta=0.1, window=40, windows=16, K_min=1, K_max=100, controller="paper", groups=4,
                            audit_every=2)
    audited = controller.measure(LinearModel(0.8), inputs, targets, 5, torch.Generator().manual_seed(0), count=0)
    light = controller.measure(LinearModel(0.8), inputs, targets, 5, torch.Generator().manual_seed(0), count=1)
    assert audited.rel_bias_exact is not None and light.rel_bias_exact is None
    assert light.kappa_hat == audited.kappa_hat and light.beta == pytest.approx(audited.beta, rel=1e-12)


def test_state_gradient_norms_are_decomposes_phi():
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(3, 5, 2, batch_first=True).double(), torch.nn.Linear(5, 4).double()
    system = biaskit.wrap(lstm, head, torch.nn.CrossEntropyLoss(reduction="none"))
    x, y = torch.randn(8, 20, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    full = biaskit.decompose(system, x, y, psi=False, metric=False, groups=4)
    light = biaskit.state_gradient_norms(system, x, y)
    assert float(abs(full.phi - light.phi).max()) == 0 and float(abs(full.phi_state - light.phi_state).max()) == 0
    # and φ at lag k is the norm of the gradient with respect to that state, by autograd
    h = torch.zeros(2, 8, 5, dtype=torch.float64, requires_grad=True)
    states, state = [], (h, torch.zeros(2, 8, 5, dtype=torch.float64))
    for t in range(20):
        _, state = lstm(x[:, t:t + 1], state)
        states.append(state)
    loss = torch.nn.functional.cross_entropy(head(state[0][-1]), y, reduction="sum")
    k = 5
    grads = torch.autograd.grad(loss, states[19 - k])
    want = torch.cat([g.transpose(0, 1).reshape(8, -1) for g in grads], 1).norm(dim=1)
    torch.testing.assert_close(torch.from_numpy(light.phi.sel(lag=k).values), want)


def test_the_interval_doubles_while_K_is_settled():
    settled = UpdateRecord(K=10, K_in_use=10, K_target=10)
    assert next_interval(settled, 1.0, 1.0, 4.0) == 2.0
    assert next_interval(settled, 4.0, 1.0, 4.0) == 4.0
    assert next_interval(UpdateRecord(K=10, K_in_use=10, K_target=3), 4.0, 1.0, 4.0) == 1.0  # a change pending
    assert next_interval(UpdateRecord(K=20, K_in_use=10, K_target=20), 2.0, 1.0, 4.0) == 1.0


def _exact(model, inputs, targets, windows, window, level=0.9, K_range=None, groups=8, seed=0):
    with probing(model, inputs, targets, length=window, count=windows,
                 generator=torch.Generator().manual_seed(seed)) as probe:
        ds = biaskit.decompose(probe.system, probe.inputs, probe.targets, start=probe.start, psi=False,
                               metric=False, groups=groups)
    return biaskit.exact_kappa(ds, [0.01], alpha=1 - level, K_range=K_range)


def test_not_reached_says_unresolved_with_the_windows_it_would_take():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(600, 2, dtype=torch.float64, generator=gen)
    targets = 1000 * torch.randn(600, dtype=torch.float64, generator=gen)
    exact = _exact(LinearModel(0.5, n=3), inputs, targets, 16, 12, groups=4, seed=1)
    why = not_reached(exact, 0.01, 16)
    assert why["cause"] == "unresolved"
    b, sd, t = float(exact["grad_sq"]), float(exact["grad_sq_sd"]), exact.attrs["t_factor"]
    assert b <= t * sd  # the premise, from the printed pieces
    if b > 0:
        assert why["windows_needed"] == math.ceil(16 * (t * sd / b) ** 2) > 16


def test_not_reached_says_the_tail_past_the_window_is_unbounded():
    torch.manual_seed(0)
    inputs, targets = torch.randn(3000, 2, dtype=torch.float64), 2 + torch.randn(3000, dtype=torch.float64)
    exact = _exact(LinearModel(1.1), inputs, targets, 64, 20)  # W = 1.1 Q: the state gradient grows back in time
    assert int(exact["gradient_resolved"]) == 1 and math.isinf(float(exact["beyond_window"]))
    why = not_reached(exact, 0.01, 64)
    assert why["cause"] == "beyond window" and why["window_length_needed"] > 20


def test_not_reached_says_the_bias_stays_above_delta_in_range():
    torch.manual_seed(0)
    inputs, targets = torch.randn(3000, 2, dtype=torch.float64), 2 + torch.randn(3000, dtype=torch.float64)
    exact = _exact(LinearModel(0.8), inputs, targets, 64, 30, K_range=(0, 3))
    assert int(exact["gradient_resolved"]) == 1 and math.isfinite(float(exact["beyond_window"]))
    assert (exact["rel_bias_upper"].values >= 0.01).all()
    why = not_reached(exact, 0.01, 64)
    assert why["cause"] == "above delta" and "K <= 3" in why["why"]


def test_the_update_schedule_is_asked_in_one_place():
    """Adaptive: due from ``base`` epochs on, inside an epoch too, the interval doubling while K is
    settled and back to ``base`` on a change; fixed K: at each epoch's end only."""
    adaptive = UpdateSchedule(1.0, 4.0, adaptive=True)
    assert not adaptive.due(0.99, epoch_end=False) and adaptive.due(1.0, epoch_end=False)
    settled, moving = UpdateRecord(K=10, K_in_use=10, K_target=10), UpdateRecord(K=20, K_in_use=10, K_target=20)
    assert adaptive.advance(settled, None) == 2.0 and adaptive.next == 3.0
    assert adaptive.advance(settled, UpdateRecord(interval=2.0)) == 4.0 and adaptive.next == 7.0
    assert adaptive.advance(moving, UpdateRecord(interval=4.0)) == 1.0 and adaptive.next == 8.0
    fixed = UpdateSchedule(1.0, 4.0, adaptive=False)
    assert fixed.due(0.5, epoch_end=True) and not fixed.due(5.0, epoch_end=False)


def test_an_update_after_a_roomy_certification_measures_fewer_windows():
    """windows_needed by hand: 256 windows, point 0.05, upper 0.10, δ 0.5: the half-width 0.05 must
    fall to within half the margin (0.225), which 256·(0.05/0.225)² = 12.6 windows do: the floor."""
    assert windows_needed(0.05, 0.10, 0.5, 256, 64, 256, 16) == 64
    assert windows_needed(0.30, 0.45, 0.5, 256, 64, 256, 16) == 256  # 256·(0.15/0.1)² = 576: capped
    assert windows_needed(0.10, 0.20, 0.5, 256, 16, 256, 16) == 64  # 256·(0.1/0.2)² = 64 exactly
    assert windows_needed(0.10, 0.21, 0.5, 256, 16, 256, 16) == 80  # 77.4, up to a multiple of 16
    assert windows_needed(0.45, 0.55, 0.5, 256, 64, 256, 16) == 256  # not certified: all of them
    assert windows_needed(math.nan, math.nan, 0.5, 64, 64, 256, 16) == 256  # unresolved: all of them


@given(st.floats(0, 0.9), st.floats(0, 1), st.floats(0.01, 0.99), st.integers(3, 512), st.integers(1, 64),
       st.integers(1, 32))
def test_the_planned_limit_sits_inside_delta_unless_capped(point, width, delta, windows, least, step):
    most = max(least, 256)
    upper = point + width
    n = windows_needed(point, upper, delta, windows, least, most, step)
    assert least <= n <= most
    if upper >= delta:
        assert n == most
    elif least < n < most:
        assert n % step == 0
        assert point + width * math.sqrt(windows / n) <= point + PLANNED_SHARE * (delta - point) + 1e-9


def test_the_controller_plans_its_next_windows_and_draws_them(monkeypatch):
    """The constant stream has no sampling noise: its certification leaves all the room, so the next
    update draws the fewest windows; a δ no K reaches brings all of them back."""
    from test_adaptive import ConstantModel

    from trainers import adaptive

    drawn = []

    def counting(*args, count, **kwargs):
        drawn.append(count)
        return probing(*args, count=count, **kwargs)

    monkeypatch.setattr(adaptive, "probing", counting)
    model = ConstantModel()
    inputs, targets = torch.ones(400, 1, dtype=torch.float64), torch.full((400,), 3.0, dtype=torch.float64)
    controller = Controller(delta=0.5, window=40, windows=24, windows_min=8, K_min=1, K_max=60, groups=4)
    first = controller.measure(model, inputs, targets, 8, torch.Generator().manual_seed(0))
    assert (first.K_rule, first.windows, first.windows_next) == ("certified", 24, 8)
    second = controller.measure(model, inputs, targets, 8, torch.Generator().manual_seed(1), previous=first)
    assert second.windows == 8
    strict = replace(controller, delta=1e-12, K_max=20)
    third = strict.measure(model, inputs, targets, 8, torch.Generator().manual_seed(2), previous=second)
    assert (third.windows, third.windows_next) == (8, 24)
    assert drawn == [24, 8, 8]
    for off in (24, None):  # as many as --windows, and the default: always --windows
        assert replace(controller, windows_min=off).measure(model, inputs, targets, 8,
                                                            torch.Generator().manual_seed(0)).windows_next == 24
