"""Each built-in cell kind (biaskit.cells) on one layer, float64: its fused forward against its own step,
its backward (the gates' cotangents and the state cotangents) against torch.func.vjp of that step, and
its tangent against torch.func.jvp; and the registry from torch's module types to the kinds."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jvp, vjp

import biaskit
from biaskit import cells
from biaskit.cells import Layer, linear

B, R, F, H = 3, 5, 4, 6
KINDS = [(cells.RNN(), "tanh"), (cells.RNN(), "relu"), (cells.GRU(), None), (cells.LSTM(), None)]
IDS = ["RNN-tanh", "RNN-relu", "GRU", "LSTM"]


def one_layer(kind, bias=True, seed=0):
    """Weights, a window's inputs and a starting state of one layer of ``kind``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    gates = kind.gates * H
    w = {"weight_ih": randn(gates, F) / 2, "weight_hh": randn(gates, H) / 2,
         "bias_ih": randn(gates) / 4 if bias else None, "bias_hh": randn(gates) / 4 if bias else None}
    return w, randn(R, B, F), tuple(randn(B, H) for _ in kind.parts)


def stepped(kind, w, inp, hs, nonlinearity):
    """The layer stepped by ``kind.step``: every step's entering parts and h after it."""
    entering, h = [], []
    for t in range(inp.shape[0]):
        entering.append(hs)
        gi, gh = linear(inp[t], w["weight_ih"], w["bias_ih"]), linear(hs[0], w["weight_hh"], w["bias_hh"])
        hs = kind.step(gi, gh, hs, nonlinearity)
        h.append(hs[0])
    return [torch.stack(part) for part in zip(*entering)], torch.stack(h)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind, nonlinearity", KINDS, ids=IDS)
def test_the_fused_forward_and_what_it_keeps_are_the_kinds_step(kind, nonlinearity, bias):
    w, inp, hs = one_layer(kind, bias)
    weights = [w[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if w[k] is not None]
    h = kind.fused(inp, tuple(part[None] for part in hs), weights, nonlinearity)
    entering, h_ref = stepped(kind, w, inp, hs, nonlinearity)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-13)
    gates, kept = kind.kept(w, inp, entering[0], hs)
    assert len(kept) == len(kind.parts) - 1
    for part, ref in zip(kept, entering[1:]):  # an LSTM's cell states, which the kernel keeps to itself
        torch.testing.assert_close(part, ref, rtol=1e-12, atol=1e-13)
    assert (gates is None) == (kind.name != "LSTM")


@pytest.mark.parametrize("kind, nonlinearity", KINDS, ids=IDS)
def test_the_backward_is_the_vector_jacobian_product_of_the_step(kind, nonlinearity):
    """At every step t of the window: with the cotangent of the new state (what arrives at h from above
    plus the backward's own state cotangents after t), torch.func.vjp of ``kind.step`` gives the gates'
    cotangents δ_i[t], δ_h[t] and, through W_hh and the direct paths, the state cotangents before t."""
    w, inp, hs = one_layer(kind)
    entering, h = stepped(kind, w, inp, hs, nonlinearity)
    gates, kept = kind.kept(w, inp, entering[0], hs)
    arriving = torch.randn(R, B, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta_i, delta_h, b = kind.backward(Layer(w, inp, [entering[0], *kept], h, gates), arriving, nonlinearity)
    assert len(b) == len(kind.parts) and (delta_h is delta_i) == (kind.deltas == 1)
    for t in range(R):
        parts = tuple(part[t] for part in entering)
        gi, gh = linear(inp[t], w["weight_ih"], w["bias_ih"]), linear(parts[0], w["weight_hh"], w["bias_hh"])
        cotangent = (b[0][t] + arriving[t], *(part[t] for part in b[1:]))
        _, pull = vjp(lambda gi, gh: kind.step(gi, gh, parts, nonlinearity), gi, gh)
        want_i, want_h = pull(cotangent)
        torch.testing.assert_close(delta_i[t], want_i, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(delta_h[t], want_h, rtol=1e-12, atol=1e-14)
        if t:  # the state cotangents after step t - 1 (the backward leaves those after the last step zero)
            _, pull = vjp(lambda *hs: kind.step(gi, linear(hs[0], w["weight_hh"], w["bias_hh"]), hs, nonlinearity),
                          *parts)
            for got, want in zip(b, pull(cotangent)):
                torch.testing.assert_close(got[t - 1], want, rtol=1e-12, atol=1e-14)
    for part in b:
        assert not part[-1].any()


@pytest.mark.parametrize("kind, nonlinearity", KINDS, ids=IDS)
def test_the_tangent_is_the_jacobian_vector_product_of_the_step(kind, nonlinearity):
    """Several probes at once (a leading dimension of the pre-activations' tangents), the entering state
    held still, as the metric's probes move θ alone."""
    w, inp, hs = one_layer(kind)
    gen = torch.Generator().manual_seed(2)
    gi, gh = linear(inp[0], w["weight_ih"], w["bias_ih"]), linear(hs[0], w["weight_hh"], w["bias_hh"])
    dgi, dgh = (torch.randn(3, *g.shape, generator=gen, dtype=torch.float64) for g in (gi, gh))
    h, moved = kind.tangent(gi, gh, hs, dgi, dgh, nonlinearity)
    new = kind.step(gi, gh, hs, nonlinearity)
    torch.testing.assert_close(h, new[0], rtol=1e-14, atol=0)
    assert len(moved) == len(kind.parts)
    for probe in range(3):
        _, want = jvp(lambda gi, gh: kind.step(gi, gh, hs, nonlinearity), (gi, gh), (dgi[probe], dgh[probe]))
        for got, ref in zip(moved, want):
            torch.testing.assert_close(got[probe], ref, rtol=1e-12, atol=1e-14)


class MyLSTM(nn.LSTM):
    """A subclass finds its base's kind."""


@pytest.mark.parametrize("module, kind", [
    (nn.RNN(F, H), cells.RNN), (nn.RNNCell(F, H, nonlinearity="relu"), cells.RNN), (nn.GRU(F, H), cells.GRU),
    (nn.GRUCell(F, H), cells.GRU), (nn.LSTM(F, H, 2), cells.LSTM), (nn.LSTMCell(F, H), cells.LSTM),
    (MyLSTM(F, H), cells.LSTM), (nn.Linear(F, H), type(None)),
], ids=["RNN", "RNNCell", "GRU", "GRUCell", "LSTM", "LSTMCell", "subclass", "not-recurrent"])
def test_the_registry_gives_each_torch_module_its_kind(module, kind):
    assert type(cells.kind_of(module)) is kind
    if kind is not type(None):
        system = biaskit.wrap(module)
        assert system.cell is cells.kind_of(module) and system.components == kind.parts
        assert system.layout.size == len(kind.parts) * H * getattr(module, "num_layers", 1)


@pytest.mark.parametrize("module", [nn.RNN(F, H, num_layers=2, nonlinearity="relu"),
                                    nn.GRU(F, H, num_layers=2, batch_first=True),
                                    nn.LSTM(F, H, num_layers=2, batch_first=True)], ids=["RNN", "GRU", "LSTM"])
def test_a_modules_chunk_by_its_fused_forward_is_its_steps(module):
    """``TorchRecurrent.run`` (the module's own forward over a chunk, what ``synthetic_bias`` uses)
    against ``RecurrentSystem.run`` stepping it: states, reads and their gradients, in float64, with a
    frozen weight and through an encoder."""
    from biaskit.recurrent import RecurrentSystem

    torch.manual_seed(0)
    module, encoder = module.double(), nn.Linear(2, F).double()
    module.weight_hh_l1.requires_grad_(False)
    system = biaskit.wrap(module, nn.Linear(H, 3).double(), nn.CrossEntropyLoss(reduction="none"), encoder=encoder)
    params, x = system.params(), torch.randn(B, R, 2, dtype=torch.float64)
    state = torch.randn(B, system.layout.size, dtype=torch.float64, requires_grad=True)
    fused, stepped = system.run(params, state, x), RecurrentSystem.run(system, params, state, x)
    for got, want in zip(fused, stepped):
        torch.testing.assert_close(got, want)
    weights = [state, *params.values()]
    cotangent = torch.randn_like(fused[1])
    torch.testing.assert_close(torch.autograd.grad((fused[1] * cotangent).sum() + fused[0].sum(), weights),
                               torch.autograd.grad((stepped[1] * cotangent).sum() + stepped[0].sum(), weights))
