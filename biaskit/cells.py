"""One class per built-in cell kind (nn.RNN, nn.GRU, nn.LSTM and their ``*Cell`` modules), and the
registry from torch's module types to them.

A kind holds everything biaskit writes out for its cell: the state's parts
(``h``, or ``h`` and ``c``), the gate count, the step on the pre-activations
(``recurrent.TorchRecurrent.step``, in PyTorch's gate order and layouts), and
the fast path's pieces (``fastpath``): the fused forward by PyTorch's kernel,
what that kernel keeps to itself (an LSTM's gates and cell states), the
backward recurrence over a layer's window (the gates' cotangents δ and the
state cotangents) and the forward-mode product of one step (the tangent the
estimated metric's probes take). ``tests/test_cell_kinds.py`` checks each
backward and tangent against ``torch.func`` on the kind's own step.

Custom cells (a QRNN, say) are not kinds: they go through ``recurrent.CustomStep``
and the generic path.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


def linear(x, weight, bias):
    return x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)


@contextmanager
def no_tf32(t: torch.Tensor):
    """cuDNN runs float32 RNNs in TF32 on Ampere and later GPUs by default (``torch.backends.cudnn.rnn``),
    with 10-bit mantissas: h would be ~1e-3 off the float32 in which the gates are recomputed and the
    backward runs, and the decomposition would be no model's exact one. Full float32 while ``t``'s
    layer runs (torch < 2.9: the legacy ``allow_tf32`` flag)."""
    if t.device.type != "cuda" or t.dtype != torch.float32:
        yield
        return
    flags, name, off = (torch.backends.cudnn.rnn, "fp32_precision", "ieee") \
        if hasattr(torch.backends.cudnn.rnn, "fp32_precision") else (torch.backends.cudnn, "allow_tf32", False)
    before = getattr(flags, name)
    setattr(flags, name, off)
    try:
        yield
    finally:
        setattr(flags, name, before)


def pre_activations(w: dict, inputs: torch.Tensor, h_prev: torch.Tensor):
    """Every step's input and hidden pre-activations at once, (R, B, gates·H) each: two matmuls over
    the window, after the fused kernel, which keeps its own to itself."""
    gi = linear(inputs.flatten(0, 1), w["weight_ih"], w["bias_ih"])
    gh = linear(h_prev.flatten(0, 1), w["weight_hh"], w["bias_hh"])
    return gi.reshape(*h_prev.shape[:2], -1), gh.reshape(*h_prev.shape[:2], -1)


@dataclass
class Layer:
    """One layer's forward run over the window (the fast path's, read by ``CellKind.backward``)."""

    weights: dict          # weight_ih, weight_hh, bias_ih, bias_hh (None when absent)
    inputs: torch.Tensor   # (R, B, F_l) what W_ih multiplies
    entering: list         # (R, B, H) each part of the state (h, c) entering each step
    h: torch.Tensor        # (R, B, H) h after each step
    gates: torch.Tensor | None = None  # (R, B, 4H) an LSTM's activated gates (``LSTM.kept``)


class CellKind:
    """A built-in cell: its state parts, gates, step, fused forward, backward and tangent."""

    name: str
    parts: tuple[str, ...] = ("h",)  # the state's parts, in the flat layout's order within a layer
    gates: int                       # pre-activations per hidden unit
    deltas: int = 1                  # distinct gate cotangents a layer's weights multiply (δ_i, and δ_h if apart)

    def step(self, gi, gh, hs, nonlinearity):
        """The new state's parts from the input and hidden pre-activations and the entering parts."""
        raise NotImplementedError

    def fused(self, inp: torch.Tensor, hx: tuple, weights: list, nonlinearity: str) -> torch.Tensor:
        """One layer's h after each step (R, B, H), by PyTorch's fused kernel (oneDNN, cuDNN); ``hx``
        the entering parts, (1, B, H) each."""
        raise NotImplementedError

    def kept(self, w: dict, inp: torch.Tensor, h_prev: torch.Tensor, hs):
        """What the fused kernel keeps to itself and the backward needs: (the gates or None, the state
        parts but h entering each step)."""
        return None, []

    def backward(self, layer: Layer, arriving, nonlinearity):
        """The backward recurrence over a layer's window, given what reaches each step's h from above:
        δ_i, δ_h (the cotangents of the input and hidden pre-activations, (R, B, gates·H)) and the
        cotangents of the state parts after each step as the next step reads them."""
        raise NotImplementedError

    def tangent(self, gi, gh, hs, dgi, dgh, nonlinearity):
        """The forward-mode product of one step: (its pre-activations, the entering state, their
        tangents) -> the new h and the tangents of the new state's parts."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"cells.{self.name}"


class RNN(CellKind):
    """Elman: ``h' = act(gi + gh)``, act tanh or relu."""

    name, gates = "RNN", 1

    def step(self, gi, gh, hs, nonlinearity):
        """Elman: h' = act(gi + gh)."""
        act = torch.tanh if nonlinearity == "tanh" else torch.relu
        return (act(gi + gh),)

    def fused(self, inp, hx, weights, nonlinearity):
        run = torch.rnn_tanh if nonlinearity == "tanh" else torch.rnn_relu
        return run(inp, hx[0], weights, len(weights) == 4, 1, 0.0, False, False, False)[0]

    def backward(self, layer: Layer, arriving, nonlinearity):
        """``h = act(gi + gh)``: ``δ = dh·act'`` (``1 − h²`` for tanh, ``h > 0`` for relu), ``b_h' = δ W_hh``."""
        w, h_out = layer.weights, layer.h
        slope = 1 - h_out**2 if nonlinearity == "tanh" else (h_out > 0).to(h_out.dtype)
        R = h_out.shape[0]
        delta, b_h = torch.empty(*h_out.shape[:2], w["weight_hh"].shape[0], dtype=h_out.dtype,
                                 device=h_out.device), torch.zeros_like(h_out)
        W_hh = w["weight_hh"]
        for t in reversed(range(R)):
            torch.mul(b_h[t] + arriving[t], slope[t], out=delta[t])
            if t:
                torch.mm(delta[t], W_hh, out=b_h[t - 1])
        return delta, delta, [b_h]

    def tangent(self, gi, gh, hs, dgi, dgh, nonlinearity):
        """``h' = act(gi + gh)``: ``dh' = act'·(dgi + dgh)``."""
        h = torch.tanh(gi + gh) if nonlinearity == "tanh" else torch.relu(gi + gh)
        slope = 1 - h**2 if nonlinearity == "tanh" else (h > 0).to(h.dtype)
        return h, [slope * (dgi + dgh)]


class GRU(CellKind):
    """``r, z = σ(i_r + h_r), σ(i_z + h_z)``, ``n = tanh(i_n + r h_n)``, ``h' = (1 − z) n + z h``."""

    name, gates, deltas = "GRU", 3, 2  # the reset gate scales h_n alone: δ_h differs from δ_i

    def step(self, gi, gh, hs, nonlinearity=None):
        (h,) = hs
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return ((1 - z) * n + z * h,)

    def fused(self, inp, hx, weights, nonlinearity):
        return torch.gru(inp, hx[0], weights, len(weights) == 4, 1, 0.0, False, False, False)[0]

    def backward(self, layer: Layer, arriving, nonlinearity):
        """With ``n = tanh(i_n + r·h_n)`` and ``h = (1 − z) n + z h'``, every δ is ``dh`` times a coefficient:
        ``δ_n = dh (1 − z)(1 − n²)``, ``δ_z = dh (h' − n) σ'(z)``, ``δ_r = δ_n h_n σ'(r)``, and the hidden
        pre-activation's ``δ_hn = δ_n r``; then ``b_h' = δ_h W_hh + dh·z``."""
        w, (h_prev,) = layer.weights, layer.entering
        gi, gh = pre_activations(w, layer.inputs, h_prev)
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        d_n = (1 - z) * (1 - n**2)
        d_r, d_z = d_n * h_n * r * (1 - r), (h_prev - n) * z * (1 - z)
        per_dh_i = torch.stack([d_r, d_z, d_n], dim=2)      # (R, B, 3, H): δ_i / dh
        per_dh_h = torch.stack([d_r, d_z, d_n * r], dim=2)  # δ_h / dh
        R = gi.shape[0]
        dh_all, b_h = torch.empty_like(h_prev), torch.zeros_like(h_prev)
        delta_h = torch.empty_like(gh)
        W_hh = w["weight_hh"]
        for t in reversed(range(R)):
            dh = torch.add(b_h[t], arriving[t], out=dh_all[t])
            torch.mul(dh[:, None], per_dh_h[t], out=delta_h[t].view(dh.shape[0], 3, -1))
            if t:
                torch.addcmul(delta_h[t] @ W_hh, dh, z[t], out=b_h[t - 1])
        delta_i = (dh_all[:, :, None] * per_dh_i).flatten(2)
        return delta_i, delta_h, [b_h]

    def tangent(self, gi, gh, hs, dgi, dgh, nonlinearity):
        """``dh' = dz (h − n) + (1 − z) dn`` with ``dn = tanh'(·)(di_n + dr h_n + r dh_n)``."""
        (h,) = hs
        (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, dim=-1), gh.chunk(3, dim=-1)
        (di_r, di_z, di_n), (dh_r, dh_z, dh_n) = dgi.chunk(3, dim=-1), dgh.chunk(3, dim=-1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        dr, dz = r * (1 - r) * (di_r + dh_r), z * (1 - z) * (di_z + dh_z)
        dn = (1 - n**2) * (di_n + dr * h_n + r * dh_n)
        return (1 - z) * n + z * h, [dz * (h - n) + (1 - z) * dn]


class LSTM(CellKind):
    """``c' = σ(f) c + σ(i) tanh(g)``, ``h' = σ(o) tanh(c')``, gates in PyTorch's order i, f, g, o."""

    name, parts, gates = "LSTM", ("h", "c"), 4

    def step(self, gi, gh, hs, nonlinearity=None):
        h, c = hs
        i, f, g, o = (gi + gh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def fused(self, inp, hx, weights, nonlinearity):
        return torch.lstm(inp, hx, weights, len(weights) == 4, 1, 0.0, False, False, False)[0]

    def kept(self, w, inp, h_prev, hs):
        """The activated gates ``[σ(i), σ(f), tanh(g), σ(o)]`` (R, B, 4H) and the cell state entering
        each step (R, B, H), which the fused kernel keeps to itself: ``c = f c' + i g``, a scan of one
        elementwise operation a step. The backward recurrence reuses the gates."""
        gates, gh = pre_activations(w, inp, h_prev)
        gates += gh
        del gh
        i, f, g, o = gates.chunk(4, dim=-1)
        for gate in (i, f, o):
            gate.sigmoid_()
        g.tanh_()
        ig = i * g
        c_prev = torch.empty_like(ig)
        c_prev[0] = hs[1]
        for t in range(1, c_prev.shape[0]):
            torch.addcmul(ig[t - 1], f[t - 1], c_prev[t - 1], out=c_prev[t])
        return gates, [c_prev]

    def backward(self, layer: Layer, arriving, nonlinearity):
        """δ = ∂L/∂(gates' pre-activations) and the recurrent state cotangents ``(b_h, b_c)``, stepping
        back: with ``c = f c' + i g`` and ``h = o tanh(c)``, ``dc = b_c + dh·o·(1 − tanh²c)``,
        ``δ = [dc·g·σ'(i), dc·c'·σ'(f), dc·i·(1 − g²), dh·tanh(c)·σ'(o)]``, then ``b_h' = δ W_hh``,
        ``b_c' = dc·f``."""
        w, (h_prev, c_prev), gates = layer.weights, layer.entering, layer.gates
        layer.gates = None  # spent here: its storage holds δ
        i, f, g, o = gates.chunk(4, dim=-1)
        tanh_c = (f * c_prev).addcmul_(i, g).tanh_()
        through_c = o * (1 - tanh_c**2)                                             # dh → dc
        per_dc = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g**2)], dim=2)  # (R, B, 3, H)
        per_dh = tanh_c * o * (1 - o)
        del tanh_c
        f = f.clone()
        delta = gates
        R = delta.shape[0]
        b_h, b_c = torch.zeros_like(h_prev), torch.zeros_like(c_prev)
        W_hh = w["weight_hh"]
        for t in reversed(range(R)):
            dh = b_h[t] + arriving[t]
            dc = torch.addcmul(b_c[t], dh, through_c[t])
            step = delta[t].view(dh.shape[0], 4, -1)
            torch.mul(dc[:, None], per_dc[t], out=step[:, :3])
            torch.mul(dh, per_dh[t], out=step[:, 3])
            if t:
                torch.mm(delta[t], W_hh, out=b_h[t - 1])
                torch.mul(dc, f[t], out=b_c[t - 1])
        return delta, delta, [b_h, b_c]

    def tangent(self, gi, gh, hs, dgi, dgh, nonlinearity):
        """``dc' = σ'(f) df c + σ'(i) di tanh g + σ(i) tanh'(g) dg``, ``dh' = σ'(o) do tanh c' +
        σ(o) tanh'(c') dc'``."""
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        di, df, dg, do = (dgi + dgh).chunk(4, dim=-1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        tc = (f * hs[1] + i * g).tanh()
        dc = f * (1 - f) * df * hs[1] + i * (1 - i) * di * g + i * (1 - g**2) * dg
        return o * tc, [o * (1 - o) * do * tc + o * (1 - tc**2) * dc, dc]


#: torch's module types -> their kind (a subclass finds its base's).
KINDS: dict[type, CellKind] = {}
for _kind, _types in ((RNN(), (nn.RNN, nn.RNNCell)), (GRU(), (nn.GRU, nn.GRUCell)), (LSTM(), (nn.LSTM, nn.LSTMCell))):
    KINDS.update(dict.fromkeys(_types, _kind))


def kind_of(module: nn.Module) -> CellKind | None:
    """The kind of a built-in recurrent module (or of a subclass of one); None for anything else."""
    return next((KINDS[t] for t in type(module).__mro__ if t in KINDS), None)
