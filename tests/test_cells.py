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


class Hooked(nn.Module):
    """Gradient hooks on its parameters, as packages use them: the recurrent weight's diagonal zeroed
    (a mask), the input weight's gradient halved (a per-parameter learning rate)."""

    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(N, N) / 2), nn.Parameter(torch.randn(N, F))
        self.W.register_hook(lambda g: g.clone().fill_diagonal_(0.0))
        self.U.register_hook(lambda g: 0.5 * g)

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        return torch.tanh(h @ self.W.T + x @ self.U.T)


class Spike(torch.autograd.Function):
    """A surrogate-gradient spike, old style (forward takes ctx, no setup_context): torch.func cannot
    follow it."""

    @staticmethod
    def forward(ctx, v):
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return g / (1 + v.abs()) ** 2


class Spiking(nn.Module):
    """A leaky integrate-and-fire membrane whose spikes feed back through a surrogate gradient."""

    def __init__(self):
        super().__init__()
        self.inp, self.rec = nn.Linear(F, N), nn.Linear(N, N)

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, v):
        return 0.8 * v + self.inp(x) + self.rec(Spike.apply(v - 1.0))


class EmptyPart(nn.Module):
    """A state part with a zero-size dimension (a convolution buffer of kernel size 0)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(F + N, N)

    def initial_state(self, batch):
        return torch.zeros(batch, N), torch.zeros(batch, 0, 3)

    def forward(self, x, s):
        return torch.tanh(self.lin(torch.cat([x, s[0]], 1))), s[1]


class ComplexFirst(nn.Module):
    """A complex diagonal recurrence whose complex parameter comes first, real inputs, real output."""

    step_output = True

    def __init__(self):
        super().__init__()
        self.lam = nn.Parameter(torch.polar(torch.rand(N) * 0.5 + 0.4, torch.rand(N) * 3))
        self.inp = nn.Linear(F, N)

    def initial_state(self, batch):
        return torch.zeros(batch, N, dtype=torch.complex64)

    def forward(self, x, h):
        h = self.lam * h + self.inp(x)
        return h.real, h


class NoGradPath(nn.Module):
    """Dispatches to a float32-only kernel when no gradient is needed (as a package's inference path
    does): in float64 only the gradient path runs."""

    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(N, N) / 2), nn.Parameter(torch.randn(N, F))

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        if not torch.is_grad_enabled():
            return torch.tanh(h.float() @ self.W.float().T + x @ self.U.T)  # fails on float64 inputs
        return torch.tanh(h @ self.W.T + x @ self.U.T)


class PrivateDict(nn.Module):
    """Registers its parameters but reads them through a dict made in __init__ (as a liquid
    time-constant package does)."""

    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(N, N) / 2), nn.Parameter(torch.randn(N, F))
        self._p = {"W": self.W, "U": self.U}

    def initial_state(self, batch):
        return torch.zeros(batch, N)

    def forward(self, x, h):
        return torch.tanh(h @ self._p["W"].T + x @ self._p["U"].T)


CELLS = {"dict state": DictState, "heads": Heads, "frozen mask": FrozenMask, "reset": Reset,
         "shift register": ShiftRegister, "complex LRU": LRU, "output and state": OutputState,
         "hooked": Hooked, "spiking": Spiking, "empty part": EmptyPart, "complex first": ComplexFirst,
         "no_grad path": NoGradPath, "private dict": PrivateDict}


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
                if leaf.requires_grad:  # not a part of no size that nothing writes
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
    for p in cell.parameters():  # complex parameters stay complex
        p.data = p.data.to(dtype.to_complex() if p.is_complex() else dtype)
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
        warnings.simplefilter("ignore")  # cells torch.func cannot follow go by torch.autograd, with a warning
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


#: Why each cell goes by torch.autograd (decompose's ``path``), or None: batched through torch.func.
AUTOGRAD = {"hooked": "gradient hooks on W, U", "spiking": "torch.func cannot follow the step",
            "private dict": "W, U read where torch.func cannot substitute them", "reset": "torch.func cannot follow"}


@pytest.mark.parametrize("name", list(CELLS))
def test_the_path_says_how_each_cell_was_measured(name):
    cell, head, x, y = setup(name, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = biaskit.decompose(wrap(cell, head), x, y, psi=False)
    said = [str(w.message) for w in caught if "torch.autograd" in str(w.message)]
    if AUTOGRAD.get(name) is None:
        assert ds.attrs["path"] == "generic" and not said
    else:
        assert ds.attrs["path"].startswith("generic, autograd (" + AUTOGRAD[name])
        assert len(said) == 1 and AUTOGRAD[name] in said[0]


def test_the_autograd_path_gives_the_batched_numbers():
    """The same cell with and without .item(): one batched by torch.func, one by torch.autograd."""
    cell, head, x, y = setup("reset", torch.float64)
    batched = Reset(use_item=False).double()
    batched.load_state_dict(cell.state_dict())
    with pytest.warns(UserWarning, match="taken by torch.autograd"):
        by_autograd = biaskit.decompose(wrap(cell, head), x, y, groups=3)
    plain = biaskit.decompose(wrap(batched, head), x, y, groups=3)
    assert plain.attrs["path"] == "generic"
    for name in ("rel_bias", "phi", "psi", "phi_mahalanobis", "group_tail_sq", "group_tail_dot",
                 "group_contribution", "group_grad_sq"):
        np.testing.assert_allclose(by_autograd[name].values, plain[name].values, rtol=1e-10, atol=1e-14)


def test_a_hook_that_is_not_linear_is_refused_with_that_reason():
    cell, head, x, y = setup("dict state", torch.float64)
    cell.W.register_hook(lambda g: g.clamp(-0.01, 0.01))  # clipping: the total's clip is not the parts' sum
    with pytest.raises(biaskit.InputError, match="gradient hook on W is not linear"):
        biaskit.decompose(wrap(cell, head), x, y)
    head[1].weight.register_hook(lambda g: g + 1.0)
    with pytest.raises(biaskit.InputError, match="gradient hook on readout.1.weight is not linear"):
        biaskit.decompose(wrap(CELLS["heads"]().double(), head), x, y)


def test_hooks_on_a_torch_lstm_and_its_readout_are_applied_as_backward_applies_them():
    from helpers import naive_gradient

    torch.manual_seed(3)
    lstm, head = nn.LSTM(F, N, 2, batch_first=True).double(), nn.Linear(N, 3).double()
    lstm.weight_hh_l1.register_hook(lambda g: g * torch.tril(torch.ones_like(g)))
    head.weight.register_hook(lambda g: 0.1 * g)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(B, R, F, dtype=torch.float64), torch.randint(0, 3, (B,))
    system = biaskit.wrap(lstm, head, loss_fn)
    with pytest.warns(UserWarning, match="gradient hooks on weight_hh_l1"):
        ds = biaskit.decompose(system, x, y)
    full = naive_gradient(lstm, head, loss_fn, x, y)
    assert ds.attrs["grad_norm"] == pytest.approx(norm(full), rel=1e-10)
    for K in (0, 2, R - 2):
        trunc = naive_gradient(lstm, head, loss_fn, x, y, K)
        exact = norm({n: trunc[n] - full[n] for n in full}) / norm(full)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("name", ["hooked", "spiking", "private dict", "empty part", "complex first"])
def test_cells_torch_func_cannot_follow_are_measured_right_with_losses_at_every_step(name):
    from helpers import naive_every

    cell, head, x, _ = setup(name, torch.float64)
    y = torch.randn(B, R, 2, dtype=torch.float64)

    def reference(K=None):  # the cell's own detach-based run, a loss at every step
        total = None
        for s in range(R):
            g = naive(cell, head, x[:, :s + 1], y[:, s], None if K is None or K >= s else K)
            total = g if total is None else {n: total[n] + g[n] for n in g}
        return {n: v / R for n, v in total.items()}

    assert naive_every  # the helper's module-level twin, for the built-in modules
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = biaskit.decompose(wrap(cell, head), x, y, loss_at="every", groups=2)
        phi = biaskit.state_gradient_norms(wrap(cell, head), x, y, loss_at="every")
    full = reference()
    assert ds.attrs["grad_norm"] == pytest.approx(norm(full), rel=1e-9)
    for K in (0, 2, R - 2):
        trunc = reference(K)
        exact = norm({n: trunc[n] - full[n] for n in full}) / norm(full)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact, rel=1e-8, abs=1e-12)
    np.testing.assert_allclose(phi["phi"].values, ds["phi"].values, rtol=1e-12)


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


def test_audit_takes_step_output_as_wrap_does():
    cell, head, x, y = setup("complex first", torch.float64)
    del ComplexFirst.step_output  # a package's cell that does not say so itself
    try:
        with pytest.raises(biaskit.InputError):  # read as a state-returning step, its (output, state) is refused
            biaskit.audit(cell, x, y, head, squared)
        result = biaskit.audit(cell, x, y, head, squared, step_output=True, deltas=(0.5,))
    finally:
        ComplexFirst.step_output = True
    direct = biaskit.decompose(wrap(cell, head), x, y)
    assert result.dataset.attrs["step_output"] == 1
    np.testing.assert_allclose(result.dataset["rel_bias"].values, direct["rel_bias"].values, rtol=1e-12)
