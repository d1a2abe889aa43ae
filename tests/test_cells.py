"""Cells of the kinds other packages ship, each audited against its own hand-unrolled, detach-based
truncation: the truncated gradient and the relative bias at several K, and φ against retain_grad
on cloned states, in float32 and float64. A cell biaskit cannot follow is refused, never zeroed."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import biaskit

B, R, F, N = 5, 8, 3, 4


class DictState(nn.Module):
    """State {"h": (B, N), "m": (B, N)}: a leaky memory beside a tanh unit."""

    def __init__(self):
        super().__init__()
        self.W, self.U, self.a = nn.Parameter(torch.randn(N, N) / 2), nn.Parameter(torch.randn(N, F)), \
            nn.Parameter(torch.rand(N))

    def initial_state(self, batch):
        return {"h": torch.zeros(batch, N), "m": torch.zeros(batch, N)}

    def forward(self, x, state):
        m = torch.sigmoid(self.a) * state["m"] + x @ self.U.T
        return {"h": torch.tanh(state["h"] @ self.W.T + m), "m": m}


class Heads(nn.Module):
    """State (B, heads, width): each head its own recurrence."""

    def __init__(self, heads=2, width=3):
        super().__init__()
        self.W = nn.Parameter(torch.randn(heads, width, width) / 2)
        self.U = nn.Parameter(torch.randn(heads, width, F))
        self.heads, self.width = heads, width

    def initial_state(self, batch):
        return torch.zeros(batch, self.heads, self.width)

    def forward(self, x, h):
        return torch.tanh(torch.einsum("hij,bhj->bhi", self.W, h) + torch.einsum("hij,bj->bhi", self.U, x))


class FrozenMask(nn.Module):
    """A fixed connectivity mask held as a parameter with requires_grad=False."""

    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(N, N)), nn.Parameter(torch.randn(N, F))
        self.mask = nn.Parameter(torch.tril(torch.ones(N, N)), requires_grad=False)

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        return torch.tanh(h @ (self.W * self.mask).T / 2 + x @ self.U.T)


class Reset(nn.Module):
    """A step that ignores the incoming state (a reset) when the input says so, chosen by Python
    control flow on ``.item()``, which vmap cannot batch; ``use_item=False`` is the same choice
    per window with ``torch.where``, which it can."""

    def __init__(self, use_item=True):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(N, N) / 2), nn.Parameter(torch.randn(N, F))
        self.use_item = use_item

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        if not self.use_item:
            return torch.where(x[:, :1] > 0, torch.tanh(x @ self.U.T), torch.tanh(h @ self.W.T + x @ self.U.T))
        if x[0, 0].item() > 0:
            return torch.tanh(x @ self.U.T)  # the incoming state is ignored
        return torch.tanh(h @ self.W.T + x @ self.U.T)


class ShiftRegister(nn.Module):
    """A buffer of the last L values, written in place into the incoming state."""

    def __init__(self, length=4):
        super().__init__()
        self.w, self.u = nn.Parameter(torch.randn(length) / 2), nn.Parameter(torch.randn(F))
        self.length = length

    def initial_state(self, batch):
        return torch.zeros(batch, self.length)

    def forward(self, x, buf):
        new = torch.tanh(self.w[0] * buf.sum(1) + (self.w[1:] * buf[:, 1:].sum(1, keepdim=True)).sum(1) + x @ self.u)
        buf[:, 1:] = buf[:, :-1].clone()
        buf[:, 0] = new
        return buf


class LRU(nn.Module):
    """A complex diagonal recurrence (LRU, S4-style): h' = λ ⊙ h + B x, λ = exp(−exp(ν) + iθ)."""

    def __init__(self):
        super().__init__()
        self.nu, self.theta = nn.Parameter(torch.rand(N) - 1), nn.Parameter(torch.rand(N) * 3)
        self.B = nn.Parameter(torch.randn(N, F, dtype=torch.complex64) / 2)

    def initial_state(self, batch):
        return torch.zeros(batch, N, dtype=torch.complex64)

    def forward(self, x, h):
        lam = torch.exp(torch.complex(-torch.exp(self.nu), self.theta))
        return lam * h + x.to(self.B.dtype) @ self.B.T


class OutputState(nn.Module):
    """forward(x, state) -> (output, new state), the output reading x_t: the packages' convention."""

    step_output = True

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(F, N)
        self.out = nn.Linear(N + F, N)

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        return torch.tanh(self.out(torch.cat([h, x], dim=1))), self.cell(x, h)


class PrivateDict(nn.Module):
    """Registers its parameters but reads them through a dict made in __init__."""

    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(N, N) / 2), nn.Parameter(torch.randn(N, F))
        self._p = {"W": self.W, "U": self.U}

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        return torch.tanh(h @ self._p["W"].T + x @ self._p["U"].T)


CELLS = {"dict state": DictState, "heads": Heads, "frozen mask": FrozenMask, "reset": Reset,
         "shift register": ShiftRegister, "complex LRU": LRU, "output and state": OutputState}


def first_leaf(state):
    return pytree.tree_leaves(state)[0]


def readout_input(cell, out, state):
    return out if getattr(cell, "step_output", False) else first_leaf(state)


class RealPart(nn.Module):
    """The readout of a complex state reads its real part."""

    def forward(self, z):
        return z.real


def unroll(cell, x, split=None, keep=None):
    """The cell's own step-by-step run (the state cloned before each step, as the cell may write into
    it); the state entering step ``split`` detached; ``keep`` collects each step's new state."""
    state = pytree.tree_map(lambda t: t.to(x.device, t.dtype if t.is_complex() else x.dtype),
                            cell.initial_state(x.shape[0]))
    out = None
    for t in range(x.shape[1]):
        state = pytree.tree_map(lambda s: s.detach().clone() if t == split else s.clone(), state)
        result = cell(x[:, t], state)
        out, state = result if getattr(cell, "step_output", False) else (None, result)
        if keep is not None:
            state = pytree.tree_map(lambda s: s.clone(), state)
            for leaf in pytree.tree_leaves(state):
                leaf.retain_grad()
            keep.append(state)
    return out, state


def naive(cell, head, x, y, K=None):
    """ĝ_K by hand: detach the state entering step R−K, mean squared-error loss; trainable only."""
    out, state = unroll(cell, x, None if K is None else x.shape[1] - 1 - K)
    loss = (head(readout_input(cell, out, state)) - y).pow(2).sum(1).mean()
    named = [(n, p) for n, p in cell.named_parameters() if p.requires_grad]
    named += [("readout." + n, p) for n, p in head.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def norm(grads):
    return math.sqrt(sum(float(g.abs().pow(2).sum()) for g in grads.values()))


def setup(name, dtype, seed=0):
    torch.manual_seed(seed)
    cell = CELLS[name]()
    cell = cell.to(dtype) if name != "complex LRU" else cell.to(torch.complex128 if dtype == torch.float64 else
                                                                 torch.complex64)
    if name == "complex LRU":  # ν and θ stay real
        cell.nu.data, cell.theta.data = cell.nu.data.real.to(dtype), cell.theta.data.real.to(dtype)
    first = {"heads": nn.Flatten(), "complex LRU": RealPart()}.get(name, nn.Identity())
    head = nn.Sequential(first, nn.Linear(6 if name == "heads" else N, 2)).to(dtype)
    x = torch.randn(B, R, F, dtype=dtype)
    if name == "reset":  # every window resets at the same steps: the .item() branch is the batch's
        x[:, :, 0] = x[:, :, 0].abs() * torch.tensor([1.0, -1.0]).repeat(R // 2).to(dtype)
    y = torch.randn(B, 2, dtype=dtype)
    return cell, head, x, y


def squared(out, y):
    return (out - y).pow(2).sum(1)


def wrap(cell, head):
    return biaskit.wrap(cell, head, squared)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(CELLS))
def test_each_kind_of_cell_is_measured_right(name, dtype):
    cell, head, x, y = setup(name, dtype)
    system = wrap(cell, head)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    full = naive(cell, head, x, y)
    got_full = biaskit.truncated_gradient(system, x, y)
    assert set(got_full) == set(full)
    for n in full:
        torch.testing.assert_close(got_full[n], full[n], rtol=tol, atol=tol * norm(full))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reset cell is decomposed step by step, with a warning
        ds = biaskit.decompose(system, x, y, psi=True)
    for K in (0, 1, 3, R - 2):
        trunc = naive(cell, head, x, y, K)
        for n in full:
            torch.testing.assert_close(biaskit.truncated_gradient(system, x, y, K)[n], trunc[n], rtol=tol,
                                       atol=tol * norm(full))
        exact = norm({n: trunc[n] - full[n] for n in full}) / norm(full)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact, rel=10 * tol, abs=10 * tol)
    # φ against retain_grad on the cloned states the cell's own run keeps
    kept = []
    out, state = unroll(cell, x, keep=kept)
    squared(head(readout_input(cell, out, state)), y).sum().backward()
    for k in range(R):
        leaves = pytree.tree_leaves(kept[R - 1 - k])
        phi = torch.sqrt(sum((leaf.grad.abs().pow(2) if leaf.grad is not None else torch.zeros_like(leaf.real))
                             .reshape(B, -1).sum(1) for leaf in leaves))
        np.testing.assert_allclose(ds["phi"].sel(lag=k).values, phi.detach().double().numpy(), rtol=10 * tol,
                                   atol=10 * tol)
    assert ds.attrs["theta"].startswith("trainable")


def test_the_state_coordinates_name_each_part_by_its_path_and_keep_its_shape():
    ds = biaskit.decompose(wrap(*setup("dict state", torch.float64)[:2]), *setup("dict state", torch.float64)[2:],
                           psi=False)
    assert list(dict.fromkeys(ds["part"].values.tolist())) == ["['h']", "['m']"]
    heads = biaskit.decompose(wrap(*setup("heads", torch.float64)[:2]), *setup("heads", torch.float64)[2:],
                              psi=False)
    assert heads["unit"].values.tolist()[:4] == ["0,0", "0,1", "0,2", "1,0"]
    lru = biaskit.decompose(wrap(*setup("complex LRU", torch.float64)[:2]), *setup("complex LRU", torch.float64)[2:],
                            psi=False)
    assert lru.sizes["state"] == 2 * N and lru["unit"].values.tolist()[:2] == ["0 re", "0 im"]


def test_output_and_state_steps_have_no_lag_0_state_gradient_and_count_the_output_at_lag_0():
    cell, head, x, y = setup("output and state", torch.float64)
    ds = biaskit.decompose(wrap(cell, head), x, y)
    assert (ds["phi"].sel(lag=0) == 0).all()  # nothing reads the last step's new state
    assert (ds["psi"].sel(lag=0) > 0).all()  # the last step's output reads θ
    assert ds.attrs["step_output"] == 1


def test_a_frozen_parameter_is_a_constant_everywhere():
    cell, head, x, y = setup("frozen mask", torch.float64)
    system = wrap(cell, head)
    assert "mask" not in system.params() and "mask" not in biaskit.truncated_gradient(system, x, y)
    ds = biaskit.decompose(system, x, y, psi=False)
    assert ds.attrs["frozen_parameters"] == N * N
    assert ds.attrs["n_params"] == N * N + N * F + 2 * N + 2


def test_parameters_read_through_a_private_dict_are_refused_not_zeroed():
    cell, head, x, y = setup("private dict" if False else "dict state", torch.float64)
    torch.manual_seed(0)
    cell = PrivateDict().double()
    system = wrap(cell, nn.Linear(N, 2).double())
    for measure in (lambda: biaskit.decompose(system, x, y), lambda: biaskit.truncated_gradient(system, x, y, 2)):
        with pytest.raises(biaskit.InputError, match=r"uses W, U .*read parameters as module attributes"):
            measure()


def test_the_step_by_step_fallback_gives_the_batched_numbers():
    """The same cell with and without .item(): one runs batched, one step by step (with a warning)."""
    cell, head, x, y = setup("reset", torch.float64)
    batched = Reset(use_item=False).double()
    batched.load_state_dict(cell.state_dict())
    with pytest.warns(UserWarning, match="cannot be batched with torch.func.vmap"):
        stepwise = biaskit.decompose(wrap(cell, head), x, y, metric=torch.eye(N, dtype=torch.float64))
    assert stepwise.attrs["path"] == "generic, step by step"
    plain = biaskit.decompose(wrap(batched, head), x, y, metric=torch.eye(N, dtype=torch.float64))
    assert plain.attrs["path"] == "generic"
    for name in ("rel_bias", "phi", "psi", "group_tail_sq", "group_tail_dot", "group_contribution"):
        np.testing.assert_allclose(stepwise[name].values, plain[name].values, rtol=1e-10, atol=1e-14)


def test_a_dropout_lstm_is_audited_through_factory_in_evaluation_mode(run_cli, tmp_path, monkeypatch):
    (tmp_path / "dropmodel.py").write_text(
        "import torch\n"
        "from trainers.tasks.token_model import TokenLSTM\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return TokenLSTM(5, 3, 6, 2, dropout=0.5)\n"
        "def data():\n"
        "    x = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(1))\n"
        "    return x[:-1], x[1:]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import dropmodel

    model = dropmodel.build()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert model.training  # as a user saves and a factory builds it
    res = run_cli("analyze", tmp_path / "w.pt", "--factory", "dropmodel:build", "--data", "dropmodel:data",
                  "--windows", 6, "--window-length", 12, "--out", tmp_path / "a")
    assert res.code == 0, res.err


def test_a_step_that_mixes_the_windows_of_a_batch_is_refused():
    cell, head, x, y = setup("reset", torch.float64)
    x[0, 0, 0], x[1, 0, 0] = 1.0, -1.0  # the first window's sign now decides for all at step 0
    with pytest.raises(biaskit.InputError, match="mixes the windows of a batch"):
        biaskit.decompose(wrap(cell, head), x, y)
