"""The K controller against a recurrence whose decay is known in closed form."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import biaskit
from helpers import LinearCell
from trainers.adaptive import Controller


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
def test_controller_picks_the_closed_form_kappa(beta, delta):
    """φ̄_k = c β^k gives Ê(K) = c β^{K+1}/(1−β) and Δ̂(K) = β^{K+1}/(1 − 2β^W), so
    κ̂(δ) = the smallest K with β^{K+1} < δ (1 − 2β^W)."""
    torch.manual_seed(0)
    model = LinearModel(beta)
    inputs, targets = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    controller = Controller(delta=delta, window=40, windows=16, K_min=1, K_max=100)
    record = controller.measure(model, inputs, targets, K=5, generator=torch.Generator().manual_seed(0))
    W = controller.window
    want = math.floor(math.log(delta * (1 - 2 * beta**W)) / math.log(beta) - 1) + 1
    assert record["beta"] == pytest.approx(beta, rel=1e-9)
    assert record["K"] == want
    assert record["rel_bias_bound"] == pytest.approx(beta ** (want + 1) / (1 - 2 * beta**W), rel=1e-8)


def test_controller_responds_to_slower_decay_with_a_longer_truncation():
    torch.manual_seed(0)
    inputs, targets = torch.randn(2000, 2, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    controller = Controller(delta=0.1, window=40, windows=16, K_min=2, K_max=100)
    Ks = [controller.measure(LinearModel(beta), inputs, targets, 5, torch.Generator().manual_seed(0))["K"]
          for beta in (0.3, 0.6, 0.9)]
    assert Ks[0] < Ks[1] < Ks[2]
    assert Ks[0] == 2  # clipped to K_min


def test_controller_keeps_K_when_only_measuring():
    torch.manual_seed(0)
    inputs, targets = torch.randn(500, 2, dtype=torch.float64), torch.randn(500, dtype=torch.float64)
    record = Controller(delta=None, window=40, windows=8).measure(
        LinearModel(0.7), inputs, targets, 7, torch.Generator().manual_seed(0))
    assert record["K"] == 7
    assert 0 < record["rel_bias_exact"] < 1


def test_too_short_a_stream_is_refused():
    with pytest.raises(biaskit.InputError, match="fewer than the 64 asked for"):
        Controller(delta=0.5, window=40).measure(LinearModel(0.5), torch.zeros(60, 2), torch.zeros(60), 5,
                                                 torch.Generator())


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
