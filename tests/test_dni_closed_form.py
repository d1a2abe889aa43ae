"""A DNI where the future gradient has a closed form.

A linear RNN h_{t+1} = A h_t + x_t with white-noise inputs and the loss ½‖C h_t‖² at every
step: the expected gradient of all later losses at a state h is M h with
M = Σ_{k≥1} (A^k)ᵀ CᵀC A^k, summed here term by term. The bootstrapped target of a K-step
chunk, Σ_{k=1..K} ∂ℓ_{T+k}/∂h_T + γ δ̂(h_{T+K}) ∂h_{T+K}/∂h_T, has the mean
(Q_K + γ (A^K)ᵀ W A^K) h for a linear DNI δ̂ = W h, Q_K the first K terms of M: so W = M is
its fixed point for γ = 1 and no other, and a target without the bootstrap (Q_K) or with
another discount lands elsewhere, far beyond the tolerances below.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from biaskit import synthetic_bias
from biaskit.recurrent import wrap
from trainers import dni

D, K = 4, 2
torch.manual_seed(0)
_Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
A = 0.9 * _Q @ torch.diag(torch.tensor([1.0, 0.9, 0.7, 0.5], dtype=torch.float64))
C = torch.randn(D, D, dtype=torch.float64) / 2


def partial_sum(lags: int) -> torch.Tensor:
    """Σ_{k=1..lags} (A^k)ᵀ CᵀC A^k."""
    total, power = torch.zeros(D, D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    for _ in range(lags):
        power = A @ power
        total += power.T @ C.T @ C @ power
    return total


M = partial_sum(2000)  # the terms fall like 0.81^k: the rest is below 1e-150
A_K = torch.linalg.matrix_power(A, K)


def quadratic(output, target):
    return 0.5 * ((output @ C.T) ** 2).sum(-1)


class Cell(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def initial_state(self, batch):
        return self.A.new_zeros(batch, D)

    def forward(self, x, h):
        return h @ self.A.T + x


class LinearRNN(nn.Module):
    """The trainers' model protocol: ``model(inputs, state) -> (outputs, state)``, per-position losses."""

    def __init__(self):
        super().__init__()
        self.cell = Cell()

    def forward(self, inputs, state=None):
        h = self.cell.initial_state(inputs.shape[0]) if state is None else state
        outputs = []
        for t in range(inputs.shape[1]):
            h = self.cell(inputs[:, t], h)
            outputs.append(h)
        return torch.stack(outputs, 1), h

    def loss(self, output, target):
        return quadratic(output, target)

    def system(self):
        return wrap(self.cell, loss_fn=quadratic)


def noise(streams, length, seed):
    x = torch.randn(streams, length, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, torch.zeros(streams, length, 1, dtype=torch.float64)


def fixed_linear(weight):
    module = dni.linear({"size": D}).double()
    with torch.no_grad():
        module.net.weight.copy_(weight)
    return module


@pytest.mark.parametrize("discount", [1.0, 0.5])
def test_the_bootstrapped_target_has_the_closed_form_mean(discount):
    """With the DNI at M, the targets regressed on their states give Q_K + γ (A^K)ᵀ M A^K: M itself
    for γ = 1, which a target without the bootstrap (Q_K) misses by over 10 tolerances."""
    model = LinearRNN()
    stream = dni.SyntheticStream(*noise(1000, 60, seed=1), fixed_linear(M), model.system(), discount)
    states, targets = [], []
    while not stream.done:
        entering = None if stream.boundary is None else stream.boundary[0]
        stream.chunk_backward(model, K)
        if entering is not None and stream.pos < stream.length:  # the last chunk has no later losses
            states.append(entering)
            targets.append(stream.target)
    fitted = torch.linalg.lstsq(torch.cat(states), torch.cat(targets)).solution.T
    expected = partial_sum(K) + discount * A_K.T @ M @ A_K
    tolerance = 0.02 * M.norm()
    assert (fitted - expected).norm() < tolerance
    assert (partial_sum(K) - M).norm() > 10 * tolerance  # the test can tell a missing bootstrap
    if discount == 1.0:
        assert (fitted - M).norm() < tolerance


def test_a_linear_dni_learns_the_future_gradient_and_corrects_the_truncation():
    """Trained as the trainer trains it (Adam on the bootstrapped target, from zero), the linear DNI
    comes within 10% of M in 150 chunk updates (one stream of 300 steps) and stays there, and its
    BPTT(K, K) gradient is far closer to full BPTT than plain truncation's (synthetic_bias)."""
    model = LinearRNN()
    cfg = {"dni": "linear", "dni_hidden": None, "dni_lr": 0.01, "dni_discount": 1.0, "schedule": "constant",
           "alternate": False}
    trained = dni.SyntheticGradients(model, cfg, "cpu")
    trained.module.double()
    error = []
    for seed in range(2):
        stream = trained.stream(*noise(256, 300, seed=10 + seed))
        while not stream.done:
            model.zero_grad()
            trained.backward(stream, model, K, K, progress=0.0)
        error.append(float((trained.module.net.weight.detach() - M).norm() / M.norm()))
    assert max(error) < 0.1, error  # from 1 at zero
    assert trained.module.net.bias.norm() < 0.1 * M.norm()
    inputs, targets = noise(64, 80, seed=99)
    measured = synthetic_bias(model.system(), inputs, targets, K, trained.module, lookahead=40)
    assert float(measured["rel_bias_synthetic"]) < 0.3 * float(measured["rel_bias_truncated"])
