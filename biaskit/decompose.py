"""Exact per-lag decomposition of the BPTT gradient, and the bias of every truncation K.

For a batch of windows of length R with the loss at the last step, the full
gradient splits into a direct term (the readout) and one contribution per lag,
``G_k = ∂L/∂h_{R-k} · ∂H/∂θ|_{step R-k}``.  TBPTT with truncation K keeps the
lags k ≤ K, so its bias is the tail ``T_K = Σ_{k>K} G_k``.

All K cost one sweep: one forward pass keeping the states, one backward pass
for every state cotangent ``b_k`` (O(R·state), which φ needs anyway), then the
per-step parameter products taken from the OLDEST lag to the newest in chunks
of steps batched with ``vmap``, so ``T_K`` is a running sum and ``||T_K||``
comes out for every K.  Memory is O(R·state + chunk·|θ|).
"""
from __future__ import annotations

import os

import numpy as np
import torch
import xarray as xr
from torch.func import vjp, vmap

from . import norms
from .errors import InputError
from .recurrent import wrap

#: Elements of per-step parameter gradients held at once in the parameter pass.
CHUNK_ELEMENTS = 2**24
#: Tensors the unrolled graph keeps per state element and step (states, gates, activations),
#: an upper figure over the built-in cells, for ``memory_estimate``.
GRAPH_ELEMENTS_PER_STATE = 12


def memory_estimate(system, batch: int, length: int) -> int:
    """Bytes a decomposition of ``batch`` windows of ``length`` steps needs, about: the unrolled
    graph and cotangents, O(length·batch·state), and the parameter pass's chunk."""
    system = wrap(system)
    like = system._like()
    per_step = batch * (GRAPH_ELEMENTS_PER_STATE * system.layout.size + (system.input_size or 1))
    return like.element_size() * (length * per_step + 2 * CHUNK_ELEMENTS)


def available_memory(device) -> int:
    """Free bytes on ``device``: the CUDA allocator's free memory, or the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(system, batch: int, length: int, device):
    """Refuse, with the figures, a decomposition that cannot fit in the device's free memory."""
    need, free = memory_estimate(system, batch, length), available_memory(device)
    if need > free:
        raise InputError(f"{batch} windows of {length} steps need about {need / 2**30:.1f} GiB to decompose, "
                         f"but {torch.device(device)} has {free / 2**30:.1f} GiB free: use fewer or shorter windows")


def _unroll(system, params, x, state, detach_before=None):
    """States after each step of ``x`` (batch, time, F); optionally detach one entering state."""
    states = [state]
    for t in range(x.shape[1]):
        if t == detach_before:
            state = state.detach()
        state = system.step(params, state, x[:, t])
        states.append(state)
    return states


def _check_targets(targets, batch):
    if not torch.is_tensor(targets) or targets.dim() == 0 or targets.shape[0] != batch:
        got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise InputError(f"targets must have one entry per window ({batch},...), got {got}")


def truncated_gradient(system, inputs, targets, K=None, *, start=None) -> dict[str, torch.Tensor]:
    """ĝ_K: the gradient of the batch-mean last-step loss with the state entering step R-K detached.

    ``K=None`` is full BPTT through the whole window, from ``start`` (the state
    entering the window in the module's own format; None: zeros).  Names follow
    ``module.named_parameters()``, with a ``readout.`` prefix for the readout.
    """
    system = wrap(system)
    x = system.batch_first(inputs)
    _check_targets(targets, x.shape[0])
    R = x.shape[1]
    if K is not None and not 0 <= K < R:
        raise InputError(f"K must be in 0..{R - 1} for a window of length {R}, got {K}")
    params, readout = system.params(), system.readout_params()
    with torch.enable_grad():
        state = system.initial_state(start, x.shape[0])
        states = _unroll(system, params, x, state, None if K is None else R - 1 - K)
        loss = system.loss(readout, states[-1], targets).mean()
        names = list(params) + ["readout." + n for n in readout]
        grads = torch.autograd.grad(loss, [*params.values(), *readout.values()], allow_unused=True)
    tensors = [*params.values(), *readout.values()]
    return {n: torch.zeros_like(p) if g is None else g for n, g, p in zip(names, grads, tensors)}


def _param_products(system, params, h_prev, x, b, per_sample):
    """Immediate parameter vjps ``b_tᵀ ∂H/∂θ`` of steps t, summed over the batch.

    Returns ``(G, psi)``: G maps names to (steps, *shape); psi is (steps, batch)
    per-sample contribution norms when ``per_sample``, else None.
    """

    def product(h, xt, bt):
        return vjp(lambda p: system.step(p, h, xt), params)[1](bt)[0]

    if not per_sample:
        return vmap(product)(h_prev, x, b), None

    def one_sample(h, xt, bt):
        return product(h[None], xt[None], bt[None])

    per = vmap(vmap(one_sample))(h_prev, x, b)  # (steps, batch, *shape)
    sq = sum(g.flatten(2).pow(2).sum(-1) for g in per.values())
    return {n: g.sum(1) for n, g in per.items()}, sq.sqrt()


def _running_sq_norms(carry, G):
    """||carry + Σ_{i<j} g_i||² for each step j of a chunk, without forming the sums.

    Expands the square into ||carry||², the running dot products with the carry
    and a 2-d running sum of the chunk's Gram matrix: matmuls instead of a
    memory-bound cumulative sum over (steps × |θ|).
    """
    carry_sq = sum(c.pow(2).sum() for c in carry.values())
    dots = sum(g @ carry[n] for n, g in G.items())
    gram = sum(g @ g.T for g in G.values())
    within = gram.cumsum(0).cumsum(1).diagonal()  # ||Σ_{i<=j} g_i||²
    within = torch.cat([within.new_zeros(1), within[:-1]])
    return carry_sq + 2 * (dots.cumsum(0) - dots) + within


def decompose(
    system,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    start=None,
    metric: torch.Tensor | None = None,
    probes: int = 8,
    metric_rows: int = 512,
    psi: bool = True,
    seed: int = 0,
) -> xr.Dataset:
    """Per-lag gradient norms and the exact bias of TBPTT for every K in 0..R-1.

    The loss is taken at the last step of each window (the paper's BPTT(R, 1));
    the objective is its mean over the batch, and full BPTT runs back to ``start``
    (the state entering each window in the module's own format, e.g. what the
    model's forward over a burn-in returns; None: zeros).  ``metric`` is the (D, D)
    Mahalanobis metric; by default it is estimated from ``metric_rows``
    random (step, sample) pairs of these windows with ``probes`` random
    probes each (see ``norms.estimate_metric``).  ``psi=False`` skips the per-sample
    parameter-space norms, which cost the most.
    """
    system = wrap(system)
    x = system.batch_first(inputs)
    B, R = x.shape[:2]
    _check_targets(targets, B)
    params = {n: p.detach() for n, p in system.params().items()}
    readout = {n: p.detach().requires_grad_() for n, p in system.readout_params().items()}

    # Forward, then one backward pass for every state cotangent and the direct term.
    with torch.enable_grad():
        state = system.initial_state(start, B).detach().requires_grad_()
        states = _unroll(system, params, x, state)
        losses = system.loss(readout, states[-1], targets)
        grads = torch.autograd.grad(losses.sum(), [*states[1:], *readout.values()], allow_unused=True)
    b = torch.stack(grads[:R])  # (R, B, D): per-sample ∂L_s/∂h_t for t = 1..R
    if not torch.isfinite(b).all():
        raise InputError("the gradient has NaN or infinite entries: check the model and inputs")
    direct_sq = sum(g.pow(2).sum() for g in grads[R:] if g is not None) / B**2
    h_prev = torch.stack(states[:-1]).detach()  # (R, B, D): state entering step t
    x_t = x.transpose(0, 1)  # (R, B, ...)

    # Parameter pass, oldest step first: T_K is the running sum before step R-K.
    n_params = sum(p.numel() for p in params.values())
    chunk = max(1, CHUNK_ELEMENTS // max(1, n_params * (B if psi else 1)))
    tail = {n: torch.zeros_like(p).flatten() for n, p in params.items()}
    tail_sq, psi_rows = [], []
    for start in range(0, R, chunk):
        sl = slice(start, min(R, start + chunk))
        G, psi_chunk = _param_products(system, params, h_prev[sl], x_t[sl], b[sl], psi)
        G = {n: g.flatten(1) for n, g in G.items()}
        tail_sq.append(_running_sq_norms(tail, G))
        for name, g in G.items():
            tail[name] += g.sum(0)
        if psi:
            psi_rows.append(psi_chunk)
    full_module_sq = sum(t.pow(2).sum() for t in tail.values())
    grad_norm = (direct_sq + full_module_sq / B**2).sqrt()
    abs_bias = torch.cat(tail_sq).clamp_min(0).sqrt().flip(0) / B  # index K = R - t

    b_lag = b.flip(0).transpose(0, 1)  # (B, R, D) by lag: lag k is the state after step R-k
    estimator = "given" if metric is not None else f"rademacher probes={probes}, rows={metric_rows}, seed={seed}"
    if metric is None:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        metric = norms.estimate_metric(system, params, h_prev, x_t, probes, metric_rows, gen)
    elif tuple(metric.shape) != (system.layout.size,) * 2:
        raise InputError(f"metric must be ({system.layout.size}, {system.layout.size}), got {tuple(metric.shape)}")

    def np_(t):
        return t.detach().cpu().numpy()

    layout = system.layout
    lags, Ks = np.arange(R), np.arange(R)
    ds = xr.Dataset(
        {
            "phi": (("sample", "lag"), np_(norms.euclidean(b_lag))),
            "phi_state": (("lag", "state"), np_(b_lag.abs().mean(0))),
            "phi_mahalanobis": (("sample", "lag"), np_(norms.mahalanobis(b_lag, metric.to(b)))),
            "abs_bias": (("K",), np_(abs_bias)),
            "rel_bias": (("K",), np_(abs_bias / grad_norm)),
            "metric": (("state", "state_"), np_(metric)),
            "loss": (("sample",), np_(losses)),
        },
        coords={
            "sample": np.arange(B),
            "lag": lags,
            "K": Ks,
            "state": np.arange(layout.size),
            "layer": ("state", np.asarray(layout.layer)),
            "component": ("state", np.asarray(layout.component)),
            "unit": ("state", np.asarray(layout.unit)),
        },
        attrs={
            **system.describe(),
            "window_length": R,
            "batch": B,
            "dtype": str(b.dtype).removeprefix("torch."),
            "device": str(x.device),
            "grad_norm": float(grad_norm),
            "n_params": n_params + sum(p.numel() for p in readout.values()),
            "metric_estimator": estimator,
        },
    )
    if psi:
        ds["psi"] = (("sample", "lag"), np_(torch.cat(psi_rows).flip(0).T))
    ds["phi"].attrs["long_name"] = "||dL_s/dh_{s-k}||"
    ds["rel_bias"].attrs["long_name"] = "||E g_K - E g|| / ||E g||"
    return ds
