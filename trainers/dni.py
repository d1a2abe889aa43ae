"""Synthetic gradients at the truncation boundary: DNI modules and the streaming estimator.

Training walks BPTT(K, K) chunks carrying the state. At the end of each chunk
the last state h_T gets a predicted gradient δ̂_T = DNI(h_T) of all later losses
(Jaderberg et al. 2016), so the chunk's update stands in for full BPTT. The DNI
learns from the bootstrapped target of the next chunk,

    δ_T = Σ_{τ=T+1}^{2T} ∂ℓ_τ/∂h_T + δ̂_{2T} · ∂h_{2T}/∂h_T,

which that chunk's backward pass yields as the gradient at its entering state.
Gradients are per sample and of the plain sum of later losses (no 1/K), so
they do not depend on the batch size or K; the chunk objective is its mean loss
plus δ̂_T · h_T, both over S·n.

Two DNI shapes (Shang & Zhang 2019): layer-wise, one MLP from the whole flat
state to its gradient, and neuron-wise, one small LSTM cell shared by every
neuron, scalar in and out with a hidden state of its own per neuron, so its
size does not grow with the RNN's width. Both follow biaskit's DNI protocol,
``dni(state, memory) -> (gradient, memory)`` on flat states, so
``biaskit.synthetic_bias`` audits the same module that trains.
"""
from __future__ import annotations

import torch
from torch import nn

import biaskit
from biaskit.streams import sample_spans
from biaskit import synthetic_bias

from .tbptt import Stream, detach

FACTORY = "trainers.dni:build"
KINDS = ("neuron", "layer")


class LayerDNI(nn.Module):
    """One MLP maps the whole flat state (D) to its gradient (D); stateless."""

    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, size))
        nn.init.zeros_(self.net[-1].weight)  # starts as plain truncation (Jaderberg et al.)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, state: torch.Tensor, memory=None):
        return self.net(state), memory


class NeuronDNI(nn.Module):
    """One LSTM cell shared by every neuron: each neuron's scalar state goes up to ``hidden``
    dimensions, through the cell with that neuron's own memory, and back down to a scalar."""

    def __init__(self, hidden: int):
        super().__init__()
        self.up = nn.Sequential(nn.Linear(1, hidden), nn.Tanh())
        self.cell = nn.LSTMCell(hidden, hidden)
        self.down = nn.Linear(hidden, 1)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, state: torch.Tensor, memory=None):
        h, c = self.cell(self.up(state.reshape(-1, 1)), memory)  # one row per (sample, neuron)
        return self.down(h).view_as(state), (h, c)


def build(config: dict) -> nn.Module:
    """The DNI named by ``{"kind": "neuron"|"layer", "size": D, "hidden": m or None}``."""
    kind, size, hidden = config["kind"], config["size"], config.get("hidden")
    if kind == "layer":
        return LayerDNI(size, hidden or size)
    if kind == "neuron":
        return NeuronDNI(hidden or 8)
    raise biaskit.InputError(f"unknown DNI {kind!r}: use {' or '.join(KINDS)}")


def state_size(model) -> int:
    """D, the flat state size of a model's recurrence, as biaskit lays it out."""
    was_training = model.training
    model.eval()  # biaskit refuses a recurrence in training mode with dropout
    try:
        return model.system().layout.size
    finally:
        model.train(was_training)


def flatten(state) -> torch.Tensor:
    """A stacked module's (h, c) or h, each (layers, batch, H), as biaskit's flat (batch, D):
    layer by layer, h then c."""
    parts = state if isinstance(state, tuple) else (state,)
    return torch.cat([part[layer] for layer in range(parts[0].shape[0]) for part in parts], dim=1)


def unflatten(flat: torch.Tensor, like):
    """The inverse of ``flatten``, in the format of the state ``like``."""
    n = len(like) if isinstance(like, tuple) else 1
    layers = (like[0] if isinstance(like, tuple) else like).shape[0]
    chunks = flat.chunk(n * layers, dim=1)
    parts = tuple(torch.stack(chunks[i::n]) for i in range(n))
    return parts if isinstance(like, tuple) else parts[0]


class SyntheticStream(Stream):
    """Walks BPTT(K, K) chunks, adding the DNI's synthetic gradient at each chunk's end."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, dni: nn.Module, discount: float = 1.0):
        super().__init__(inputs, targets)
        self.dni, self.discount = dni, discount
        self.memory = None    # the DNI's memory after the last boundary
        self.boundary = None  # (flat state, DNI memory) at the start of the next chunk
        self.target = None    # the bootstrapped target δ_T at the last chunk's start, per sample

    def chunk_backward(self, model, K: int, synthetic: bool = True):
        """Back-propagate the next chunk into the model's ``.grad`` and advance.

        ``synthetic``: whether the model's gradient includes the DNI's term
        (either way the DNI's target is computed, so it keeps learning).
        Returns (mean loss, positions, the DNI's loss against ``self.target``,
        the bootstrapped target at the chunk's start; None for the first chunk).
        """
        start, end = self.pos, min(self.pos + K, self.length)
        S, n = self.inputs.shape[0], end - start
        entering = None
        if self.boundary is not None:
            entering = self.boundary[0].detach().requires_grad_()
        state = None if entering is None else unflatten(entering, self.carry)
        out, state = model(self.inputs[:, start:end], state)
        loss = model.loss(out, self.targets[:, start:end]).mean()
        flat = flatten(state)
        term = flat.new_zeros(())
        memory = self.memory
        if end < self.length:  # no later losses after the stream's end
            with torch.no_grad():
                delta, memory = self.dni(flat.detach(), self.memory)
            term = (delta * flat).sum() / (S * n)
        share = 0.0  # the bootstrapped part of the target, δ̂_2T·∂h_2T/∂h_T, apart when it is weighed apart
        if entering is not None and term.requires_grad and (not synthetic or self.discount != 1):
            (share,) = torch.autograd.grad(term, entering, retain_graph=True)
        (loss + term if synthetic else loss).backward()
        dni_loss = self.target = None
        if entering is not None:
            own = entering.grad - share if synthetic else entering.grad  # the chunk's own losses' part
            self.target = (own + self.discount * share) * (S * n)
            predicted, _ = self.dni(*self.boundary)
            dni_loss = nn.functional.mse_loss(predicted, self.target)
        self.carry, self.carry_pos, self.pos = detach(state), end, end
        self.boundary, self.memory = (flat.detach(), self.memory), memory
        return loss.detach(), n, dni_loss


def measure(model, dni, inputs, targets, K: int, window: int, windows: int, generator: torch.Generator) -> dict:
    """The chunked bias of this model at K, with and without the DNI, over ``windows``
    windows of ``window`` steps (as many again after each for the future losses)."""
    device = next(model.parameters()).device
    burn, x, y = (t.to(device) for t in sample_spans(inputs, targets, window, window, windows, generator))
    was_training = model.training
    model.eval()
    try:
        ds = synthetic_bias(model.system(), x, y, K, dni, burn=burn, lookahead=window)
    finally:
        model.train(was_training)
    return {"rel_bias_truncated": float(ds["rel_bias_truncated"]),
            "rel_bias_synthetic": float(ds["rel_bias_synthetic"]),
            "synthetic_error": float(ds["synthetic_error"].median())}
