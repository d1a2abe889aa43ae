"""Losses at every step (``loss_at="every"``) against detach-based truncation of each loss position."""
from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import flat_norm, make_module, naive_every, naive_gradient
from torch import nn

import biaskit
from biaskit import limits, probe
from biaskit.decompose import GenericPath

SPECS = [
    dict(kind="RNN", layers=2, batch_first=True),
    dict(kind="GRU", layers=1, batch_first=False),
    dict(kind="LSTM", layers=2, batch_first=True),
    dict(kind="LSTMCell"),
    dict(kind="LeakyCell"),
    dict(kind="PairCell"),
]
IDS = [s["kind"] for s in SPECS]
decompose_module = importlib.import_module("biaskit.decompose")
B, R, F, C = 4, 6, 3, 3


def setup(spec, seed=0):
    torch.manual_seed(seed)
    module = make_module(**spec).double()
    head = nn.Linear(5, C).double()
    x = torch.randn(B, R, F, dtype=torch.float64)
    y = torch.randint(0, C, (B, R))
    time_major = isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)) and not module.batch_first
    return module, head, nn.CrossEntropyLoss(reduction="none"), x, (x.transpose(0, 1) if time_major else x), y


def distance(a, b):
    return flat_norm([a[n] - b[n] for n in a])


@pytest.mark.parametrize("chunked", [False, True], ids=["one chunk", "a band per chunk"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_every_step_bias_matches_truncation_of_each_loss_position(spec, chunked):
    module, head, loss_fn, x, inputs, y = setup(spec)
    system = biaskit.wrap(module, head, loss_fn)
    full = naive_every(module, head, loss_fn, x, y)
    ours = biaskit.truncated_gradient(system, inputs, y, loss_at="every")
    assert distance(ours, full) < 1e-10 * flat_norm(full.values())
    ds = biaskit.decompose(system, inputs, y, loss_at="every", groups=2,
                           _path=GenericPath(steps=1) if chunked else None)
    assert ds.attrs["loss_at"] == "every" and ds.attrs["grad_norm"] == pytest.approx(flat_norm(full.values()))
    for K in range(R):
        naive = naive_every(module, head, loss_fn, x, y, K)
        assert distance(biaskit.truncated_gradient(system, inputs, y, K, loss_at="every"), naive) < 1e-10
        exact = distance(naive, full)
        assert ds["abs_bias"].sel(K=K).item() == pytest.approx(exact, rel=1e-8, abs=1e-13)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact / flat_norm(full.values()), rel=1e-8, abs=1e-13)


def test_every_step_through_an_embedding_matches_truncation():
    torch.manual_seed(1)
    emb, lstm, head = nn.Embedding(7, 3).double(), nn.LSTM(3, 5, batch_first=True).double(), nn.Linear(5, C).double()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    tokens, y = torch.randint(0, 7, (B, R)), torch.randint(0, C, (B, R))
    system = biaskit.wrap(lstm, head, loss_fn, encoder=emb)
    ds = biaskit.decompose(system, tokens, y, loss_at="every", groups=2)
    full = naive_every(lstm, head, loss_fn, tokens, y, encoder=emb)
    for K in (0, 2, R - 2):
        naive = naive_every(lstm, head, loss_fn, tokens, y, K, encoder=emb)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(distance(naive, full) / flat_norm(full.values()),
                                                               rel=1e-8)


def test_group_tails_are_each_groups_own_truncation():
    module, head, loss_fn, x, inputs, y = setup(SPECS[2])
    ds = biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y, loss_at="every", groups=2)
    full = naive_every(module, head, loss_fn, x, y)
    scale = B / 2  # each group's sum of windows over all windows: its mean times its share
    for g, rows in enumerate((slice(0, 2), slice(2, 4))):
        own = naive_every(module, head, loss_fn, x[rows], y[rows])
        for K in (0, 3):
            tail = {n: naive_every(module, head, loss_fn, x[rows], y[rows], K)[n] - own[n] for n in own}
            every = {n: naive_every(module, head, loss_fn, x, y, K)[n] - full[n] for n in full}
            assert ds["group_tail_sq"].sel(K=K, group=g).item() == pytest.approx(
                (flat_norm(tail.values()) / scale) ** 2, rel=1e-8)
            dot = sum(float((tail[n] * every[n]).sum()) for n in tail) / scale
            assert ds["group_tail_dot"].sel(K=K, group=g).item() == pytest.approx(dot, rel=1e-8)


def test_phi_and_psi_are_means_over_loss_positions():
    """φ_k: the mean over s ≥ k of ||∂L_s/∂h_{s-k}|| by retain_grad; ψ_k: of the norm of the single product,
    the difference of the loss's own ĝ_k and ĝ_{k-1} (its readout part cancels)."""
    torch.manual_seed(2)
    cell, head = nn.RNNCell(F, 5).double(), nn.Linear(5, C).double()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(B, R, F, dtype=torch.float64), torch.randint(0, C, (B, R))
    ds = biaskit.decompose(biaskit.wrap(cell, head, loss_fn), x, y, loss_at="every")
    phi, psi = np.zeros((B, R)), np.zeros((B, R))
    for s in range(R):
        h, states = torch.zeros(B, 5, dtype=torch.float64), []
        for t in range(s + 1):
            h = cell(x[:, t], h)
            h.retain_grad()
            states.append(h)
        loss_fn(head(h), y[:, s]).sum().backward()
        for k in range(s + 1):
            phi[:, k] += states[s - k].grad.norm(dim=1).numpy() / (R - k)
        for b in range(B):
            for k in range(1, s + 1):
                one = [naive_gradient(cell, head, loss_fn, x[b:b + 1, :s + 1], y[b:b + 1, s], j) for j in (k, k - 1)]
                psi[b, k] += distance(*one) / (R - k)
    np.testing.assert_allclose(ds["phi"].values, phi, rtol=1e-10)
    np.testing.assert_allclose(ds["psi"].values[:, 1:], psi[:, 1:], rtol=1e-8)
    alone = biaskit.state_gradient_norms(biaskit.wrap(cell, head, loss_fn), x, y, loss_at="every")
    np.testing.assert_allclose(alone["phi"].values, phi, rtol=1e-10)


class OutputStep(nn.Module):
    """forward(x, h) -> (output, new state), the output reading the entering state and x_t."""

    step_output = True

    def __init__(self):
        super().__init__()
        self.cell, self.out = nn.GRUCell(F, 4), nn.Linear(4 + F, 4)

    def initial_state(self, batch):
        return torch.zeros(batch, 4)

    def forward(self, x, h):
        return torch.tanh(self.out(torch.cat([h, x], dim=1))), self.cell(x, h)


def test_a_step_with_its_own_output_matches_truncation():
    torch.manual_seed(3)
    cell, head = OutputStep().double(), nn.Linear(4, C).double()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(B, R, F, dtype=torch.float64), torch.randint(0, C, (B, R))
    system = biaskit.wrap(cell, head, loss_fn)
    ds = biaskit.decompose(system, x, y, loss_at="every", groups=2)

    def reference(K=None):  # each loss position's own detached unroll, by the cell itself
        params = [*cell.parameters(), *head.parameters()]
        total = [torch.zeros_like(p) for p in params]
        for s in range(R):
            h = torch.zeros(B, 4, dtype=torch.float64)
            for t in range(s + 1):
                if K is not None and t == s - K:
                    h = h.detach()
                out, h = cell(x[:, t], h)
            grads = torch.autograd.grad(loss_fn(head(out), y[:, s]).mean(), params, allow_unused=True)
            total = [a if g is None else a + g for a, g in zip(total, grads)]
        return [t / R for t in total]

    alone = biaskit.state_gradient_norms(system, x, y, loss_at="every")  # φ alone, the same bands
    np.testing.assert_allclose(alone["phi"].values, ds["phi"].values, rtol=1e-12)
    assert float(ds["phi"].sel(lag=1).sum()) > 0  # the output's cotangent reaches the state one lag back
    full = reference()
    for K in range(R):
        exact = flat_norm([a - b for a, b in zip(reference(K), full)])
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact / flat_norm(full), rel=1e-8, abs=1e-13)


class ReadsOneRow(nn.Module):
    """Resets when the batch's first row says so: right step by step, wrong once steps share a batch."""

    def __init__(self):
        super().__init__()
        self.W, self.U = nn.Parameter(torch.randn(4, 4) / 2), nn.Parameter(torch.randn(4, F))

    def initial_state(self, batch):
        return torch.zeros(batch, 4)

    def forward(self, x, h):
        if x[0, 0].item() > 0:
            return torch.tanh(x @ self.U.T)
        return torch.tanh(h @ self.W.T + x @ self.U.T)


def test_a_step_that_reads_one_row_for_all_is_refused_not_mismeasured():
    torch.manual_seed(4)
    x = torch.randn(B, R, F)
    x[:, :, 0] = x[:, :, 0].abs() * torch.tensor([1.0, -1.0]).repeat(R // 2)  # every window resets at even steps
    system = biaskit.wrap(ReadsOneRow(), nn.Linear(4, C), nn.CrossEntropyLoss(reduction="none"))
    y = torch.randint(0, C, (B, R))
    with pytest.raises(biaskit.InputError, match="loss_at='last' only"):
        biaskit.decompose(system, x, y, loss_at="every")
    with pytest.warns(UserWarning, match="taken by torch.autograd"):  # the last step's loss, step by step: fine
        biaskit.decompose(system, x, y[:, -1])


@pytest.mark.parametrize("call", [
    lambda s, x, y: biaskit.decompose(s, x, y, loss_at="each"),
    lambda s, x, y: biaskit.decompose(s, x, y[:, 0], loss_at="every"),
    lambda s, x, y: biaskit.decompose(s, x, y[:, :-1], loss_at="every"),
    lambda s, x, y: biaskit.state_gradient_norms(s, x, y[:, 0], loss_at="every"),
], ids=["unknown", "one target per window", "too few steps", "phi alone"])
def test_bad_every_step_arguments_are_refused_clearly(call):
    module, head, loss_fn, x, inputs, y = setup(SPECS[0])
    with pytest.raises(biaskit.InputError, match="loss_at|every step"):
        call(biaskit.wrap(module, head, loss_fn), inputs, y)


def test_float32_every_step_agrees_with_float64():
    module, head, loss_fn, x, inputs, y = setup(SPECS[2])
    system = biaskit.wrap(module, head, loss_fn)
    wide = biaskit.decompose(system, inputs, y, loss_at="every")
    narrow = biaskit.decompose(biaskit.wrap(module.float(), head.float(), loss_fn), inputs.float(), y, loss_at="every")
    np.testing.assert_allclose(narrow["rel_bias"].values, wide["rel_bias"].values, atol=1e-5)
    assert not math.isnan(narrow.attrs["grad_norm"])


def test_every_steps_readout_too_big_for_memory_is_refused_with_the_figures(monkeypatch):
    module, head, loss_fn, x, inputs, y = setup(SPECS[2])
    monkeypatch.setattr(limits, "available_memory", lambda device: 1000)  # 3 x 4 x 6 x 3 classes x 8 bytes = 1728
    monkeypatch.setattr(decompose_module, "check_memory", lambda *a: None)  # the graph's own check passes
    with pytest.raises(biaskit.InputError, match=r"readout at every step of 4 windows of 6 steps needs about .* GiB"):
        biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y, loss_at="every")


class NoAdvance(nn.Module):
    """A token model without advance(): its burn-in forms every step's logits."""

    def __init__(self, vocab=50):
        super().__init__()
        self.emb, self.lstm, self.head = nn.Embedding(vocab, 4), nn.LSTM(4, 4, batch_first=True), nn.Linear(4, vocab)

    def forward(self, x, state=None):
        out, state = self.lstm(self.emb(x), state)
        return self.head(out), state

    def loss(self, out, y):
        return nn.functional.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="none")

    def system(self):
        return biaskit.wrap(self.lstm, self.head, nn.CrossEntropyLoss(reduction="none"), encoder=self.emb)


def test_a_burn_in_whose_outputs_cannot_fit_is_refused_before_it_runs(monkeypatch):

    model, stream = NoAdvance(), torch.randint(0, 50, (400,))
    free = 8 * 2 * 20 * 16 + 100  # the windows fit; 8 windows x 20 steps x 50 logits x 4 bytes do not
    monkeypatch.setattr(limits, "available_memory", lambda device: free)
    with pytest.raises(biaskit.InputError, match=r"burn-in's outputs \(8 windows of 20 steps"):
        with probe.probing(model, stream, stream, length=20, count=8, generator=torch.Generator().manual_seed(0)):
            pass
    monkeypatch.setattr(limits, "available_memory", lambda device: 100)
    with pytest.raises(biaskit.InputError, match="8 windows of 20 steps and their burn-in need about"):
        with probe.probing(model, stream, stream, length=20, count=8, generator=torch.Generator().manual_seed(0)):
            pass


@pytest.mark.parametrize("K1, K2", [(4, 2), (5, 2), (3, 3), (7, 3), (6, 1)])
def test_the_bptt_k1_k2_bias_is_the_trainers_own_chunked_gradient(K1, K2):
    """``synthetic_bias(..., K=K2, K1=K1)`` against the gradient trainers.tbptt.Stream accumulates over
    a window, window by window, and full BPTT of every loss, on a TokenLSTM in float64."""
    from trainers.tasks.token_model import TokenLSTM
    from trainers.tbptt import Stream

    torch.manual_seed(0)
    model = TokenLSTM(vocab=5, embedding=3, hidden=4, layers=2).double().eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 5, (3, 11), generator=gen), torch.randint(0, 5, (3, 11), generator=gen)
    params = list(model.parameters())
    out, _ = model(x)
    full = torch.autograd.grad(model.loss(out, y).sum() / y.numel(), params)
    stream, chunked = Stream(x, y), [torch.zeros_like(p) for p in params]
    while not stream.done:
        loss, n = stream.window_loss(model, K1, K2)
        for total, g in zip(chunked, torch.autograd.grad(loss * n / y.shape[1], params)):
            total += g
    expected = flat_norm([c - f for c, f in zip(chunked, full)]) / flat_norm(full)
    assert expected > 1e-3  # the truncation leaves a bias to measure
    ds = biaskit.synthetic_bias(model.system(), x, y, K2, K1=K1)
    assert float(ds["rel_bias_truncated"]) == pytest.approx(float(expected), rel=1e-10)
    assert ds.attrs["K1"] == K1


def test_bptt_k1_below_k2_or_beside_a_dni_is_refused():
    module, head, loss, x, _, y = setup(SPECS[0])
    system = biaskit.wrap(module, head, loss)
    with pytest.raises(biaskit.InputError, match="K1 must be at least K = 3"):
        biaskit.synthetic_bias(system, x, y, 3, K1=2)
    with pytest.raises(biaskit.InputError, match="equal to it with a DNI"):
        biaskit.synthetic_bias(system, x, y, 2, lambda h, m: (h, m), K1=4)


@pytest.mark.parametrize("K1, K2", [(6, 3), (4, 4)])
def test_the_loop_logs_the_bias_of_its_own_bptt_k1_k2_on_fresh_windows(K1, K2):
    """``Truncation.measure`` (each update's ``rel_bias_trained``) against trainers.tbptt.Stream walking
    the same windows from their burn-in states, and full BPTT of every loss, in float64."""
    from trainers.tasks.token_model import TokenLSTM
    from trainers.tbptt import Stream, Truncation

    torch.manual_seed(0)
    model = TokenLSTM(vocab=5, embedding=3, hidden=4, layers=2).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 5, (300,), generator=gen), torch.randint(0, 5, (300,), generator=gen)
    got = Truncation().measure(model, x, y, K1, K2, 11, 6, torch.Generator().manual_seed(2))
    drawn = probe.sample_windows(x, y, 11, 6, torch.Generator().manual_seed(2))
    model.eval()
    params = list(model.parameters())
    with torch.no_grad():
        start = model(drawn.burn)[1]
    full = torch.autograd.grad(model.loss(model(drawn.inputs, start)[0], drawn.targets).mean(), params)
    stream, chunked = Stream(drawn.inputs, drawn.targets), [torch.zeros_like(p) for p in params]
    stream.carry = start
    while not stream.done:
        loss, n = stream.window_loss(model, K1, K2)
        for total, g in zip(chunked, torch.autograd.grad(loss * n / 11, params)):
            total += g
    want = flat_norm([c - f for c, f in zip(chunked, full)]) / flat_norm(full)
    assert want > 1e-3
    assert got["rel_bias_trained"] == pytest.approx(float(want), rel=1e-9)
    assert Truncation().measure(model, x, y, 30, 12, 11, 6, torch.Generator()) == {}  # no whole backward fits


@pytest.mark.parametrize("make", [
    lambda: (nn.LSTM(F, 5, num_layers=2).double(), None),
    lambda: (nn.GRU(F, 5, num_layers=2, bias=False, batch_first=True).double(), None),
    lambda: (nn.RNNCell(F, 5).double(), None),
    lambda: (nn.GRUCell(4, 5).double(), nn.Embedding(7, 4, padding_idx=2).double()),
], ids=["LSTM", "GRU-no-bias", "RNNCell", "GRUCell-embedding"])
def test_row_norms_from_the_gates_are_the_single_products_norms(make):
    """``bands.gate_norms`` (||δ||²·||a||² per weight) against each row's own parameter product by
    torch.func, with a frozen weight left out; and ψ of decompose with and without it."""
    from torch.func import vjp, vmap

    from biaskit import bands

    torch.manual_seed(3)
    module, encoder = make()
    next(module.parameters()).requires_grad_(False)
    system = biaskit.wrap(module, nn.Linear(5, C).double(), nn.CrossEntropyLoss(reduction="none"), encoder=encoder)
    N, params = 9, system.params()
    h = torch.randn(N, system.layout.size, dtype=torch.float64)
    x = torch.randint(0, 7, (N,)) if encoder is not None else torch.randn(N, F, dtype=torch.float64)
    if encoder is not None:
        x[0] = 2  # the padding row: no product with the embedding
    cotangent = torch.randn(N, system.layout.size, dtype=torch.float64)
    assert bands.gate_norms_apply(system, params, x)

    def one_row(hr, xr, cr):
        _, pull = vjp(lambda p, s: system.step(p, s, xr[None])[0], params, hr[None])
        return pull(cr[None])[0]

    single = vmap(one_row)(h, x, cotangent)
    expected = sum(g.flatten(1).pow(2).sum(1) for g in single.values())
    torch.testing.assert_close(bands.gate_norms(system, params, h, x, cotangent), expected, rtol=1e-12, atol=0)

    tokens = torch.randint(0, 7, (B, R)) if encoder is not None else torch.randn(B, R, F, dtype=torch.float64)
    inputs = tokens if not isinstance(module, nn.LSTM) else tokens.transpose(0, 1)
    y = torch.randint(0, C, (B, R))
    for groups in (2, 3):  # all groups in one pull; unequal groups a pull each
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback to the autograd path
            ds = biaskit.decompose(system, inputs, y, loss_at="every", groups=groups)
        assert "autograd" not in ds.attrs["path"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bands, "gate_norms_apply", lambda *args: False)
            single_ds = biaskit.decompose(system, inputs, y, loss_at="every", groups=groups)
        np.testing.assert_allclose(ds["psi"].values, single_ds["psi"].values, rtol=1e-10)


def test_row_norms_from_the_gates_leave_tied_weights_and_other_encoders_to_single_products():
    from biaskit import bands

    shared = nn.RNNCell(5, 5).double()
    shared.weight_hh = shared.weight_ih  # one tensor read twice: its single product is a sum of two
    x = torch.randn(3, 5, dtype=torch.float64)
    assert not bands.gate_norms_apply(biaskit.wrap(shared, None, None), biaskit.wrap(shared, None, None).params(), x)
    linear_encoder = biaskit.wrap(nn.GRUCell(4, 5).double(), None, None, encoder=nn.Linear(F, 4).double())
    assert not bands.gate_norms_apply(linear_encoder, linear_encoder.params(), torch.randn(3, F, dtype=torch.float64))


@pytest.mark.parametrize("loss_at", ["last", "every"])
def test_progress_reports_the_parameter_pass_to_its_end(loss_at):
    """``decompose(progress=)``: (done, R) after each chunk of steps or lag band, rising to (R, R), on a
    path with several chunks; the Dataset is the one without it."""
    module, head, loss_fn, x, inputs, y = setup(SPECS[2])
    system = biaskit.wrap(module, head, loss_fn)
    targets = y if loss_at == "every" else y[:, -1]
    calls = []
    ds = biaskit.decompose(system, inputs, targets, loss_at=loss_at, groups=2, progress=lambda *a: calls.append(a),
                           _path=GenericPath(steps=2))
    done = [d for d, _ in calls]
    assert {total for _, total in calls} == {R} and done == sorted(done) and done[-1] == R and len(done) > 1
    plain = biaskit.decompose(system, inputs, targets, loss_at=loss_at, groups=2, _path=GenericPath(steps=2))
    np.testing.assert_array_equal(ds["rel_bias"].values, plain["rel_bias"].values)
