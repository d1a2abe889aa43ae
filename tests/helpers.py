"""Test systems, and reference computations the tests check biaskit against: the modules' own
forward passes with detach-based truncation, nothing from biaskit."""
from __future__ import annotations

import torch
from torch import nn


class LinearCell(nn.Module):
    """h_t = W h_{t-1} + U x_t, so ∂L/∂h_{s-k} = (Wᵀ)^k ∂L/∂h_s exactly."""

    def __init__(self, W, U):
        super().__init__()
        self.W = nn.Parameter(W)
        self.U = nn.Parameter(U)

    def initial_state(self, batch_size):
        return self.W.new_zeros(batch_size, self.W.shape[0])

    def forward(self, x, h):
        return h @ self.W.T + x @ self.U.T


class LeakyCell(nn.Module):
    """The README's custom-cell example: a leaky tanh RNN step."""

    def __init__(self, input_size, hidden_size, leak=0.5):
        super().__init__()
        self.input_size, self.hidden_size, self.leak = input_size, hidden_size, leak
        self.inp = nn.Linear(input_size, hidden_size)
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, self.hidden_size)

    def forward(self, x_t, h):
        return (1 - self.leak) * h + self.leak * torch.tanh(self.inp(x_t) + self.rec(h))


class PairCell(nn.Module):
    """A custom cell whose state is a tuple (output, memory)."""

    state_names = ("out", "mem")

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.cell = nn.LSTMCell(input_size, hidden_size)

    def initial_state(self, batch_size):
        zero = torch.zeros(batch_size, self.hidden_size)
        return zero, zero.clone()

    def forward(self, x_t, state):
        return self.cell(x_t, state)


def make_module(kind, input_size=3, hidden=5, layers=2, batch_first=True, bias=True, nonlinearity="tanh"):
    if kind in ("RNN", "GRU", "LSTM"):
        extra = {"nonlinearity": nonlinearity} if kind == "RNN" else {}
        return getattr(nn, kind)(input_size, hidden, layers, bias=bias, batch_first=batch_first, **extra)
    if kind in ("RNNCell", "GRUCell", "LSTMCell"):
        return getattr(nn, kind)(input_size, hidden, bias=bias)
    return {"LeakyCell": LeakyCell, "PairCell": PairCell}[kind](input_size, hidden)


def _detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


def final_output(module, x, split=None, h0=None):
    """Top-layer output at the last step, run by the module itself; with ``split``,
    the state entering step ``split`` (0-based) is detached.  x is batch-first;
    ``h0`` is the module's own initial state (zeros if None)."""
    if isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)):
        seq = x if module.batch_first else x.transpose(0, 1)
        tdim = 1 if module.batch_first else 0
        if split:
            _, hx = module(seq.narrow(tdim, 0, split), h0)
            out, _ = module(seq.narrow(tdim, split, x.shape[1] - split), _detach(hx))
        else:
            out, _ = module(seq, h0)
        return out[:, -1] if module.batch_first else out[-1]
    if isinstance(module, (nn.LSTMCell, nn.RNNCell, nn.GRUCell)):
        state = None
        zero = torch.zeros(x.shape[0], module.hidden_size, dtype=x.dtype)
        state = (zero, zero) if isinstance(module, nn.LSTMCell) else zero
    else:
        state = module.initial_state(x.shape[0]) if h0 is None else h0
        state = tuple(s.to(x) for s in state) if isinstance(state, tuple) else state.to(x)
    for t in range(x.shape[1]):
        if t == split:
            state = _detach(state)
        state = module(x[:, t], state)
    return state[0] if isinstance(state, tuple) else state


def naive_gradient(module, readout, loss_fn, x, y, K=None, encoder=None, h0=None):
    """ĝ_K by detaching the state entering step R-K (K=None: full BPTT), mean loss."""
    split = None if K is None else x.shape[1] - 1 - K
    inputs = x if encoder is None else encoder(x)
    loss = loss_fn(readout(final_output(module, inputs, split, h0)), y).mean()
    named = [*module.named_parameters(), *(("readout." + n, p) for n, p in readout.named_parameters())]
    if encoder is not None:
        named += [("encoder." + n, p) for n, p in encoder.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def naive_every(module, readout, loss_fn, x, y, K=None, encoder=None, h0=None):
    """Losses at every step: the mean over positions s of ĝ_K for the loss at s alone, the window cut
    at s and the state entering step s-K detached (none when K >= s)."""
    total = None
    for s in range(x.shape[1]):
        g = naive_gradient(module, readout, loss_fn, x[:, :s + 1], y[:, s], None if K is None or K >= s else K,
                           encoder=encoder, h0=h0)
        total = g if total is None else {n: total[n] + g[n] for n in g}
    return {n: v / x.shape[1] for n, v in total.items()}


def flat_norm(tensors):
    return torch.sqrt(sum(t.pow(2).sum() for t in tensors)).item()
