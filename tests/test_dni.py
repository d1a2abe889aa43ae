"""Synthetic gradients: the streaming DNI estimator and biaskit's audit of it, against full
BPTT, plain truncation and finite differences computed with the model's own forward pass."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

import biaskit
from biaskit import checkpoint, synthetic_bias
from biaskit.synthetic import warm_up
from trainers import dni, runs, schedule
from trainers.tasks.token_model import TokenLSTM
from trainers.tbptt import Stream

S, LENGTH = 3, 22


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TokenLSTM(vocab=5, embedding=3, hidden=4, layers=2).double()


def data(length=LENGTH, batch=S, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (batch, length), generator=gen), torch.randint(0, 5, (batch, length), generator=gen)


def native_flat(state):
    """(h, c), each (layers, batch, H), flattened layer by layer, h then c: written out here."""
    h, c = state
    return torch.cat([h[0], c[0], h[1], c[1]], dim=1)


def future_gradients(model, x, y, ends, frozen_after=None, state=None):
    """Per-sample gradient of the sum of all later losses at the state after each step in
    ``ends``, and the full-BPTT gradient of the sum of all losses; the model's own chunked
    forward, each boundary's continuing state a clone so its gradient is the later losses'.
    Steps from ``frozen_after`` on use detached parameters (their gradient is not counted)."""
    params = dict(model.named_parameters())
    fixed = {n: p.detach() for n, p in params.items()}
    cuts = sorted({0, *ends, x.shape[1], *([frozen_after] if frozen_after else [])})
    total, clones = 0.0, []
    for a, b in zip(cuts, cuts[1:]):
        use = fixed if frozen_after is not None and a >= frozen_after else params
        out, state = functional_call(model, use, (x[:, a:b], state))
        total = total + model.loss(out, y[:, a:b]).sum()
        if b in ends:
            state = tuple(s.clone() for s in state)
            clones.append(state)
    grads = torch.autograd.grad(total, [*params.values(), *(s for pair in clones for s in pair)])
    n = len(params)
    future = [native_flat(grads[n + 2 * i: n + 2 * i + 2]) for i in range(len(clones))]
    return future, list(grads[:n])


class Oracle(nn.Module):
    """A DNI that returns the exact future gradient of the boundary it is at; its memory counts
    boundaries, so a prediction recomputed at a stored boundary is the same one."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, state, memory=None):
        i = 0 if memory is None else memory
        return self.table[i].to(state), i + 1


def stream_gradient(model, stream, K, synthetic=True):
    """Σ over chunks of each chunk's gradient times S·n: the total the stream's updates follow."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    losses = []
    while not stream.done:
        model.zero_grad()
        _, n, dni_loss = stream.chunk_backward(model, K, synthetic)
        losses.append(dni_loss)
        for acc, p in zip(total, model.parameters()):
            acc += p.grad * (S * n)
    return total, losses


def plain_chunk_gradient(model, x, y, K):
    """The same total from the plain streaming trainer's BPTT(K, K) windows."""
    stream, total = Stream(x, y), [torch.zeros_like(p) for p in model.parameters()]
    while not stream.done:
        loss, n = stream.window_loss(model, K, K)
        for acc, g in zip(total, torch.autograd.grad(loss, list(model.parameters()))):
            acc += g * (S * n)
    return total


@pytest.mark.parametrize("K", [4, 5, 7])
def test_oracle_dni_turns_the_chunked_stream_into_full_bptt(K):
    model = tiny_model()
    x, y = data()
    ends = list(range(K, LENGTH, K))
    future, full = future_gradients(model, x, y, ends)
    got, dni_losses = stream_gradient(model, dni.SyntheticStream(x, y, Oracle(future), model.system()), K)
    for g, w in zip(got, full):
        torch.testing.assert_close(g, w)
    # The bootstrapped target is exact when the next boundary's prediction is.
    assert dni_losses[0] is None and all(float(loss) < 1e-20 for loss in dni_losses[1:])


def test_zero_dni_is_plain_truncation():
    model, K = tiny_model(), 5
    x, y = data()
    zero = dni.SHAPES["layer"]({"size": 16, "hidden": 6}).double()
    got, _ = stream_gradient(model, dni.SyntheticStream(x, y, zero, model.system()), K)
    for g, w in zip(got, plain_chunk_gradient(model, x, y, K)):
        torch.testing.assert_close(g, w)


def test_real_phase_leaves_the_dni_out_of_the_model_gradient_but_not_out_of_its_target():
    model, K = tiny_model(), 5
    x, y = data()
    future, _ = future_gradients(model, x, y, list(range(K, LENGTH, K)))
    real, losses = stream_gradient(model, dni.SyntheticStream(x, y, Oracle(future), model.system()), K, synthetic=False)
    for g, w in zip(real, plain_chunk_gradient(model, x, y, K)):
        torch.testing.assert_close(g, w)
    assert all(float(loss) < 1e-20 for loss in losses[1:])


@pytest.mark.parametrize("discount, synthetic", [(1.0, True), (1.0, False), (0.5, True), (0.5, False)])
def test_bootstrapped_target_against_finite_differences(discount, synthetic):
    model, K = tiny_model(), 4
    x, y = data(length=3 * K, batch=2)
    torch.manual_seed(3)
    guess = dni.SHAPES["layer"]({"size": 16, "hidden": 5}).double()
    nn.init.normal_(guess.net[-1].weight, std=0.3)  # a DNI that predicts something
    stream = dni.SyntheticStream(x, y, guess, model.system(), discount)
    for _ in range(2):
        model.zero_grad()
        stream.chunk_backward(model, K, synthetic)
    with torch.no_grad():
        _, h_T = model(x[:, :K])
        _, h_2T = model(x[:, K:2 * K], h_T)
        delta_2T, _ = guess(native_flat(h_2T))

        def later(flat):  # Σ ℓ over the second chunk + γ δ̂_2T · h_2T, from the state after the first
            h, c = flat.view(2, 2, 2, 4).unbind(2)  # (batch, layer, h|c, H) → h, c as (batch, layer, H)
            out, state = model(x[:, K:2 * K], (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()))
            return model.loss(out, y[:, K:2 * K]).sum() + discount * (delta_2T * native_flat(state)).sum()

        flat, eps = native_flat(h_T), 1e-6
        numeric = torch.zeros_like(flat)
        for idx in range(flat.numel()):
            step = torch.zeros_like(flat).view(-1)
            step[idx] = eps
            step = step.view_as(flat)
            numeric.view(-1)[idx] = (later(flat + step) - later(flat - step)) / (2 * eps)
    torch.testing.assert_close(stream.target, numeric, rtol=1e-6, atol=1e-8)


def test_the_flat_layout_the_dni_sees_is_biaskits():
    model = tiny_model().eval()
    _, state = model(data()[0])
    system = model.system()
    flat = system.flatten(state)
    torch.testing.assert_close(flat, native_flat(state))
    back = system.unflatten(flat)
    assert all(torch.equal(a, b) for a, b in zip(back, state))


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_neuron_dni_size_does_not_grow_with_the_width_and_it_acts_per_neuron():
    narrow, wide = (dni.SHAPES["neuron"]({"size": D, "hidden": 8}) for D in (10, 1000))
    assert count(narrow) == count(wide) == 601
    assert count(dni.SHAPES["layer"]({"size": 1000, "hidden": None})) > 100 * count(
        dni.SHAPES["layer"]({"size": 10, "hidden": None}))
    torch.manual_seed(0)
    neuron = dni.SHAPES["neuron"]({"size": 6, "hidden": 4})
    nn.init.normal_(neuron.down.weight)
    h = torch.randn(3, 6)
    out, memory = neuron(h)
    perm = torch.randperm(6)
    out_p, _ = neuron(h[:, perm])
    torch.testing.assert_close(out_p, out[:, perm])  # neuron i's output depends on neuron i alone
    again, _ = neuron(h, memory)
    assert not torch.allclose(again, out)  # ... and on its own memory


# --- biaskit.synthetic_bias ---------------------------------------------------------------


def audit_setup(W=12, L=6, K=4):
    model = tiny_model().eval()
    x, y = data(length=W + L, batch=4, seed=5)
    burn, _ = data(length=8, batch=4, seed=6)
    with torch.no_grad():
        _, h0 = model(burn)
    return model, x, y, burn, h0, W, L, K


def test_synthetic_bias_with_an_oracle_is_zero_and_without_matches_naive_truncation():
    model, x, y, burn, h0, W, L, K = audit_setup()
    ends = [*range(K, W, K), W]
    future, full = future_gradients(model, x, y, ends, frozen_after=W, state=h0)
    warm = [torch.zeros_like(future[0])] * (burn.shape[1] // K)  # the burn-in's boundaries come first
    oracle = Oracle(warm + future)
    start, memory = warm_up(model.system(), oracle, burn, K)
    torch.testing.assert_close(start, h0)
    ds = synthetic_bias(model.system(), x, y, K, oracle, start=start, memory=memory, lookahead=L)
    assert float(ds["rel_bias_synthetic"]) < 1e-10
    assert float(ds["synthetic_error"].max()) < 1e-10
    # Plain truncation by hand: detach at each chunk start, window losses only.
    truncated, state = [torch.zeros_like(p) for p in model.parameters()], h0
    for a in range(0, W, K):
        state = tuple(s.detach() for s in state)
        out, state = model(x[:, a:min(a + K, W)], state)
        loss = model.loss(out, y[:, a:min(a + K, W)]).sum()
        for acc, g in zip(truncated, torch.autograd.grad(loss, list(model.parameters()))):
            acc += g
    diff = torch.cat([(t - f).flatten() for t, f in zip(truncated, full)]).norm()
    want = diff / torch.cat([f.flatten() for f in full]).norm()
    assert float(ds["rel_bias_truncated"]) == pytest.approx(float(want), rel=1e-9)
    assert ds.attrs["window_length"] == W and ds.attrs["lookahead"] == L
    torch.testing.assert_close(torch.tensor(ds["future_norm"].values),
                               torch.stack([f.norm(dim=1).mean() for f in future]))
    torch.testing.assert_close(ds["synthetic_norm"].values, ds["future_norm"].values)  # the oracle's own


def test_synthetic_bias_of_a_zero_dni_is_the_truncation_bias():
    model, x, y, burn, _, W, L, K = audit_setup()
    zero = dni.SHAPES["neuron"]({"size": 16, "hidden": 3}).double()
    start, memory = warm_up(model.system(), zero, burn, K)
    ds = synthetic_bias(model.system(), x, y, K, zero, start=start, memory=memory, lookahead=L)
    assert float(ds["rel_bias_synthetic"]) == pytest.approx(float(ds["rel_bias_truncated"]), rel=1e-12)
    assert 0 < float(ds["rel_bias_truncated"]) < 2
    assert ds["synthetic_error"].values == pytest.approx(1.0)  # predicting 0 misses all of it


def test_synthetic_bias_without_a_lookahead_has_no_future_past_the_window():
    """lookahead=0 (the default): the window's own losses only, so the last boundary's future is zero
    and the truncation bias is that of the window's full BPTT."""
    model, x, y, _, h0, W, _, K = audit_setup()
    x, y = x[:, :W], y[:, :W]
    ds = synthetic_bias(model.system(), x, y, K, start=h0)
    future, _ = future_gradients(model, x, y, list(range(K, W, K)), state=h0)  # the boundaries before the last
    assert float(ds["future_norm"][-1]) == 0 and float(ds["future_norm"][0]) > 0
    torch.testing.assert_close(torch.tensor(ds["future_norm"].values[:-1]),
                               torch.stack([f.norm(dim=1).mean() for f in future]))


@pytest.mark.parametrize("kwargs, message", [
    ({"K": 0}, "K must be in"),
    ({"K": 13}, "K must be in"),
    ({"lookahead": 18}, "lookahead must be in"),
    ({"targets": torch.zeros(4, 3, dtype=torch.long)}, "one per step"),
])
def test_synthetic_bias_rejects_bad_input(kwargs, message):
    model, x, y, _, _, _, L, K = audit_setup()
    args = {"targets": y, "K": K, "lookahead": L, **kwargs}
    with pytest.raises(biaskit.InputError, match=message):
        synthetic_bias(model.system(), x, args.pop("targets"), args.pop("K"), **args)


# --- the alternating schedule ------------------------------------------------------------


@pytest.mark.parametrize("base", [1, 2])
def test_warm_restarts_follow_torchs_scheduler(base):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=base, T_mult=2)
    for epoch in [0, 0.5, 1, 1.25, 2.5, 3, 5.5, 7, 9.75, 15, 20]:
        sched.step(epoch)
        factor = schedule.Schedule.parse(f"restarts:{base}").lr_factor(30, epoch)
        assert factor == pytest.approx(sched.get_last_lr()[0], abs=1e-12)


def test_alternating_uses_real_gradients_first_then_synthetic_after_each_restart():
    restarts = schedule.Schedule.parse("restarts:1")
    phases = [restarts.synthetic_phase(True, p) for p in (0, 0.9, 1, 2.9, 3, 6.9, 7, 14.9, 15)]
    assert phases == [False, False, True, True, False, False, True, True, False]
    assert restarts.synthetic_phase(False, 0.5)


# --- runs, checkpoints and the command line -----------------------------------------------

TINY = ["--train-tokens", "2000", "--valid-tokens", "400", "--test-tokens", "400", "--hidden", "8",
        "--batch-size", "8", "--window", "20", "--windows", "8", "--quiet"]


@pytest.mark.parametrize("kind", ["layer", "linear", "neuron"])
def test_a_dni_run_logs_both_biases_and_analyze_reports_them(run_cli, tmp_path, kind):
    run_dir = tmp_path / kind
    res = run_cli("train", "copy", "--K", "4", "--epochs", "2", "--estimator", "dni", "--dni", kind,
                  "--alternate", "--out", run_dir, *TINY)
    assert res.code == 0, res.err
    lines = runs.read_metrics(run_dir)
    assert [line["synthetic_share"] for line in lines] == [0.0, 1.0]  # real first, synthetic after the restart
    assert [(line["K1"], line["K2"]) for line in lines] == [(4, 4)] * 2
    for line in lines:
        assert 0 < line["rel_bias_truncated"] and 0 < line["rel_bias_synthetic"] and line["dni_loss"] >= 0
    res = run_cli("analyze", run_dir / "checkpoint-last.pt", "--window-length", "12", "--windows", "8",
                  "--out", tmp_path / "audit", "--format", "json")
    assert res.code == 0, res.err
    syn = json.loads(res.out)["synthetic"]
    assert syn["K"] == 4 and syn["lookahead"] == 12 and syn["rel_bias_synthetic"] > 0
    assert (tmp_path / "audit" / "synthetic.nc").is_file()
    assert len(runs.plot_training([run_dir]).axes) == 4  # a panel for the DNI's bias
    # The checkpoint's DNI is the one the run trained, and it rebuilds by name.
    rebuilt = checkpoint.rebuild(run_dir / "checkpoint-last.pt").dni
    saved = checkpoint.load(run_dir / "checkpoint-last.pt")["dni"]
    assert saved["shape"] == kind
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved["state"].items())


def test_analyze_of_a_tbptt_run_has_no_synthetic_section(run_cli, tmp_path):
    assert run_cli("train", "copy", "--K", "4", "--epochs", "1", "--out", tmp_path / "r", *TINY).code == 0
    res = run_cli("analyze", tmp_path / "r" / "checkpoint-last.pt", "--window-length", "20", "--windows", "8",
                  "--out", tmp_path / "audit")
    assert res.code == 0 and "synthetic" not in res.out
    assert not (tmp_path / "audit" / "synthetic.nc").exists()
