"""The K controller against a recurrence whose decay is known in closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import LinearCell, flat_norm, naive_gradient
from torch import nn

import biaskit
from trainers.adaptive import Controller, UpdateRecord


class LinearModel(nn.Module):
    """The trainer's model protocol around a LinearCell with W = βQ, Q orthogonal, so
    ||∂L/∂h_{s-k}|| = β^k ||∂L/∂h_s|| exactly; a squared-error readout."""

    def __init__(self, beta, n=4, features=2):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
        self.cell = LinearCell(beta * q, torch.randn(n, features, dtype=torch.float64))
        self.head = nn.Linear(n, 1).double()

    def forward(self, x, state=None):
        h = self.cell.initial_state(x.shape[0]) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            outs.append(h)
        return self.head(torch.stack(outs, 1)), h

    @staticmethod
    def squared_error(out, target):
        return (out.squeeze(-1) - target) ** 2

    def loss(self, out, targets):
        return self.squared_error(out, targets)

    def system(self):
        return biaskit.wrap(self.cell, self.head, self.squared_error)


@pytest.mark.parametrize("beta, delta", [(0.5, 0.1), (0.8, 0.1), (0.8, 0.01), (0.9, 0.5)])
def test_the_paper_controller_picks_the_closed_form_kappa(beta, delta):
    """φ̄_k = c β^k. Eq. 23 as printed gives Ê(K) = c β^{K+1}/(1−β) for K < τ, and Eq. 24's
    denominator, max over k ≤ K of Σ_{j≤k} φ̄_j − Ê(k) = c(1 − 2β^{k+1})/(1−β), peaks at k = K, so
    Δ̂(K) = β^{K+1}/(1 − 2β^{K+1}) and κ̂(δ) is the smallest K with β^{K+1}(1 + 2δ) < δ."""
    torch.manual_seed(0)
    model = LinearModel(beta)
    inputs, targets = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    controller = Controller(delta=delta, window=40, windows=16, K_min=1, K_max=100, controller="paper", groups=4)
    record = controller.measure(model, inputs, targets, K=5, generator=torch.Generator().manual_seed(0))
    want = math.floor(math.log(delta / (1 + 2 * delta)) / math.log(beta) - 1) + 1
    assert want < 36  # below τ = 0.9 W
    assert record.beta == pytest.approx(beta, rel=1e-9)
    assert record.K_target == want and record.kappa_reached == 1 and record.K_rule == "estimated"
    assert record.K == min(want, 10)  # at most twice the K in use
    K = record.K
    assert record.rel_bias_bound == pytest.approx(beta ** (K + 1) / (1 - 2 * beta ** (K + 1)), rel=1e-8)


def test_the_paper_controller_responds_to_slower_decay_with_a_longer_truncation():
    torch.manual_seed(0)
    inputs, targets = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    controller = Controller(delta=0.1, window=40, windows=16, K_min=2, K_max=100, controller="paper", groups=4)
    Ks = [controller.measure(LinearModel(beta), inputs, targets, 5, torch.Generator().manual_seed(0)).K_target
          for beta in (0.3, 0.6, 0.9)]
    assert Ks[0] < Ks[1] < Ks[2]
    assert Ks[0] == 2  # clipped to K_min


class ConstantModel(LinearModel):
    """A scalar linear recurrence fed a constant stream: every window is the same window, so the
    exact bias has no sampling noise and its upper limit is the bias itself."""

    def __init__(self, a=0.7):
        super().__init__(0.5, n=1, features=1)
        with torch.no_grad():
            self.cell.W.fill_(a)


def naive_rel_bias(model, windows, targets, start, K):
    full = naive_gradient(model.cell, model.head, model.squared_error, windows, targets, h0=start)
    trunc = naive_gradient(model.cell, model.head, model.squared_error, windows, targets, K, h0=start)
    return flat_norm([trunc[n] - full[n] for n in full]) / flat_norm(full.values())


@pytest.mark.parametrize("delta", [0.5, 0.1, 0.01])
def test_the_exact_controller_picks_the_smallest_K_whose_exact_bias_is_below_delta(delta):
    model = ConstantModel()
    inputs, targets = torch.ones(400, 1, dtype=torch.float64), torch.full((400,), 3.0, dtype=torch.float64)
    shorter = UpdateRecord(K_rule="certified", K_in_use=5, K_target=1)  # the last update certified a shorter K too
    record = Controller(delta=delta, window=40, windows=24, K_min=1, K_max=60, groups=4, max_change=math.inf).measure(
        model, inputs, targets, K=5, generator=torch.Generator().manual_seed(0), previous=shorter)
    burn = torch.ones(24, 40, 1, dtype=torch.float64)
    with torch.no_grad():
        _, start = model(burn)
    windows, last = torch.ones(24, 40, 1, dtype=torch.float64), torch.full((24,), 3.0, dtype=torch.float64)
    exact = [naive_rel_bias(model, windows, last, start, K) for K in range(1, 40)]
    want = 1 + next(i for i, value in enumerate(exact) if value < delta)
    assert record.K == want and record.kappa_reached == 1 and record.gradient_resolved == 1
    assert record.rel_bias_upper == pytest.approx(exact[want - 1], rel=1e-4)  # plus the tail past the window
    assert record.rel_bias_exact == pytest.approx(exact[4], rel=1e-9)  # K = 5, the one in use


def test_the_logged_exact_bias_is_the_K_in_use_from_the_burn_in_state():
    """A slow decay (β = 0.95) over a 40-step window: the state the burn-in leaves matters, and the
    log must hold the exact bias of the K in use (not K + 1) on the drawn windows."""
    from biaskit.probe import sample_windows

    torch.manual_seed(0)
    model = LinearModel(0.95)
    inputs, targets = torch.randn(800, 2, dtype=torch.float64), torch.randn(800, dtype=torch.float64)
    record = Controller(delta=None, window=40, windows=8, groups=4).measure(
        model, inputs, targets, 7, torch.Generator().manual_seed(3))
    drawn = sample_windows(inputs, targets, 40, 8, torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, start = model(drawn.burn)
    assert record.K == 7
    want = naive_rel_bias(model, drawn.inputs, drawn.targets[:, -1], start, 7)
    assert record.rel_bias_exact == pytest.approx(want, rel=1e-9)
    from_zero = naive_rel_bias(model, drawn.inputs, drawn.targets[:, -1], None, 7)
    assert abs(from_zero - want) > 1e-3 * want  # the burn-in's state is not a detail here


def test_the_every_step_controller_logs_the_every_step_bias_of_the_K_in_use():
    """With losses at every step the controller's exact bias is the mean of each position's truncation."""
    from helpers import naive_every

    from biaskit.probe import sample_windows

    torch.manual_seed(0)
    model = LinearModel(0.9)
    inputs, targets = torch.randn(400, 2, dtype=torch.float64), torch.randn(400, dtype=torch.float64)
    record = Controller(delta=None, window=12, windows=6, groups=3, loss_at="every").measure(
        model, inputs, targets, 3, torch.Generator().manual_seed(5))
    drawn = sample_windows(inputs, targets, 12, 6, torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, start = model(drawn.burn)
    args = (model.cell, model.head, model.squared_error, drawn.inputs, drawn.targets)
    full, trunc = naive_every(*args, h0=start), naive_every(*args, 3, h0=start)
    want = flat_norm([trunc[n] - full[n] for n in full]) / flat_norm(full.values())
    assert record.rel_bias_exact == pytest.approx(want, rel=1e-9)
    last = Controller(delta=None, window=12, windows=6, groups=3).measure(
        model, inputs, targets, 3, torch.Generator().manual_seed(5))
    assert abs(last.rel_bias_exact - want) > 1e-3 * want  # a different gradient, a different bias


def test_too_short_a_stream_is_refused():
    with pytest.raises(biaskit.InputError, match="fewer than the 64 asked for"):
        Controller(delta=0.5, window=40, windows=64).measure(LinearModel(0.5), torch.zeros(60, 2),
                                                             torch.zeros(60), 5, torch.Generator())


def test_sampled_windows_line_up_with_the_stream_and_are_distinct():
    from biaskit.probe import sample_windows

    inputs, targets = torch.arange(100).float()[:, None], torch.arange(100) * 10
    drawn = sample_windows(inputs, targets, 7, 20, torch.Generator().manual_seed(0), lookahead=3)
    assert drawn.inputs.shape == (20, 10, 1) and drawn.burn.shape == (20, 7, 1) and drawn.targets.shape == (20, 10)
    starts = drawn.inputs[:, 0, 0].long()
    assert torch.equal(starts, drawn.starts)
    assert torch.equal(drawn.inputs[:, :, 0].long(), starts[:, None] + torch.arange(10))
    assert torch.equal(drawn.burn[:, :, 0].long(), starts[:, None] - 7 + torch.arange(7))
    assert torch.equal(drawn.targets, (starts[:, None] + torch.arange(10)) * 10)
    assert starts.min() >= 7 and starts.max() <= 100 - 10
    assert len(set(starts.tolist())) == 20


def test_as_many_windows_as_the_stream_offers_and_no_more():
    """A stream of N steps offers N − 2W − lookahead + 1 distinct windows: all of them can be drawn,
    one more is refused, and the message's advice is itself feasible."""
    from biaskit.probe import sample_windows

    inputs, targets = torch.arange(60).float()[:, None], torch.arange(60)
    every = sample_windows(inputs, targets, 20, 21, torch.Generator().manual_seed(0))
    assert sorted(every.starts.tolist()) == list(range(20, 41))
    with pytest.raises(biaskit.InputError, match="offers 21 distinct windows") as err:
        sample_windows(inputs, targets, 20, 22, torch.Generator())
    longest = int(str(err.value).split("at most ")[-1].split()[0])
    assert len(sample_windows(inputs, targets, longest, 22, torch.Generator()).starts.unique()) == 22


@pytest.mark.parametrize("limits, resolved, lower, want", [
    ([0.9, 0.6, 0.4, 0.2], True, 0.0, (4, True, "certified")),        # the first K below δ = 0.5
    ([0.9, 0.6, 0.4, 0.2], False, 0.9, (4, True, "certified")),       # certified whatever else
    ([0.9, 0.8, 0.7, 0.6], True, 0.0, (50, False, "none below delta")),  # the paper's K_max
    ([math.inf] * 4, False, 0.7, (14, False, "raised")),               # the K in use evidently misses δ
    ([math.inf] * 4, False, 0.3, (7, False, "held")),                  # no evidence either way
])
def test_the_exact_controllers_rule(limits, resolved, lower, want):
    from trainers.adaptive import choose_K

    assert choose_K(np.arange(2, 6), limits, 0.5, 7, 50, resolved, lower) == want
    assert choose_K(np.arange(2, 6), [math.inf] * 4, 0.5, 40, 50, False, 0.9)[0] == 50  # at most K_max


def test_the_lower_limit_is_below_the_batch_value_and_the_upper_limit():
    torch.manual_seed(0)
    model = LinearModel(0.9)
    inputs, targets = torch.randn(3000, 2, dtype=torch.float64), 2 + torch.randn(3000, dtype=torch.float64)
    record = Controller(delta=None, window=30, windows=64, groups=8, level=0.9).measure(
        model, inputs, targets, 3, torch.Generator().manual_seed(0))
    assert 0 <= record.rel_bias_exact_lower <= record.rel_bias_exact <= record.rel_bias_exact_upper
