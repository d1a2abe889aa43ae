"""decompose and truncated_gradient against independent computations."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import xarray as xr
from helpers import LeakyCell, final_output, flat_norm, make_module, naive_gradient
from torch import nn

import biaskit
from biaskit import denormals, report
from biaskit.decompose import GenericPath
from biaskit.fastpath import FastPath

ADAPTERS = [
    dict(kind="LSTM", layers=2, batch_first=True, bias=True),
    dict(kind="LSTM", layers=1, batch_first=False, bias=False),
    dict(kind="GRU", layers=2, batch_first=False, bias=True),
    dict(kind="GRU", layers=1, batch_first=True, bias=False),
    dict(kind="RNN", layers=2, batch_first=True, bias=True),
    dict(kind="RNN", layers=1, batch_first=False, bias=True, nonlinearity="relu"),
    dict(kind="RNNCell"),
    dict(kind="GRUCell"),
    dict(kind="LSTMCell", bias=False),
    dict(kind="LeakyCell"),
    dict(kind="PairCell"),
]
IDS = [f"{a['kind']}-{a.get('layers', 1)}-{'bf' if a.get('batch_first', True) else 'tm'}" for a in ADAPTERS]
B, R, F, C = 4, 9, 3, 3


def setup(spec, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    module = make_module(**spec).to(dtype)
    head = nn.Linear(5, C).to(dtype)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    x = torch.randn(B, R, F, dtype=dtype)
    y = torch.randint(0, C, (B,))
    time_major = isinstance(module, (nn.RNN, nn.GRU, nn.LSTM)) and not module.batch_first
    inputs = x.transpose(0, 1) if time_major else x
    return module, head, loss_fn, x, inputs, y


def distance(a, b):
    return flat_norm([a[n] - b[n] for n in a])


@pytest.mark.parametrize("spec", ADAPTERS, ids=IDS)
def test_truncated_gradient_and_rel_bias_match_naive_detach(spec):
    module, head, loss_fn, x, inputs, y = setup(spec)
    system = biaskit.wrap(module, head, loss_fn)
    full = naive_gradient(module, head, loss_fn, x, y)
    ours_full = biaskit.truncated_gradient(system, inputs, y)
    assert set(ours_full) == set(full)
    assert distance(ours_full, full) < 1e-10 * flat_norm(full.values())
    ds = biaskit.decompose(system, inputs, y)
    for K in range(R):
        naive = naive_gradient(module, head, loss_fn, x, y, K)
        assert distance(biaskit.truncated_gradient(system, inputs, y, K), naive) < 1e-10
        exact = distance(naive, full)
        assert ds["abs_bias"].sel(K=K).item() == pytest.approx(exact, rel=1e-8, abs=1e-12)
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact / flat_norm(full.values()), rel=1e-8, abs=1e-12)
    assert ds["rel_bias"].sel(K=R - 1).item() == pytest.approx(0, abs=1e-12)


def test_encoder_parameters_count_in_the_bias():
    """An embedding in front of the LSTM: its gradient is truncated too."""
    torch.manual_seed(0)
    emb, lstm, head = nn.Embedding(7, 3).double(), nn.LSTM(3, 5, 2, batch_first=True).double(), nn.Linear(5, C).double()
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    tokens, y = torch.randint(0, 7, (B, R)), torch.randint(0, C, (B,))
    system = biaskit.wrap(lstm, head, loss_fn, encoder=emb)
    full = naive_gradient(lstm, head, loss_fn, tokens, y, encoder=emb)
    ds = biaskit.decompose(system, tokens, y)
    assert ds.attrs["encoder"] == "Embedding" and ds.attrs["dtype"] == "float64"  # the state's, not the tokens'
    for K in (0, 3, R - 2):
        naive = naive_gradient(lstm, head, loss_fn, tokens, y, K, encoder=emb)
        assert distance(biaskit.truncated_gradient(system, tokens, y, K), naive) < 1e-10
        want = distance(naive, full) / flat_norm(full.values())
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(want, rel=1e-8)


def _retained_state_grads(module, x, y, head, loss_fn):
    """Per-sample ∂L_s/∂(state after step t) from the nn module run one step at a time."""
    states, hx = [], None
    for t in range(x.shape[1]):
        _, hx = module(x[:, t:t + 1], hx)
        parts = hx if isinstance(hx, tuple) else (hx,)
        for p in parts:
            p.retain_grad()
        states.append(parts)
    loss_fn(head(states[-1][0][-1]), y).sum().backward()
    grad = [[torch.zeros_like(p) if p.grad is None else p.grad for p in parts] for parts in states]
    return [torch.cat([g[layer] for layer in range(module.num_layers) for g in parts], dim=1) for parts in grad]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_phi_and_phi_state_match_retain_grad(kind):
    module, head, loss_fn, x, inputs, y = setup(dict(kind=kind, layers=2, batch_first=True))
    ds = biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y)
    grads = _retained_state_grads(module, x, y, head, loss_fn)
    for k in range(R):
        g = grads[R - 1 - k]
        np.testing.assert_allclose(ds["phi"].sel(lag=k).values, g.norm(dim=1).numpy(), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(ds["phi_state"].sel(lag=k).values, g.abs().mean(0).numpy(), rtol=1e-9, atol=1e-14)
    comps = ["h", "c"] if kind == "LSTM" else ["h"]
    expected = [(layer, c) for layer in range(2) for c in comps for _ in range(5)]
    assert list(zip(ds["layer"].values.tolist(), ds["part"].values.tolist())) == expected


def test_psi_matches_per_sample_differences_of_truncated_gradients():
    """ψ_{s,k} = ||ĝ_k(s) − ĝ_{k−1}(s)|| over the module's parameters, per sample."""
    module, head, loss_fn, x, inputs, y = setup(dict(kind="GRU", layers=2, batch_first=True))
    ds = biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y)
    names = [n for n, _ in module.named_parameters()]
    for s in range(B):
        prev = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
        for k in range(R):
            g = naive_gradient(module, head, loss_fn, x[s:s + 1], y[s:s + 1], k)
            assert ds["psi"].sel(sample=s, lag=k).item() == pytest.approx(
                flat_norm([g[n] - prev[n] for n in names]), rel=1e-8, abs=1e-13)
            prev = g


def test_full_gradient_matches_finite_differences():
    module, head, loss_fn, x, inputs, y = setup(dict(kind="LSTM", layers=2, batch_first=True))
    grad = biaskit.truncated_gradient(biaskit.wrap(module, head, loss_fn), inputs, y)
    eps = 1e-6
    with torch.no_grad():
        for name, p in [*module.named_parameters(), *(("readout." + n, p) for n, p in head.named_parameters())]:
            for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
                old = p[idx].item()
                p[idx] = old + eps
                up = loss_fn(head(final_output(module, x)), y).mean().item()
                p[idx] = old - eps
                down = loss_fn(head(final_output(module, x)), y).mean().item()
                p[idx] = old
                assert grad[name][idx].item() == pytest.approx((up - down) / (2 * eps), abs=1e-8)


def test_mahalanobis_with_identity_metric_is_euclidean():
    module, head, loss_fn, x, inputs, y = setup(dict(kind="LSTM", layers=2, batch_first=True))
    system = biaskit.wrap(module, head, loss_fn)
    ds = biaskit.decompose(system, inputs, y, metric=torch.eye(20, dtype=torch.float64), psi=False)
    np.testing.assert_allclose(ds["phi_mahalanobis"].values, ds["phi"].values, rtol=1e-12)
    assert ds.attrs["metric_estimator"] == "given"


def test_estimated_metric_approaches_exact_expected_jacobian_gram():
    """M̂ against E[J Jᵀ] from torch.func.jacrev on every (step, sample) pair."""
    torch.manual_seed(1)
    cell = LeakyCell(2, 3).double()
    system = biaskit.wrap(cell, None, lambda out, t: (out - t).pow(2).sum(1))
    x, y = torch.randn(5, 6, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    ds = biaskit.decompose(system, x, y, probes=20000, metric_rows=10**6, psi=False)
    params = {n: p.detach() for n, p in cell.named_parameters()}
    state, gram = torch.zeros(5, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
    for t in range(6):
        for s in range(5):
            jac = torch.func.jacrev(lambda p: system.step(p, state[s:s + 1], x[s:s + 1, t])[0][0])(params)
            J = torch.cat([j.reshape(3, -1) for j in jac.values()], dim=1)
            gram += J @ J.T
        state, _ = system.step(params, state, x[:, t])
    exact = gram / 30
    err = np.linalg.norm(ds["metric"].values - exact.numpy()) / np.linalg.norm(exact.numpy())
    assert err < 0.05


def test_float32_agrees_with_float64():
    spec = dict(kind="LSTM", layers=2, batch_first=True)
    m64, h64, loss_fn, _, in64, y = setup(spec, torch.float64)
    ds64 = biaskit.decompose(biaskit.wrap(m64, h64, loss_fn), in64, y, psi=False)
    ds32 = biaskit.decompose(biaskit.wrap(m64.float(), h64.float(), loss_fn), in64.float(), y, psi=False)
    np.testing.assert_allclose(ds32["rel_bias"].values, ds64["rel_bias"].values, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(ds32["phi"].values, ds64["phi"].values, rtol=1e-4, atol=1e-7)


def test_start_is_the_start_of_full_bptt():
    module, head, loss_fn, x, inputs, y = setup(dict(kind="LSTM", layers=2, batch_first=True))
    h0 = (torch.randn(2, B, 5, dtype=torch.float64), torch.randn(2, B, 5, dtype=torch.float64))
    out, _ = module(x, h0)
    loss = loss_fn(head(out[:, -1]), y).mean()
    want = torch.autograd.grad(loss, list(module.parameters()))
    got = biaskit.truncated_gradient(biaskit.wrap(module, head, loss_fn), inputs, y, start=h0)
    for (name, _), g in zip(module.named_parameters(), want):
        torch.testing.assert_close(got[name], g)


def test_dataset_round_trips_through_netcdf(tmp_path):
    module, head, loss_fn, x, inputs, y = setup(dict(kind="LSTM", layers=2, batch_first=True))
    ds = biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y)
    back = report.load(report.save(ds, tmp_path / "sub" / "d.nc"))
    xr.testing.assert_identical(ds, back)
    assert back.attrs["module"] == "LSTM" and back.attrs["window_length"] == R
    assert back.attrs["num_layers"] == 2 and back.attrs["state_size"] == 20


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: biaskit.wrap(nn.Linear(3, 3)), "not a recurrent module"),
        (lambda: biaskit.wrap(nn.LSTM(3, 4, bidirectional=True)), "bidirectional"),
        (lambda: biaskit.wrap(nn.GRU(3, 4, 2, dropout=0.5)), "call .eval()"),
    ],
)
def test_unsupported_modules_are_refused_clearly(make, message):
    with pytest.raises(biaskit.InputError, match=message):
        make()


@pytest.mark.parametrize(
    "inputs, targets, message",
    [
        (torch.randn(4, 6, 2), torch.zeros(4, dtype=torch.long), "expects 3"),
        (torch.randn(4, 0, 3), torch.zeros(4, dtype=torch.long), "empty"),
        (torch.randn(4, 6), torch.zeros(4, dtype=torch.long), "3-d tensor"),
        (torch.randn(4, 6, 3), torch.zeros(5, dtype=torch.long), "one entry per window"),
        (torch.randn(4, 6, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.long), "move one"),
    ],
)
def test_bad_inputs_are_refused_clearly(inputs, targets, message):
    system = biaskit.wrap(nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2), nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(biaskit.InputError, match=message):
        biaskit.decompose(system, inputs, targets)


def test_scalar_loss_and_bad_K_are_refused_clearly():
    x, y = torch.randn(4, 6, 3), torch.zeros(4, dtype=torch.long)
    lstm, head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
    with pytest.raises(biaskit.InputError, match="reduction='none'"):
        biaskit.decompose(biaskit.wrap(lstm, head, nn.CrossEntropyLoss()), x, y)
    with pytest.raises(biaskit.InputError, match="K must be in 0..5"):
        biaskit.truncated_gradient(biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none")), x, y, K=6)
    with pytest.raises(biaskit.InputError, match="no loss"):
        biaskit.decompose(biaskit.wrap(lstm, head), x, y)


def test_non_finite_gradients_are_refused_clearly():
    lstm, head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)
    x = torch.randn(4, 6, 3)
    x[0, 2, 0] = float("nan")
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(biaskit.InputError, match="NaN or infinite"):
        biaskit.decompose(system, x, torch.zeros(4, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", [True, False], ids=["rows", "whole"])
@pytest.mark.parametrize("embedding", [False, True], ids=["inputs", "tokens"])
def test_cuda_matches_cpu(rows, embedding):
    module, head, loss_fn, x, inputs, y = setup(dict(kind="LSTM", layers=2, batch_first=True))
    encoder = nn.Embedding(7, F).double() if embedding else None
    if embedding:
        inputs = torch.randint(0, 7, (B, R))
    cpu = biaskit.decompose(biaskit.wrap(module, head, loss_fn, encoder=encoder), inputs, y, psi=True,
                            _path=FastPath(rows=rows))
    gpu = biaskit.decompose(biaskit.wrap(module.cuda(), head.cuda(), loss_fn,
                                         encoder=encoder.cuda() if embedding else None),
                            inputs.cuda(), y.cuda(), psi=True, _path=FastPath(rows=rows))
    assert gpu.attrs["device"].startswith("cuda")
    for name in ("phi", "psi", "rel_bias", "abs_bias", "group_tail_sq", "group_tail_dot"):
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-6, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32_fast_path_is_full_float32():
    """cuDNN's default TF32 would put the fused forward's h ~1e-3 off: the fast path must match the
    generic one (float32 matmuls step by step) as closely as on the CPU (2e-7 there)."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(16, 64, 2, batch_first=True).cuda(), nn.Linear(64, 5).cuda()
    x, y = torch.randn(8, 50, 16, device="cuda"), torch.randint(0, 5, (8,), device="cuda")
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"))
    fast = biaskit.decompose(system, x, y, metric=False, groups=4)
    slow = biaskit.decompose(system, x, y, metric=False, groups=4, _path=GenericPath())
    for name in ("phi", "psi", "rel_bias"):
        assert np.abs(fast[name].values - slow[name].values).max() <= 2e-6 * np.abs(slow[name].values).max()


@pytest.mark.parametrize("legacy", [False, True], ids=["fp32_precision", "allow_tf32"])
def test_cudnn_runs_the_fused_forward_in_full_float32_and_gets_its_setting_back(legacy, monkeypatch):
    """The flag behind the CUDA test above, checked here: off while a float32 CUDA layer runs, the
    caller's after; untouched for other dtypes and devices; torch < 2.9 has only ``allow_tf32``."""
    from types import SimpleNamespace

    from biaskit.cells import no_tf32

    if legacy:
        monkeypatch.setattr(torch.backends.cudnn, "rnn", SimpleNamespace())
    flags, name = (torch.backends.cudnn, "allow_tf32") if legacy else (torch.backends.cudnn.rnn, "fp32_precision")
    before = getattr(flags, name)
    assert before in (True, "tf32")  # PyTorch's default, which this guards against
    with no_tf32(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)):
        assert getattr(flags, name) == (False if legacy else "ieee")
    assert getattr(flags, name) == before
    for device, dtype in (("cuda", torch.float64), ("cuda", torch.bfloat16), ("cpu", torch.float32)):
        with no_tf32(SimpleNamespace(device=torch.device(device), dtype=dtype)):
            assert getattr(flags, name) == before


# --- the fast path, several chunks, the window groups -------------------------------------------------


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "whole"])
@pytest.mark.parametrize("spec", ADAPTERS[:9], ids=IDS[:9])
def test_the_fast_path_gives_the_generic_paths_numbers(spec, rows):
    """Both ways of the fast path (products kept as rows, or whole per group), uneven groups."""
    module, head, loss_fn, x, inputs, y = setup(spec)
    system = biaskit.wrap(module, head, loss_fn)
    metric = torch.eye(system.layout.size, dtype=torch.float64)
    fast = biaskit.decompose(system, inputs, y, metric=metric, groups=3, _path=FastPath(rows=rows))
    assert fast.attrs["path"] == f"fast: {spec['kind']}"
    slow = biaskit.decompose(system, inputs, y, metric=metric, groups=3, _path=GenericPath())
    assert slow.attrs["path"] == "generic"
    for name in fast.data_vars:
        np.testing.assert_allclose(fast[name].values, slow[name].values, rtol=1e-10, atol=1e-14, err_msg=name)
    est_fast = biaskit.decompose(system, inputs, y, psi=False, seed=3, _path=GenericPath())["metric"]
    np.testing.assert_allclose(est_fast.values, slow.assign(metric=est_fast)["metric"].values)


@pytest.mark.parametrize("spec", ADAPTERS[:9], ids=IDS[:9])
def test_the_fast_path_starts_from_the_given_state(spec):
    """The fused kernels run from ``start`` (every layer's h and an LSTM's c): a random one, against
    the generic path that steps the cell itself."""
    module, head, loss_fn, x, inputs, y = setup(spec)
    system = biaskit.wrap(module, head, loss_fn)
    start = system.unflatten(torch.randn(B, system.layout.size, dtype=torch.float64))
    kw = dict(start=start, metric=torch.eye(system.layout.size, dtype=torch.float64), groups=3)
    fast = biaskit.decompose(system, inputs, y, **kw)
    assert fast.attrs["path"].startswith("fast")
    slow = biaskit.decompose(system, inputs, y, **kw, _path=GenericPath())
    for name in fast.data_vars:
        np.testing.assert_allclose(fast[name].values, slow[name].values, rtol=1e-10, atol=1e-14, err_msg=name)
    from_zeros = biaskit.decompose(system, inputs, y, **{**kw, "start": None}, _path=GenericPath())
    assert not np.allclose(fast["phi"].values, from_zeros["phi"])


@pytest.mark.parametrize("spec", ADAPTERS[:9] + [dict(kind="LSTM", layers=2, frozen="weight_hh_l0")],
                         ids=IDS[:9] + ["LSTM-2-frozen-W_hh"])
def test_the_fast_path_estimates_the_generic_paths_metric(spec):
    """The metric's probes pushed through each cell's forward-mode product written out, against
    torch.func.jvp through the step: the same draws, so the same estimate (from a random state)."""
    spec = dict(spec)
    frozen = spec.pop("frozen", None)
    module, head, loss_fn, x, inputs, y = setup(spec)
    if frozen:
        getattr(module, frozen).requires_grad_(False)
    system = biaskit.wrap(module, head, loss_fn)
    start = system.unflatten(torch.randn(B, system.layout.size, dtype=torch.float64))
    kw = dict(start=start, metric_rows=20, probes=3, seed=5)
    fast = biaskit.decompose(system, inputs, y, **kw)
    slow = biaskit.decompose(system, inputs, y, **kw, _path=GenericPath())
    assert fast.attrs["path"].startswith("fast") and slow.attrs["path"] == "generic"
    for name in ("metric", "phi_mahalanobis"):
        np.testing.assert_allclose(fast[name].values, slow[name].values, rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("encoder", ["embedding", "embedding-padding", "embedding-frozen", "linear", "linear-frozen"])
def test_the_metric_through_an_encoder_on_the_fast_path(encoder):
    """An embedding's probe moves its tokens' rows, a padding row's too (written out); any other
    trained encoder goes through torch.func; a frozen one only shapes the input."""
    torch.manual_seed(0)
    emb = (nn.Embedding(7, 3, padding_idx=0 if "padding" in encoder else None) if encoder.startswith("embedding")
           else nn.Linear(4, 3)).double()
    emb.requires_grad_(not encoder.endswith("frozen"))
    lstm, head = nn.LSTM(3, 5, 2, batch_first=True).double(), nn.Linear(5, C).double()
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"), encoder=emb)
    inputs = torch.randint(0, 7, (B, R)) if encoder.startswith("embedding") else torch.randn(B, R, 4).double()
    y = torch.randint(0, C, (B,))
    kw = dict(metric_rows=20, probes=3)
    fast = biaskit.decompose(system, inputs, y, **kw)
    slow = biaskit.decompose(system, inputs, y, **kw, _path=GenericPath())
    np.testing.assert_allclose(fast["metric"].values, slow["metric"].values, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("encoder", [None, "embedding"])
def test_the_fast_path_never_calls_torch_func(encoder, monkeypatch):
    """torch.func's first pullback or forward-mode product imports torch._dynamo, ~2 s of a ``biaskit
    analyze`` (``benchmarks/bench_first_call.py`` shows it): the fast path's readout gradients and
    metric probes do without it, with an estimated metric and through an embedding."""
    from biaskit import cotangents, fastpath

    dec = importlib.import_module("biaskit.decompose")

    def refused(*args, **kwargs):
        raise AssertionError("torch.func called on the fast path")

    for module in (dec, cotangents, fastpath):
        for name in ("vjp", "jvp", "vmap"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refused)
    torch.manual_seed(0)
    emb = nn.Embedding(7, 3).double() if encoder else None
    gru, head = nn.GRU(3, 5, 2, batch_first=True).double(), nn.Linear(5, C).double()
    inputs = torch.randint(0, 7, (B, R)) if encoder else torch.randn(B, R, 3).double()
    ds = biaskit.decompose(biaskit.wrap(gru, head, nn.CrossEntropyLoss(reduction="none"), encoder=emb), inputs,
                           torch.randint(0, C, (B,)))
    assert ds.attrs["path"].startswith("fast") and "metric" in ds


@pytest.mark.parametrize("embedding", [{}, {"padding_idx": 0}, {"scale_grad_by_freq": True}],
                         ids=["lookup", "lookup-padding", "through-vjp"])
@pytest.mark.parametrize("steps", [None, 2], ids=["one-chunk", "chunks-of-2"])
def test_an_encoder_takes_the_fast_path_too(embedding, steps):
    """An nn.Embedding encoder's products are gathered from the rows its tokens touch (any other
    encoder goes through torch.func); both against the generic path, with uneven groups, repeated
    tokens within a chunk, and several chunks."""
    from biaskit import fastpath

    torch.manual_seed(0)
    emb = nn.Embedding(7, 3, **embedding).double()
    lstm, head = nn.LSTM(3, 5, 2, batch_first=True).double(), nn.Linear(5, C).double()
    system = biaskit.wrap(lstm, head, nn.CrossEntropyLoss(reduction="none"), encoder=emb)
    tokens, y = torch.randint(0, 4, (B + 3, R)), torch.randint(0, C, (B + 3,))
    assert fastpath.lookup(system, system.params()) == ("scale_grad_by_freq" not in embedding)
    kw = dict(metric=torch.eye(20, dtype=torch.float64), groups=3)
    fast = biaskit.decompose(system, tokens, y, **kw, _path=FastPath(steps=steps))
    slow = biaskit.decompose(system, tokens, y, **kw, _path=GenericPath(steps=steps))
    for name in fast.data_vars:
        np.testing.assert_allclose(fast[name].values, slow[name].values, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("psi", [True, False])
@pytest.mark.parametrize("path", ["fast", "fast-whole", "generic"])
@pytest.mark.parametrize("spec", ADAPTERS, ids=IDS)
def test_several_chunks_give_the_naive_bias(spec, path, psi):
    """Real models run in many chunks of steps: force chunks of 2-3 steps and check every K."""
    module, head, loss_fn, x, inputs, y = setup(spec)
    system, steps = biaskit.wrap(module, head, loss_fn), 3 if psi else 2
    fast = path != "generic" and FastPath().applies(system, False)  # a cell it does not serve goes the generic way
    chosen = FastPath(rows=path == "fast", steps=steps) if fast else GenericPath(steps=steps)
    ds = biaskit.decompose(system, inputs, y, psi=psi, _path=chosen)
    full = naive_gradient(module, head, loss_fn, x, y)
    for K in range(R):
        exact = distance(naive_gradient(module, head, loss_fn, x, y, K), full) / flat_norm(full.values())
        assert ds["rel_bias"].sel(K=K).item() == pytest.approx(exact, rel=1e-8, abs=1e-12)
    if psi:
        unchunked = biaskit.decompose(system, inputs, y)
        np.testing.assert_allclose(ds["psi"].values, unchunked["psi"].values, rtol=1e-10)


@pytest.mark.parametrize("spec", [ADAPTERS[0], ADAPTERS[9]], ids=["LSTM", "LeakyCell"])
def test_group_pieces_match_naive_truncation_of_each_groups_windows(spec):
    """What the jackknife reads, against detach-based gradients of each group's windows alone."""
    module, head, loss_fn, x, inputs, y = setup(spec)
    ds = biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y, groups=3)
    members = [m.tolist() for m in torch.arange(B).tensor_split(3)]
    assert ds["group_size"].values.tolist() == [len(m) for m in members]

    def summed(rows, K=None):  # Σ over the windows ``rows`` of ∂L_s (not the mean)
        g = naive_gradient(module, head, loss_fn, x[rows], y[rows], K)
        return {n: v * len(rows) for n, v in g.items()}

    everyone = list(range(B))
    full_all = summed(everyone)
    for K in (0, 2, R - 3):
        tail_all = {n: full_all[n] - summed(everyone, K)[n] for n in full_all}
        for g, rows in enumerate(members):
            full_g = summed(rows)
            tail_g = {n: full_g[n] - summed(rows, K)[n] for n in full_g}
            sq = sum(float(v.pow(2).sum()) for v in tail_g.values()) / B**2
            dot = sum(float((tail_g[n] * tail_all[n]).sum()) for n in tail_g) / B**2
            assert ds["group_tail_sq"].sel(K=K, group=g).item() == pytest.approx(sq, rel=1e-8, abs=1e-16)
            assert ds["group_tail_dot"].sel(K=K, group=g).item() == pytest.approx(dot, rel=1e-8, abs=1e-16)
    for g, rows in enumerate(members):
        full_g = summed(rows)
        assert ds["group_grad_sq"].sel(group=g).item() == pytest.approx(
            sum(float(v.pow(2).sum()) for v in full_g.values()) / B**2, rel=1e-8)
        assert ds["group_grad_dot"].sel(group=g).item() == pytest.approx(
            sum(float((full_g[n] * full_all[n]).sum()) for n in full_g) / B**2, rel=1e-8)
        for k in (0, 1, R - 1):  # lag k's contribution is ĝ_k − ĝ_{k−1} (the module's parameters)
            now = summed(rows, k)
            before = summed(rows, k - 1) if k > 0 else {n: v - v for n, v in now.items()}
            names = [n for n, _ in module.named_parameters()]
            want = flat_norm([now[n] - before[n] for n in names]) / len(rows)
            assert ds["group_contribution"].sel(group=g, lag=k).item() == pytest.approx(want, rel=1e-8, abs=1e-15)


def test_mahalanobis_is_sqrt_b_m_b_for_a_random_positive_definite_metric():
    module, head, loss_fn, x, inputs, y = setup(dict(kind="LSTM", layers=2, batch_first=True))
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(20, 20, generator=gen, dtype=torch.float64)
    metric = A @ A.T + 0.1 * torch.eye(20, dtype=torch.float64)
    ds = biaskit.decompose(biaskit.wrap(module, head, loss_fn), inputs, y, metric=metric, psi=False)
    grads = _retained_state_grads(module, x, y, head, loss_fn)
    for k in range(R):
        b = grads[R - 1 - k]
        want = torch.sqrt(torch.einsum("si,ij,sj->s", b, metric, b))
        np.testing.assert_allclose(ds["phi_mahalanobis"].sel(lag=k).values, want.numpy(), rtol=1e-10, atol=1e-15)


class FlushWatch(nn.Module):
    """A custom cell that notes, at every step, whether denormal floats are being flushed."""

    def __init__(self):
        super().__init__()
        self.cell = nn.RNNCell(F, 5)
        self.seen = set()

    def initial_state(self, batch_size):
        return torch.zeros(batch_size, 5, dtype=self.cell.weight_hh.dtype)

    def forward(self, x_t, state):
        self.seen.add(denormals.flushing())
        return self.cell(x_t, state)


@pytest.mark.parametrize("flushing", [False, True])
def test_denormals_are_flushed_while_decomposing_and_the_callers_setting_restored(flushing):
    cell = FlushWatch().double()
    torch.set_flush_denormal(flushing)
    try:
        biaskit.decompose(biaskit.wrap(cell, nn.Linear(5, C).double(), nn.CrossEntropyLoss(reduction="none")),
                          torch.randn(B, R, F, dtype=torch.float64), torch.randint(0, C, (B,)), psi=False)
        assert cell.seen == {True}
        assert denormals.flushing() == flushing
    finally:
        torch.set_flush_denormal(False)


def test_denormals_are_flushed_on_the_worker_threads_that_already_ran():
    """torch.set_flush_denormal reaches the calling thread alone: OpenMP workers started before keep
    computing with denormals (100x slower). ``set_flush`` restarts them so they take the setting, on
    and off again."""
    if denormals._pause() is None:
        pytest.skip("no OpenMP runtime with omp_pause_resource_all in this torch")
    tiny = torch.full((1 << 20,), 1e-39)  # denormal; large enough to be split between two threads
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.set_flush_denormal(False)
        assert (tiny * 1.0 != 0).all()  # the workers start now, not flushing
        torch.set_flush_denormal(True)
        assert (tiny * 1.0 != 0).any()  # the workers' share still denormal: the gap set_flush closes
        denormals.set_flush(True)
        assert (tiny * 1.0 == 0).all()
        denormals.set_flush(False)
        assert (tiny * 1.0 != 0).all()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def test_float32_bias_of_a_window_whose_cotangents_vanish_into_denormals_matches_float64():
    """Old lags' cotangents fall below 1e-38 (flushed to zero while decomposing): every K's bias above
    float32's resolution still matches the float64 decomposition."""
    torch.manual_seed(3)
    lstm = nn.LSTM(F, 8, batch_first=True)
    with torch.no_grad():
        lstm.weight_hh_l0.mul_(0.2)
        lstm.bias_ih_l0[8:16].fill_(-1.0)  # forget gates half shut: the state forgets within tens of steps
    head, loss_fn = nn.Linear(8, C), nn.CrossEntropyLoss(reduction="none")
    x, y = torch.randn(B, 120, F), torch.randint(0, C, (B,))
    single = biaskit.decompose(biaskit.wrap(lstm, head, loss_fn), x, y, psi=False)
    double = biaskit.decompose(biaskit.wrap(lstm.double(), head.double(), loss_fn), x.double(), y, psi=False)
    assert double["phi"].isel(lag=-1).max() < 1e-38  # the old lags' cotangents are denormal in float32
    big = double["rel_bias"].values > 1e-6
    assert big.sum() >= 5
    np.testing.assert_allclose(single["rel_bias"].values[big], double["rel_bias"].values[big], rtol=1e-3)
    assert np.all(single["rel_bias"].values[~big] < 1e-5)


def test_metric_false_leaves_the_mahalanobis_norm_out_and_changes_nothing_else():
    module, head, loss_fn, x, inputs, y = setup(ADAPTERS[0])
    system = biaskit.wrap(module, head, loss_fn)
    with_metric = biaskit.decompose(system, inputs, y, psi=False)
    without = biaskit.decompose(system, inputs, y, psi=False, metric=False)
    assert "phi_mahalanobis" not in without and "metric" not in without
    assert without.attrs["metric_estimator"] == "none (metric=False)"
    xr.testing.assert_identical(without, with_metric.drop_vars(["phi_mahalanobis", "metric"]).assign_attrs(
        metric_estimator="none (metric=False)"))
    with pytest.raises(biaskit.errors.InputError, match="metric=False"):
        biaskit.fit_decay(without, norm="phi_mahalanobis")


def test_phi_does_not_underflow_where_the_state_gradient_is_tiny_but_not_zero():
    """h' = 0.1 h + U x in float32: ∂L/∂h_{R-k} = 0.1^k ∂L/∂h_R, whose entries fall to ~1e-27, far
    below where their squares underflow (1e-19); φ_k must still be 0.1^k φ_0."""
    from helpers import LinearCell

    torch.manual_seed(0)
    R = 28
    cell = LinearCell(0.1 * torch.eye(3), torch.randn(3, 2))
    x, y = torch.randn(4, R, 2), torch.randint(0, 3, (4,))
    system = biaskit.wrap(cell, None, torch.nn.CrossEntropyLoss(reduction="none"))
    ds = biaskit.decompose(system, x, y, metric=torch.eye(3))
    phi = ds["phi"].values
    expected = phi[:, :1] * 0.1 ** np.arange(R)
    assert (phi > 0).all() and (ds["phi_mahalanobis"].values > 0).all()
    np.testing.assert_allclose(phi, expected, rtol=1e-4)
    np.testing.assert_allclose(ds["phi_mahalanobis"].values, phi, rtol=1e-4)  # M = I
    assert 1e-30 < phi[:, -1].max() < 1e-20
