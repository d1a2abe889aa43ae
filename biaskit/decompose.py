"""Exact per-lag decomposition of the BPTT gradient, and the bias of every truncation K.

For a batch of windows of length R with the loss at the last step, the full
gradient splits into a direct term (the readout) and one contribution per lag,
``G_k = ∂L/∂h_{R-k} · ∂H/∂θ|_{step R-k}`` (for a step that returns an output,
lag 0 also holds the output's own partial). TBPTT with truncation K keeps the
lags k ≤ K, so its bias is the tail ``T_K = Σ_{k>K} G_k``.

All K cost one sweep: one forward pass keeping the states, one backward pass
for every state cotangent ``b_k`` (O(R·state), which φ needs anyway), then the
per-step parameter products taken from the OLDEST lag to the newest in chunks
of steps, so ``T_K`` is a running sum and ``||T_K||`` comes out for every K.
The running sums are kept by ``tails``. For nn.RNN/GRU/LSTM and their cells
(``fastpath``) the backward pass is written out per cell and also yields the
gates' cotangents, a step's product is a sum of outer products with its
inputs, and the tails are taken from those rows: no step is run twice and no
per-group product of |θ| entries is formed a step. Any other cell goes
through ``torch.func.vjp`` batched with ``vmap`` over steps (step by step,
with a warning, when vmap cannot batch it). Denormal floats are flushed to
zero on every CPU thread while it runs (``denormals``).

The windows are cut into ``groups`` contiguous groups and the tails are kept
per group too, so each K's bias comes with what a delete-one-group jackknife
needs (``biaskit.exact_kappa`` turns it into a confidence limit), and the
per-lag contributions' norms per group, whose decay bounds the tail beyond
the window. With a ``process_group`` every rank decomposes its own windows
and the sums are all-reduced: every rank gets the answer for all windows.
Memory is O(R·state + groups·|θ|) plus a chunk's products (``CHUNK_ELEMENTS``).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch.func import vjp, vmap

from . import denormals, distributed, fastpath, norms
from .errors import InputError
from .recurrent import CustomStep, Params, RecurrentSystem, check_reachable, wrap
from .tails import Tails, held

#: Elements of a chunk's parameter products (and the fast path's square Gram matrices) held at once.
CHUNK_ELEMENTS = 2**23
#: Most steps in one chunk of the parameter pass.
CHUNK_STEPS = 16
#: Window groups whose tails are kept apart for the jackknife (fewer when there are fewer windows).
DEFAULT_GROUPS = 8
#: Tensors the unrolled graph keeps per state element and step (states, gates, activations),
#: an upper figure over the built-in cells, for ``memory_estimate``.
GRAPH_ELEMENTS_PER_STATE = 12


def memory_estimate(system: RecurrentSystem | torch.nn.Module, batch: int, length: int) -> int:
    """Bytes a decomposition of ``batch`` windows of ``length`` steps needs, about: the unrolled
    graph and cotangents, O(length·batch·state), and the parameter pass's chunk."""
    system = wrap(system)
    per_step = batch * (GRAPH_ELEMENTS_PER_STATE * system.layout.size + (system.input_size or 1))
    return system._like().element_size() * (length * per_step + 4 * CHUNK_ELEMENTS)


def available_memory(device: torch.device | str) -> int:
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


def check_memory(system: RecurrentSystem | torch.nn.Module, batch: int, length: int,
                 device: torch.device | str) -> None:
    """Refuse, with the figures, a decomposition that cannot fit in the device's free memory."""
    need, free = memory_estimate(system, batch, length), available_memory(device)
    if need > free:
        raise InputError(f"{batch} windows of {length} steps need about {need / 2**30:.1f} GiB to decompose, "
                         f"but {torch.device(device)} has {free / 2**30:.1f} GiB free: use fewer or shorter windows")


def _check_targets(targets, batch):
    if not torch.is_tensor(targets) or targets.dim() == 0 or targets.shape[0] != batch:
        got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise InputError(f"targets must have one entry per window ({batch},...), got {got}")


def real(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` as real numbers, flattened after its first ``lead`` dimensions (a complex entry is two)."""
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.reshape(*t.shape[:lead], -1)


def group_samples(per: dict, masks: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Per-sample products ``{name: (c, B, ...)}`` summed into groups, ``{name: (G, c, n)}`` (real),
    and each sample's squared norm over every name, (c, B)."""
    per = {n: real(g, 2) for n, g in per.items()}
    sq = sum(g.pow(2).sum(-1) for g in per.values())
    return {n: torch.einsum("gb,cbn->gcn", masks.to(g.dtype), g).contiguous() for n, g in per.items()}, sq


def groups_first(grouped: dict) -> dict:
    """Per-step group products ``{name: (c, G, ...)}`` as ``{name: (G, c, n)}`` (real)."""
    return {n: real(g, 2).transpose(0, 1).contiguous() for n, g in grouped.items()}


def _unroll(system, params, x, state, detach_before=None, nodes=False):
    """States after each step of ``x`` (batch, time, F) and the last step's output (None when
    the readout reads the state); optionally detach the state entering one step. ``nodes``:
    every state and the output a graph node, even one that depends on nothing that requires
    grad (a step that ignores its incoming state), so its gradient can be asked for."""
    states, out = [state], None
    for t in range(x.shape[1]):
        if t == detach_before:
            state = state.detach()
        state, out = system.step(params, state, x[:, t])
        if nodes and not state.requires_grad:
            state = state.detach().requires_grad_()
        states.append(state)
    if nodes and out is not None and not out.requires_grad:
        out = out.detach().requires_grad_()
    return states, out


def _prepare(system, inputs, targets, start):
    system = wrap(system)
    x = system.batch_first(inputs)
    _check_targets(targets, x.shape[0])
    if isinstance(system, CustomStep):
        check_reachable(system, system.initial_state(start, x.shape[0]), x[:, 0])
    return system, x


def truncated_gradient(system: RecurrentSystem | torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       K: int | None = None, *, start: Any = None) -> dict[str, torch.Tensor]:
    """ĝ_K: the gradient of the batch-mean last-step loss with the state entering step R-K detached.

    ``K=None`` is full BPTT through the whole window, from ``start`` (the state
    entering the window in the module's own format; None: zeros). Names follow
    ``module.named_parameters()``, the encoder's prefixed ``encoder.`` and the
    readout's ``readout.``; a tensor reached under several names (a tied
    weight) appears once, under its first. Only trainable parameters count.
    """
    system, x = _prepare(system, inputs, targets, start)
    R = x.shape[1]
    if K is not None and not 0 <= K < R:
        raise InputError(f"K must be in 0..{R - 1} for a window of length {R}, got {K}")
    params = system.params()
    seen = {id(p) for p in params.values()}
    readout = {n: p for n, p in system.readout_params().items() if id(p) not in seen}
    with torch.enable_grad():
        states, out = _unroll(system, params, x, system.initial_state(start, x.shape[0]),
                              None if K is None else R - 1 - K)
        loss = system.loss(system.readout_params(), system.read(states[-1], out), targets).mean()
        tensors = [*params.values(), *readout.values()]
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    names = list(params) + ["readout." + n for n in readout]
    return {n: torch.zeros_like(p) if g is None else g for n, g, p in zip(names, grads, tensors)}


# --- the sweep: forward, then one backward pass -----------------------------------------------


@dataclass
class Sweep:
    """What one forward and one backward pass over the windows leave for the parameter pass."""

    b: torch.Tensor             # (R, B, D) per-sample ∂L_s/∂h_t, t = 1..R
    losses: torch.Tensor        # (B,)
    output: torch.Tensor        # (B, ...) the last step's output, detached
    h_prev: torch.Tensor        # (R, B, D) the state entering each step
    x: torch.Tensor             # (R, B, ...) each step's input
    out_cotangent: torch.Tensor | None = None  # (B, ...) ∂L_s/∂o for steps that return an output
    fast: fastpath.Sweep | None = None  # the gates' cotangents, on the fast path


def _generic_sweep(system, params, readout, x, start, targets) -> Sweep:
    R = x.shape[1]
    with torch.enable_grad():
        state = system.initial_state(start, x.shape[0]).detach().requires_grad_()  # where gradients start
        states, out = _unroll(system, params, x, state, nodes=True)
        output = system.read(states[-1], out)  # a step's own output: its cotangent enters the last product
        losses = system.loss(readout, output, targets)
        wrt = [*states[1:]] + ([output] if system.step_output else [])
        grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
    b = torch.stack([torch.zeros_like(s) if g is None else g for g, s in zip(grads[:R], states[1:])])
    return Sweep(b, losses.detach(), output.detach(), torch.stack(states[:-1]).detach(), x.transpose(0, 1),
                 grads[R] if system.step_output else None)


# --- the parameter pass -------------------------------------------------------------------------


def _generic_products(system, params, sweep: Sweep, sl: slice, masks: torch.Tensor, per_sample: bool,
                      stepwise: bool):
    """Immediate parameter vjps of steps ``sl``: per group ``(G, c, n)`` by name, and per-sample
    squared norms ``(c, B)`` when ``per_sample``. ``masks`` (G, B) picks each group's windows."""
    h, x, b = sweep.h_prev[sl], sweep.x[sl], sweep.b[sl]
    R = sweep.b.shape[0]
    last = torch.zeros(b.shape[0], dtype=torch.bool, device=b.device)
    if sweep.out_cotangent is not None and sl.stop == R:
        last[-1] = True

    def cotangent(bt, is_last, scale):
        """The step's cotangent (on its new state, and on its output at the last step), scaled per sample."""
        shape = (-1,) + (1,) * (bt.dim() - 1)
        if sweep.out_cotangent is None:
            return bt * scale.reshape(shape)
        c = sweep.out_cotangent * is_last
        return bt * scale.reshape(shape), c * scale.reshape((-1,) + (1,) * (c.dim() - 1))

    def step_fn(ht, xt):
        if sweep.out_cotangent is None:
            return lambda p: system.step(p, ht, xt)[0]
        return lambda p: system.step(p, ht, xt)

    def groups_of_one_step(ht, xt, bt, is_last):
        _, pull = vjp(step_fn(ht, xt), params)
        return vmap(lambda m: pull(cotangent(bt, is_last, m))[0])(masks)

    def one_sample(ht, xt, bt, is_last, ot):
        ht, xt, bt = ht[None], xt[None], bt[None]
        _, pull = vjp(step_fn(ht, xt), params)
        if sweep.out_cotangent is None:
            return pull(bt)[0]
        return pull((bt, (ot * is_last)[None]))[0]

    if per_sample:
        ot = sweep.out_cotangent if sweep.out_cotangent is not None else torch.zeros(b.shape[1], device=b.device)
        if stepwise:
            rows = [[one_sample(h[t, s], x[t, s], b[t, s], last[t], ot[s]) for s in range(b.shape[1])]
                    for t in range(b.shape[0])]
            per = {n: torch.stack([torch.stack([r[n] for r in row]) for row in rows]) for n in params}
        else:
            per = vmap(vmap(one_sample, in_dims=(0, 0, 0, None, 0)), in_dims=(0, 0, 0, 0, None))(h, x, b, last, ot)
        return group_samples(per, masks)
    if stepwise:
        rows = []
        for t in range(b.shape[0]):
            _, pull = vjp(step_fn(h[t], x[t]), params)
            rows.append([pull(cotangent(b[t], last[t], m))[0] for m in masks])
        grouped = {n: torch.stack([torch.stack([r[n] for r in row]) for row in rows]) for n in params}
    else:
        grouped = vmap(groups_of_one_step)(h, x, b, last)
    return groups_first(grouped), None


def _positive_int(value, name: str, what: str):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive whole number of {what}, got {value!r}")


def _groups(groups: int, batch: int, device) -> torch.Tensor:
    """(G, B) 0/1 masks of ``groups`` contiguous groups of windows (sizes differing by at most one)."""
    _positive_int(groups, "groups", "window groups")
    G = min(int(groups), batch)
    masks = torch.zeros(G, batch, device=device)
    for g, members in enumerate(torch.arange(batch).tensor_split(G)):
        masks[g, members] = 1
    return masks


def _direct(system, readout: Params, sweep: Sweep, targets, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The readout's gradient of each group's summed loss, ``{name: (G, n)}`` (real): a backward pass
    through the readout per group, by torch.autograd (torch.func's first pullback imports
    torch._dynamo, ~2 s, which the fast path otherwise never needs)."""
    if not readout:
        return {}
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_() for n, p in readout.items()}
        losses = system.loss(leaves, sweep.output, targets)
        per_group = [torch.autograd.grad(losses, list(leaves.values()), m.to(losses.dtype), retain_graph=True,
                                         allow_unused=True) if losses.requires_grad else [None] * len(leaves)
                     for m in masks]
    return {n: real(torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per_group]), 1)
            for i, (n, p) in enumerate(readout.items())}


def _chunk_steps(width: int, rows: int = 0, most: float = CHUNK_STEPS) -> int:
    """Steps per chunk: as many as ``CHUNK_ELEMENTS`` hold at ``width`` elements a step and, on the
    fast path, square matrices of ``rows`` rows a step (their size grows as the chunk's square), at
    most ``most`` and ``CHUNK_STEPS`` (the Gram matrices' cost grows with the chunk)."""
    steps = CHUNK_ELEMENTS // max(1, width)
    if rows:
        steps = min(steps, math.isqrt(CHUNK_ELEMENTS) // rows)
    return max(1, min(CHUNK_STEPS, most, steps))


@denormals.flushed
def decompose(
    system: RecurrentSystem | torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    start: Any = None,
    metric: torch.Tensor | None | bool = None,
    probes: int = 8,
    metric_rows: int = 512,
    psi: bool = True,
    groups: int = DEFAULT_GROUPS,
    seed: int = 0,
    process_group: Any = None,
) -> xr.Dataset:
    """Per-lag gradient norms and the exact bias of TBPTT for every K in 0..R-1.

    The loss is taken at the last step of each window (the paper's BPTT(R, 1));
    the objective is its mean over the batch, and full BPTT runs back to ``start``
    (the state entering each window in the module's own format, e.g. what the
    model's forward over a burn-in returns; None: zeros). ``metric`` is the (D, D)
    Mahalanobis metric; by default it is estimated from ``metric_rows`` random
    (step, sample) pairs of these windows with ``probes`` random probes each (see
    ``norms.estimate_metric``); ``metric=False`` leaves the Mahalanobis norm out
    (the exact controller does: it needs no metric). ``psi=False`` skips the
    per-sample parameter-space norms. ``groups``: how many groups of windows the jackknife of
    ``exact_kappa`` resamples (at most one per window; under ``process_group``
    each process's, so the Dataset holds the sum over the processes).
    ``process_group`` (torch.distributed): the windows are this rank's share;
    sums, norms and biases are those of every rank's windows together, and
    per-window variables (φ, ψ, loss) are gathered, so every rank holds the
    same Dataset (see ``biaskit.distributed``).
    """
    system, x = _prepare(system, inputs, targets, start)
    B, R = x.shape[:2]
    params = {n: p.detach() for n, p in system.params().items()}
    if not params:
        raise InputError(f"{system.kind} has no trainable parameters in its recurrent step: truncation "
                         "changes no gradient (are they all frozen?)")
    if metric is None:  # estimated: its options are checked before any work
        _positive_int(probes, "probes", "random probes")
        _positive_int(metric_rows, "metric_rows", "(step, sample) rows")
    readout = {n: p.detach() for n, p in system.readout_params().items()}
    masks = _groups(groups, B, x.device)
    fast = fastpath.applies(system)
    sweep = (fastpath.sweep if fast else _generic_sweep)(system, params, readout, x, start, targets)
    if not torch.isfinite(sweep.b).all() or not torch.isfinite(sweep.losses).all():
        raise InputError("the gradient has NaN or infinite entries: check the model and inputs")

    # Parameter pass, oldest step first: T_K is the running sum before step R-K.
    n_params = sum(real(p, 0).numel() for p in params.values())
    G = masks.shape[0]
    if fast:
        world_batch = distributed.total(B, process_group)
        rows = fastpath.by_rows(system, params, B, world_batch, G)
        chunk = _chunk_steps(*fastpath.chunk_limits(system, params, G, B, world_batch, psi, rows))
        offset = distributed.offset(B, process_group)
    else:
        chunk = _chunk_steps(n_params * (G + (B if psi else 0)))
    tails, psi_rows, stepwise = Tails(), [], False
    for first in range(0, R, chunk):
        sl = slice(first, min(R, first + chunk))
        if fast:
            blocks, psi_sq = fastpath.blocks(system, params, sweep, sl, masks, psi, process_group, offset, rows)
        else:
            try:
                products, psi_sq = _generic_products(system, params, sweep, sl, masks, psi, stepwise)
            except RuntimeError as err:
                if stepwise or "vmap" not in str(err) and "batch" not in str(err).lower():
                    raise
                stepwise = True
                warnings.warn(f"{system.kind}'s step cannot be batched with torch.func.vmap ("
                              f"{str(err).strip().splitlines()[0][:160]}); decomposing it step by step, "
                              f"exactly but about {B if psi else G}x slower per step. Steps that "
                              "avoid data-dependent Python control flow, .item() and in-place writes into new "
                              "tensors are batched.", stacklevel=2)
                products, psi_sq = _generic_products(system, params, sweep, sl, masks, psi, stepwise)
            blocks = held(products, process_group)
        tails.add(blocks, G)
        if psi:
            psi_rows.append(psi_sq)
    direct = _direct(system, readout, sweep, targets, masks)
    metric, estimator = _metric(system, params, sweep, metric, probes, metric_rows, seed, process_group)
    return _dataset(system, params, readout, sweep, tails, direct, masks, psi_rows if psi else None, metric,
                    estimator, n_params, stepwise, fast, process_group)


@denormals.flushed
def state_gradient_norms(system: RecurrentSystem | torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         *, start: Any = None, process_group: Any = None) -> xr.Dataset:
    """φ alone: ``phi`` (sample, lag) = ||∂L_s/∂h_{s-k}|| and ``phi_state``, as ``decompose`` gives them,
    from its forward and backward sweep without the parameter pass (about a third of its time).

    What the paper's estimator needs (``fit_decay`` and ``bias_bound`` take the result); the
    exact bias needs ``decompose``. Windows, targets, ``start`` and ``process_group`` as there.
    """
    system, x = _prepare(system, inputs, targets, start)
    params = {n: p.detach() for n, p in system.params().items()}
    readout = {n: p.detach() for n, p in system.readout_params().items()}
    sweep = (fastpath.sweep if fastpath.applies(system) else _generic_sweep)(system, params, readout, x, start,
                                                                            targets)
    if not torch.isfinite(sweep.b).all() or not torch.isfinite(sweep.losses).all():
        raise InputError("the gradient has NaN or infinite entries: check the model and inputs")
    phi, phi_state, losses = _lag_norms(sweep, process_group)
    R = x.shape[1]
    return xr.Dataset({"phi": (("sample", "lag"), _numpy(phi)), "phi_state": (("lag", "state"), _numpy(phi_state)),
                       "loss": (("sample",), _numpy(losses))},
                      coords={"sample": np.arange(phi.shape[0]), "lag": np.arange(R)},
                      attrs={**system.describe(), "window_length": R, "batch": int(phi.shape[0]),
                             "dtype": str(sweep.b.dtype).removeprefix("torch."), "device": str(sweep.b.device),
                             "processes": distributed.world(process_group)})


def _lag_norms(sweep: Sweep, process_group):
    """φ per window and lag, the mean |∂L/∂h| per lag and state element, and the losses, over every rank."""
    b_lag = sweep.b.flip(0).transpose(0, 1)  # (B, R, D) by lag: lag k is the state after step R-k
    phi = distributed.gather_samples(norms.euclidean(b_lag), process_group)
    phi_state = distributed.gather_samples(b_lag.abs(), process_group).mean(0)
    return phi, phi_state, distributed.gather_samples(sweep.losses, process_group)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _metric(system, params, sweep, metric, probes, rows, seed, process_group):
    D = system.layout.size
    if metric is False:
        return None, "none (metric=False)"
    if metric is not None:
        if not torch.is_tensor(metric) or tuple(metric.shape) != (D, D):
            got = tuple(metric.shape) if torch.is_tensor(metric) else type(metric).__name__
            raise InputError(f"metric must be ({D}, {D}), got {got}")
        return metric.to(sweep.b), "given"
    gen = torch.Generator(device=sweep.b.device).manual_seed(seed)
    pushes = partial(fastpath.pushes, system, params) if sweep.fast is not None and \
        fastpath.metric_applies(system, params) else None
    estimate = norms.estimate_metric(system, params, sweep.h_prev, sweep.x, probes, rows, gen, pushes)
    estimate = distributed.mean(estimate, process_group)
    return estimate, f"rademacher probes={probes}, rows={rows}, seed={seed}"


def _dataset(system, params, readout, sweep, tails, direct, masks, psi_rows, metric, estimator, n_params,
             stepwise, fast, process_group) -> xr.Dataset:
    R, B = sweep.b.shape[:2]
    world_batch = distributed.total(B, process_group)
    # The full gradient: every lag's products plus the readout's (a tied readout weight added to
    # its coordinate in θ rather than counted apart), per group and over every window.
    theta_ids = {id(p): n for n, p in system.params().items()}
    keys = {n: theta_ids.get(id(p), "readout." + n) for n, p in system.readout_params().items()}
    group_full, total_full = tails.carries()
    direct_total = distributed.all_reduce_sum({n: g.sum(0) for n, g in direct.items()}, process_group)
    for name, g in direct.items():
        key = keys[name]
        group_full[key] = group_full[key] + g if key in group_full else g
        total_full[key] = total_full[key] + direct_total[name] if key in total_full else direct_total[name]
    grad_sq = sum(v.pow(2).sum() for v in total_full.values())
    group_grad_sq = sum(v.pow(2).sum(-1) for v in group_full.values())
    group_grad_dot = sum(v @ total_full[n] for n, v in group_full.items())
    grad_norm = grad_sq.sqrt() / world_batch

    def by_K(rows):  # per step (oldest first) → per K: index K = R - 1 - t holds the tail before step t
        return torch.cat(rows).flip(0) / world_batch**2

    total_sq = by_K(tails.total_sq)
    abs_bias = total_sq.clamp_min(0).sqrt()
    group_sizes = distributed.gather_groups(masks.sum(1), process_group)
    phi, phi_state, losses = _lag_norms(sweep, process_group)
    np_ = _numpy

    layout, lags = system.layout, np.arange(R)
    group_count = int(group_sizes.numel())
    ds = xr.Dataset(
        {
            "phi": (("sample", "lag"), np_(phi)),
            "phi_state": (("lag", "state"), np_(phi_state)),
            "abs_bias": (("K",), np_(abs_bias)),
            "rel_bias": (("K",), np_(abs_bias / grad_norm)),
            "lag_contribution": (("lag",), np_((torch.cat(tails.lag_sq).flip(0).clamp_min(0).sqrt()
                                                / world_batch))),
            "group_contribution": (("group", "lag"), np_(distributed.gather_groups(
                torch.cat(tails.lag_group_sq).flip(0).clamp_min(0).sqrt().T, process_group)
                / group_sizes[:, None].to(phi))),
            "group_tail_sq": (("K", "group"), np_(distributed.gather_groups(by_K(tails.group_sq).T,
                                                                              process_group).T)),
            "group_tail_dot": (("K", "group"), np_(distributed.gather_groups(by_K(tails.group_dot).T,
                                                                               process_group).T)),
            "group_grad_sq": (("group",), np_(distributed.gather_groups(group_grad_sq, process_group)
                                              / world_batch**2)),
            "group_grad_dot": (("group",), np_(distributed.gather_groups(group_grad_dot, process_group)
                                               / world_batch**2)),
            "group_size": (("group",), np_(group_sizes).astype(np.int64)),
            "loss": (("sample",), np_(losses)),
        },
        coords={
            "sample": np.arange(phi.shape[0]),
            "lag": lags,
            "K": lags,
            "group": np.arange(group_count),
            "state": np.arange(layout.size),
            "part": ("state", np.asarray(layout.part)),
            "layer": ("state", np.asarray(layout.layer)),
            "unit": ("state", np.asarray(layout.unit)),
        },
        attrs={
            **system.describe(),
            "window_length": R,
            "batch": int(phi.shape[0]),
            "groups": group_count,
            "dtype": str(sweep.b.dtype).removeprefix("torch."),
            "device": str(sweep.b.device),
            "grad_norm": float(grad_norm),
            "n_params": n_params + sum(real(p, 0).numel() for n, p in readout.items() if keys[n] not in params),
            "metric_estimator": estimator,
            "path": ("fast: " + system.kind) if fast else ("generic, step by step" if stepwise else "generic"),
            "processes": distributed.world(process_group),
        },
    )
    if metric is not None:
        b_lag = sweep.b.flip(0).transpose(0, 1)
        ds["phi_mahalanobis"] = (("sample", "lag"), np_(distributed.gather_samples(
            norms.mahalanobis(b_lag, metric.to(b_lag)), process_group)))
        ds["metric"] = (("state", "state_"), np_(metric))
    if psi_rows is not None:
        psi = distributed.gather_samples(torch.cat(psi_rows).clamp_min(0).sqrt().flip(0).T, process_group)
        ds["psi"] = (("sample", "lag"), np_(psi))
    ds["phi"].attrs["long_name"] = "||dL_s/dh_{s-k}||"
    ds["rel_bias"].attrs["long_name"] = "||E g_K - E g|| / ||E g||"
    ds["lag_contribution"].attrs["long_name"] = "||E g^(k)||, the norm of lag k's mean contribution"
    ds["group_contribution"].attrs["long_name"] = "norm of lag k's mean contribution over each group's windows"
    ds["group_tail_sq"].attrs["long_name"] = "||sum over the group's windows of the tail past K||^2 / B^2"
    ds["group_tail_dot"].attrs["long_name"] = "<group's tail past K, every window's tail past K> / B^2"
    return ds
