"""One protocol for "a recurrent system" and adapters for torch's recurrent modules.

A system is a step ``H(h, x; θ)`` on a *flat* state ``h`` of shape (batch, D)
(every layer's h, and c for an LSTM, concatenated), an output taken from the
state, a readout and a per-sample loss.  Everything downstream (decompose,
norms, the trainers' diagnostics) sees only this protocol.

The built-in adapters write each cell's equations as plain tensor operations
with PyTorch's parameter names and layouts: the fused ``nn.LSTM`` kernels have
no ``vmap`` batching rule, and per-step, per-sample vector-Jacobian products
are what the decomposition is made of.  Tests check every adapter against the
module's own forward pass.

An optional ``encoder`` (an embedding, say) maps each input ``x_t`` before the
step; its parameters enter every step and so count in θ, prefixed ``encoder.``.

A user module that defines one step is accepted when it has
``initial_state(batch_size)`` returning the zero state (a tensor of shape
(batch, n) or a tuple of them) and ``forward(x_t, state) -> new state``.
Its output is the state, or the first element of a tuple state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from .errors import InputError

ACCEPTED = (
    "nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell, or a module "
    "with initial_state(batch_size) and forward(x_t, state) -> state"
)

Params = dict[str, torch.Tensor]


def _linear(x, weight, bias):
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


def _gates(p: Params, x, h, suffix: str):
    """Input and hidden pre-activations of one layer, with PyTorch's names."""
    gi = _linear(x, p["weight_ih" + suffix], p.get("bias_ih" + suffix))
    gh = _linear(h, p["weight_hh" + suffix], p.get("bias_hh" + suffix))
    return gi, gh


def rnn_cell(p, x, hs, suffix, nonlinearity):
    gi, gh = _gates(p, x, hs[0], suffix)
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    return (act(gi + gh),)


def gru_cell(p, x, hs, suffix, nonlinearity=None):
    (h,) = hs
    gi, gh = _gates(p, x, h, suffix)
    i_r, i_z, i_n = gi.chunk(3, dim=1)
    h_r, h_z, h_n = gh.chunk(3, dim=1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return ((1 - z) * n + z * h,)


def lstm_cell(p, x, hs, suffix, nonlinearity=None):
    h, c = hs
    gi, gh = _gates(p, x, h, suffix)
    i, f, g, o = (gi + gh).chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


_CELLS = {"RNN": rnn_cell, "GRU": gru_cell, "LSTM": lstm_cell}


@dataclass
class StateLayout:
    """Which layer and component each flat state dimension belongs to."""

    layer: list[int]
    component: list[str]
    unit: list[int]

    @classmethod
    def of(cls, blocks: list[tuple[int, str, int]]) -> "StateLayout":
        layout = cls([], [], [])
        for layer, component, size in blocks:
            layout.layer += [layer] * size
            layout.component += [component] * size
            layout.unit += list(range(size))
        return layout

    @property
    def size(self) -> int:
        return len(self.unit)


class RecurrentSystem:
    """A recurrent module, its readout and its per-sample loss, as pure functions."""

    kind: str
    input_size: int | None
    time_major: bool
    layout: StateLayout

    def __init__(self, module: nn.Module, readout: nn.Module | None, loss_fn: Callable | None,
                 encoder: nn.Module | None = None):
        self.module = module
        self.readout = readout if readout is not None else nn.Identity()
        self.loss_fn = loss_fn
        self.encoder = encoder

    # --- parameters -------------------------------------------------------
    def params(self) -> Params:
        """θ of the step: the module's parameters as in ``named_parameters()``, then the encoder's."""
        params = dict(self.module.named_parameters())
        if self.encoder is not None:
            params.update({"encoder." + n: p for n, p in self.encoder.named_parameters()})
        return params

    def encode(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The input the recurrent module sees at one step."""
        if self.encoder is None:
            return x
        mine = {n.removeprefix("encoder."): p for n, p in params.items() if n.startswith("encoder.")}
        return functional_call(self.encoder, mine, (x,))

    def readout_params(self) -> Params:
        return dict(self.readout.named_parameters())

    # --- the recurrence ---------------------------------------------------
    def step(self, params: Params, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One step of the recurrence on the flat state: (batch, D) -> (batch, D)."""
        raise NotImplementedError

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """The top layer's output read off the flat state."""
        raise NotImplementedError

    def initial_state(self, h0, batch: int) -> torch.Tensor:
        """The flat initial state from the module's own h0 format (zeros if None)."""
        raise NotImplementedError

    def flatten(self, native) -> torch.Tensor:
        """A state in the module's own format as the flat (batch, D) state of this layout."""
        return self.initial_state(native, _batch_of(native))

    def unflatten(self, flat: torch.Tensor):
        """The flat (batch, D) state in the module's own format."""
        raise NotImplementedError

    def _like(self) -> torch.Tensor:
        """A tensor with the module's dtype and device, for new states."""
        return next(self.module.parameters())

    # --- readout and loss -------------------------------------------------
    def loss(self, readout_params: Params, state: torch.Tensor, targets) -> torch.Tensor:
        """Per-sample loss at a state: ``loss_fn(readout(output(state)), targets)``."""
        if self.loss_fn is None:
            raise InputError("this system has no loss: pass loss_fn= to biaskit.wrap")
        logits = functional_call(self.readout, readout_params, (self.output(state),))
        loss = self.loss_fn(logits, targets)
        if loss.dim() == 0 or loss.shape[0] != state.shape[0]:
            raise InputError(
                f"loss_fn returned shape {tuple(loss.shape)}, expected one loss per sample "
                f"({state.shape[0]},): use reduction='none'"
            )
        return loss.reshape(loss.shape[0], -1).sum(dim=1)

    # --- inputs -----------------------------------------------------------
    def batch_first(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs as (batch, time, features), checked against the module."""
        want = 3 if self.encoder is None else 2
        if not torch.is_tensor(inputs) or inputs.dim() < want or (self.encoder is None and inputs.dim() > 3):
            shape = tuple(inputs.shape) if torch.is_tensor(inputs) else type(inputs).__name__
            order = "(time, batch, features)" if self.time_major else "(batch, time, features)"
            if self.encoder is not None:
                order = order.replace("features", "...")
            raise InputError(f"inputs must be a {want}-d tensor {order}, got {shape}")
        x = inputs.transpose(0, 1) if self.time_major else inputs
        if x.shape[1] == 0:
            raise InputError("the window is empty: inputs have 0 time steps")
        if self.encoder is None and self.input_size is not None and x.shape[2] != self.input_size:
            raise InputError(
                f"inputs have {x.shape[2]} features but the {self.kind} expects {self.input_size}"
            )
        p = next(self.module.parameters(), None)
        if p is not None and (x.device != p.device or (self.encoder is None and x.dtype != p.dtype)):
            raise InputError(
                f"inputs are {x.dtype} on {x.device} but the module is {p.dtype} on {p.device}: "
                "move one to match the other"
            )
        return x

    def describe(self) -> dict:
        """Attributes that name the system in a results Dataset."""
        return {
            "module": self.kind,
            "input_size": -1 if self.input_size is None else self.input_size,
            "state_size": self.layout.size,
            "num_layers": max(self.layout.layer) + 1,
            "readout": type(self.readout).__name__,
            "encoder": type(self.encoder).__name__ if self.encoder is not None else "none",
            "loss": getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__) if self.loss_fn else "none",
        }


class TorchRecurrent(RecurrentSystem):
    """nn.RNN / nn.GRU / nn.LSTM (any layers, batch_first either way) and their cells."""

    def __init__(self, module, readout, loss_fn, encoder=None):
        super().__init__(module, readout, loss_fn, encoder)
        name = type(module).__name__
        self.is_cell = isinstance(module, nn.RNNCellBase)
        self.kind = name
        base = name.removesuffix("Cell")
        self.cell = _CELLS[base]
        self.nonlinearity = getattr(module, "nonlinearity", "tanh")
        self.num_layers = 1 if self.is_cell else module.num_layers
        self.hidden = module.hidden_size
        self.input_size = module.input_size
        self.time_major = not self.is_cell and not module.batch_first
        self.components = ("h", "c") if base == "LSTM" else ("h",)
        if not self.is_cell:
            if module.bidirectional:
                raise InputError(f"bidirectional {name} is not a causal recurrence; use one direction")
            if getattr(module, "proj_size", 0):
                raise InputError("LSTM with proj_size > 0 is not supported yet")
            if module.dropout and module.training:
                raise InputError(
                    f"{name} has dropout={module.dropout} in training mode: call .eval() "
                    "first, biaskit measures the deterministic recurrence"
                )
        self.layout = StateLayout.of(
            [(l, comp, self.hidden) for l in range(self.num_layers) for comp in self.components]
        )

    def _suffix(self, layer: int) -> str:
        return "" if self.is_cell else f"_l{layer}"

    def _split(self, state):
        parts = state.split(self.hidden, dim=1)
        n = len(self.components)
        return [parts[l * n:(l + 1) * n] for l in range(self.num_layers)]

    def step(self, params, state, x):
        new, inp = [], self.encode(params, x)
        for layer, hs in enumerate(self._split(state)):
            hs = self.cell(params, inp, hs, self._suffix(layer), self.nonlinearity)
            new += hs
            inp = hs[0]
        return torch.cat(new, dim=1)

    def output(self, state):
        return self._split(state)[-1][0]

    def initial_state(self, h0, batch):
        if h0 is None:
            return self._like().new_zeros(batch, self.layout.size)
        parts = h0 if isinstance(h0, (tuple, list)) else (h0,)
        if len(parts) != len(self.components):
            raise InputError(f"h0 for {self.kind} must have {len(self.components)} part(s) {self.components}")
        expect = (batch, self.hidden) if self.is_cell else (self.num_layers, batch, self.hidden)
        for part in parts:
            if tuple(part.shape) != expect:
                raise InputError(f"h0 has shape {tuple(part.shape)}, expected {expect}")
        if self.is_cell:
            return torch.cat(parts, dim=1)
        return torch.cat([part[l] for l in range(self.num_layers) for part in parts], dim=1)

    def unflatten(self, flat):
        layers = self._split(flat)
        parts = [torch.stack([hs[i] for hs in layers]) if not self.is_cell else layers[0][i]
                 for i in range(len(self.components))]
        return tuple(parts) if len(parts) > 1 else parts[0]


class CustomStep(RecurrentSystem):
    """A user module with ``initial_state(batch)`` and ``forward(x_t, state) -> state``."""

    def __init__(self, module, readout, loss_fn, encoder=None):
        super().__init__(module, readout, loss_fn, encoder)
        self.kind = type(module).__name__
        self.input_size = getattr(module, "input_size", None)
        self.time_major = False
        zero = module.initial_state(1)
        self.is_tuple = isinstance(zero, (tuple, list))
        parts = tuple(zero) if self.is_tuple else (zero,)
        self.sizes = [p.shape[-1] for p in parts]
        names = getattr(module, "state_names", None) or (
            [f"s{i}" for i in range(len(parts))] if self.is_tuple else ["h"]
        )
        self.layout = StateLayout.of([(0, name, size) for name, size in zip(names, self.sizes)])

    def _unflatten(self, state):
        parts = state.split(self.sizes, dim=1)
        return tuple(parts) if self.is_tuple else parts[0]

    @staticmethod
    def _flatten(native):
        return torch.cat(tuple(native), dim=1) if isinstance(native, (tuple, list)) else native

    def step(self, params, state, x):
        mine = {n: p for n, p in params.items() if not n.startswith("encoder.")}
        buffers = dict(self.module.named_buffers())
        new = functional_call(self.module, {**buffers, **mine}, (self.encode(params, x), self._unflatten(state)))
        return self._flatten(new)

    def output(self, state):
        native = self._unflatten(state)
        return native[0] if self.is_tuple else native

    def unflatten(self, flat):
        return self._unflatten(flat)

    def initial_state(self, h0, batch):
        if h0 is None:
            return self._flatten(self.module.initial_state(batch)).to(self._like())
        flat = self._flatten(h0)
        if tuple(flat.shape) != (batch, self.layout.size):
            raise InputError(f"h0 flattens to {tuple(flat.shape)}, expected {(batch, self.layout.size)}")
        return flat


def _batch_of(native) -> int:
    first = native[0] if isinstance(native, (tuple, list)) else native
    return first.shape[-2]


def wrap(module: nn.Module, readout: nn.Module | None = None, loss_fn: Callable | None = None,
         encoder: nn.Module | None = None) -> RecurrentSystem:
    """The recurrent system of ``module``; ``loss_fn`` must return one loss per sample.

    ``encoder`` (optional) maps each step's raw input before the module sees it.
    """
    if isinstance(module, RecurrentSystem):
        return module
    if isinstance(module, (nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell)):
        return TorchRecurrent(module, readout, loss_fn, encoder)
    if isinstance(module, nn.Module) and callable(getattr(module, "initial_state", None)):
        return CustomStep(module, readout, loss_fn, encoder)
    raise InputError(f"{type(module).__name__} is not a recurrent module: biaskit accepts {ACCEPTED}")
