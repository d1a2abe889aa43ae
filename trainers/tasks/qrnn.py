"""A quasi-recurrent network (QRNN; Bradbury et al. 2017), the model of the neuron-wise DNI paper.

Each layer computes its gates from a window of two inputs, with no recurrent
weight, and pools them elementwise (fo-pooling):

    z_t = tanh(W_z [x_{t-1}; x_t] + b_z),  f_t = σ(W_f [·] + b_f),  o_t = σ(W_o [·] + b_o)
    c_t = f_t ⊙ c_{t-1} + (1 − f_t) ⊙ z_t,  h_t = o_t ⊙ c_t

so the state of a layer is its cell ``c`` and its last input (which the next
step's window reads). ``QRNN`` runs whole chunks (the trainer's ``forward``:
the gates of every step in one matrix product, then the pooling step by step);
``QRNNStep`` is the same recurrence one step at a time, with the same
parameters, for biaskit (``initial_state`` / ``forward(x_t, state) -> (h_t,
state)``).
"""
from __future__ import annotations

import torch
from torch import nn


class QRNN(nn.Module):
    """Layers of fo-pooling QRNN over (batch, time, features); the state is per layer ``(c, last input)``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if not batch_first:
            raise ValueError("QRNN takes batch-first inputs")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(2 * n, 3 * hidden_size) for n in sizes)
        self.drop = nn.Dropout(dropout)

    def initial_state(self, batch_size: int):
        like = self.layers[0].weight
        return tuple((like.new_zeros(batch_size, self.hidden_size), like.new_zeros(batch_size, layer.in_features // 2))
                     for layer in self.layers)

    def forward(self, x: torch.Tensor, state=None):
        state = self.initial_state(x.shape[0]) if state is None else state
        new_state = []
        for i, (layer, (c, last)) in enumerate(zip(self.layers, state)):
            if i:
                x = self.drop(x)
            window = torch.cat([torch.cat([last[:, None], x[:, :-1]], dim=1), x], dim=2)  # [x_{t-1}; x_t]
            z, f, o = layer(window).chunk(3, dim=2)
            z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
            cells = []
            for t in range(x.shape[1]):
                c = f[:, t] * c + (1 - f[:, t]) * z[:, t]
                cells.append(c)
            new_state.append((c, x[:, -1]))
            x = o * torch.stack(cells, dim=1)
        return x, tuple(new_state)

    def step(self, x_t: torch.Tensor, state):
        """One step of ``forward`` (dropout between layers as there): ``(h_t of the top layer, new state)``."""
        new_state = []
        for i, (layer, (c, last)) in enumerate(zip(self.layers, state)):
            if i:
                x_t = self.drop(x_t)
            z, f, o = layer(torch.cat([last, x_t], dim=1)).chunk(3, dim=1)
            c = torch.sigmoid(f) * c + (1 - torch.sigmoid(f)) * torch.tanh(z)
            new_state.append((c, x_t))
            x_t = torch.sigmoid(o) * c
        return x_t, tuple(new_state)


class QRNNStep(nn.Module):
    """A QRNN one step at a time, its parameters shared: the cell biaskit measures."""

    step_output = True

    def __init__(self, qrnn: QRNN):
        super().__init__()
        self.qrnn = qrnn

    def initial_state(self, batch_size: int):
        return self.qrnn.initial_state(batch_size)

    def forward(self, x_t: torch.Tensor, state):
        return self.qrnn.step(x_t, state)
