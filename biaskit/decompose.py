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
through ``torch.func.vjp`` batched with ``vmap`` over steps; a cell that
torch.func cannot follow (an old-style autograd Function, parameters it
cannot substitute, gradient hooks on them) through ``torch.autograd``
against the module's own tensors (``pullback``), with a warning. Each way is a
path (``fastpath.FastPath``, ``GenericPath``, ``AutogradPath``) that ``decompose``
picks and runs; what they share is in ``sweep``. Denormal floats are flushed to
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

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import xarray as xr
from torch.func import vjp, vmap

from . import bands, cotangents, denormals, distributed, fastpath, hooks, limits, pullback
from .errors import InputError, first_line
from .recurrent import CustomStep, Params, RecurrentSystem, unreachable, wrap
from .sweep import CHUNK_ELEMENTS, Sweep, Windows, chunk_steps, group_samples, groups_first, real, unroll
from .tails import Tails, held

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


def check_memory(system: RecurrentSystem | torch.nn.Module, batch: int, length: int,
                 device: torch.device | str) -> None:
    """Refuse, with the figures, a decomposition that cannot fit in the device's free memory."""
    need, free = memory_estimate(system, batch, length), limits.available_memory(device)
    if need > free:
        raise InputError(f"{batch} windows of {length} steps need about {need / 2**30:.1f} GiB to decompose, "
                         f"but {torch.device(device)} has {free / 2**30:.1f} GiB free: use fewer or shorter windows")


def _check_targets(targets, batch):
    if not torch.is_tensor(targets) or targets.dim() == 0 or targets.shape[0] != batch:
        got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise InputError(f"targets must have one entry per window ({batch},...), got {got}")


def _prepare(system, inputs, targets, start, every: bool = False):
    """The system and its inputs (batch, time, ...), checked."""
    system = wrap(system)
    x = system.batch_first(inputs)
    if every:
        bands.check_targets(targets, *x.shape[:2])
    else:
        _check_targets(targets, x.shape[0])
    return system, x


def _autograd_reason(system, x, start) -> str | None:
    """Why the step's parameter products must be taken by torch.autograd against the module's own
    tensors (``pullback``): gradient hooks, parameters substitution cannot reach; None when nothing
    stands in the way of torch.func. Refuses hooks that are not linear and steps that mix windows."""
    readout = {"readout." + n: p for n, p in system.readout_params().items()}
    why = [n for n in hooks.hooked({**readout, **system.params()}) if n not in readout]
    why = ["gradient hooks on " + ", ".join(why)] if why else []
    if isinstance(system, CustomStep):
        missed = unreachable(system, system.initial_state(start, x.shape[0]), x[:, 0])
        if missed:
            why.append(f"{', '.join(missed[:4])}{' ...' if len(missed) > 4 else ''} read where torch.func cannot "
                       "substitute them (through a container made in __init__?)")
    return "; ".join(why) or None


def truncated_gradient(system: RecurrentSystem | torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                       K: int | None = None, *, start: Any = None, loss_at: str = "last") -> dict[str, torch.Tensor]:
    """ĝ_K: the gradient of the batch-mean last-step loss with the state entering step R-K detached.

    ``K=None`` is full BPTT through the whole window, from ``start`` (the state
    entering the window in the module's own format; None: zeros). Names follow
    ``module.named_parameters()``, the encoder's prefixed ``encoder.`` and the
    readout's ``readout.``; a tensor reached under several names (a tied
    weight) appears once, under its first. Only trainable parameters count.
    ``loss_at="every"``: the mean over windows and steps of every step's loss
    (targets (batch, time, ...)), each loss's gradient truncated to the K + 1
    steps ending at its own step, one detached unroll per step: the reference
    ``decompose(..., loss_at="every")`` is tested against.
    """
    every = bands.check_loss_at(loss_at)
    system, x = _prepare(system, inputs, targets, start, every)
    R = x.shape[1]
    if K is not None and not 0 <= K < R:
        raise InputError(f"K must be in 0..{R - 1} for a window of length {R}, got {K}")
    params = system.params()
    seen = {id(p) for p in params.values()}
    readout = {n: p for n, p in system.readout_params().items() if id(p) not in seen}
    tensors = [*params.values(), *readout.values()]
    total = [torch.zeros_like(p) for p in tensors]
    for s in range(R) if every else [R - 1]:
        with torch.enable_grad():
            detach = None if K is None or K >= s else s - K
            states, out = unroll(system, params, x[:, :s + 1], system.initial_state(start, x.shape[0]), detach)
            loss = system.loss(system.readout_params(), system.read(states[-1], out),
                               targets[:, s] if every else targets).mean()
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        total = [t if g is None else t + g for t, g in zip(total, grads)]
    names = list(params) + ["readout." + n for n in readout]
    return {n: t / (R if every else 1) for n, t in zip(names, total)}


# --- the paths: the sweep, then the parameter pass in chunks of steps -------------------------------


@dataclass
class GenericPath:
    """The path any cell can take: the sweep by torch.autograd through the unrolled window, each
    chunk's parameter products by ``torch.func.vjp`` batched with ``vmap`` over steps.
    ``fastpath.FastPath`` has the same methods but ``band`` (losses at every step go this way)."""

    steps: int | None = None  # steps per chunk (None: ``CHUNK_ELEMENTS`` decide; tests force several chunks)

    def applies(self, system: RecurrentSystem, every: bool) -> bool:
        """Any cell, with a loss at the last step or at every step."""
        return True

    def sweep(self, system: RecurrentSystem, params, readout, x: torch.Tensor, start, targets) -> Sweep:
        """The unrolled window with its graph, and one backward pass for every state's cotangent."""
        R = x.shape[1]
        with torch.enable_grad():
            state = system.initial_state(start, x.shape[0]).detach().requires_grad_()  # where gradients start
            states, out = unroll(system, params, x, state, nodes=True)
            output = system.read(states[-1], out)  # a step's own output: its cotangent enters the last product
            losses = system.loss(readout, output, targets)
            wrt = [*states[1:]] + ([output] if system.step_output else [])
            grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
        b = torch.stack([torch.zeros_like(s) if g is None else g for g, s in zip(grads[:R], states[1:])])
        return Sweep(b, losses.detach(), output.detach(), torch.stack(states[:-1]).detach(), x.transpose(0, 1),
                     grads[R] if system.step_output else None)

    def chunks(self, system: RecurrentSystem, params, windows: Windows, psi: bool) -> int:
        """Steps per chunk: a step's products per group, and per window for ψ, within ``CHUNK_ELEMENTS``."""
        G, B = windows.masks.shape
        n_params = sum(real(p, 0).numel() for p in params.values())
        return self.steps or chunk_steps(n_params * (G + (B if psi else 0)))

    def blocks(self, system: RecurrentSystem, params, sweep: Sweep, sl: slice, windows: Windows, psi: bool):
        """The steps ``sl`` as blocks for ``Tails.add``, their products per group whole, and per-window
        squared norms ``(c, B)`` with ``psi``."""
        products, psi_sq = _generic_products(system, params, sweep, sl, windows.masks, psi)
        return held(products, windows.process_group), psi_sq

    def band(self, system: RecurrentSystem, params, fwd: bands.Forward, cotangent, out_cotangent,
             windows: Windows, psi: bool) -> bands.Band:
        """Losses at every step: the band of the steps ``cotangent`` covers (``bands.band``)."""
        return bands.band(system, params, fwd, cotangent, out_cotangent, windows.members, psi)

    def metric(self, system: RecurrentSystem, params, sweep, probes: int, rows: int,
               generator: torch.Generator) -> torch.Tensor:
        """The metric's estimate (``cotangents.estimate_metric``), its probes through ``torch.func.jvp``."""
        return cotangents.estimate_metric(system, params, sweep.h_prev, sweep.x, probes, rows, generator)

    def fallback(self, system: RecurrentSystem, err: RuntimeError) -> GenericPath | None:
        """The path to take when this one's parameter pass raised ``err``: the same products by
        torch.autograd, unless memory ran out."""
        if isinstance(err, torch.OutOfMemoryError):
            return None
        return AutogradPath(steps=self.steps, own=system.params(),
                            why="torch.func cannot follow the step: " + first_line(err).split(". ")[0][:160])

    def describe(self, system: RecurrentSystem, every: bool) -> str:
        """The Dataset's ``path``."""
        return "generic, bands" if every else "generic"


@dataclass(kw_only=True)
class AutogradPath(GenericPath):
    """The generic path for a cell torch.func cannot follow: every parameter product by torch.autograd
    against the module's own tensors (``pullback``), a backward pass per step and group of windows
    (per window for ψ)."""

    own: Params  # the module's own parameter tensors
    why: str     # what stands in the way of torch.func

    def blocks(self, system: RecurrentSystem, params, sweep: Sweep, sl: slice, windows: Windows, psi: bool):
        products, psi_sq = _autograd_products(system, self.own, sweep, sl, windows.members, psi)
        return held(products, windows.process_group), psi_sq

    def band(self, system: RecurrentSystem, params, fwd: bands.Forward, cotangent, out_cotangent,
             windows: Windows, psi: bool) -> bands.Band:
        return bands.band(system, params, fwd, cotangent, out_cotangent, windows.members, psi, self.own)

    def metric(self, system: RecurrentSystem, params, sweep, probes: int, rows: int,
               generator: torch.Generator) -> torch.Tensor:
        return cotangents.estimate_metric(system, self.own, sweep.h_prev, sweep.x, probes, rows, generator, own=True)

    def fallback(self, system: RecurrentSystem, err: RuntimeError) -> None:
        return None

    def describe(self, system: RecurrentSystem, every: bool) -> str:
        return f"{super().describe(system, every)}, autograd ({self.why})"


def _pick(system: RecurrentSystem, every: bool, autograd_why: str | None) -> GenericPath | fastpath.FastPath:
    """The path a decomposition takes: by torch.autograd when ``autograd_why`` says what stands in
    torch.func's way, else the first that applies of the fast path and the generic one."""
    if autograd_why is not None:
        return AutogradPath(own=system.params(), why=autograd_why)
    return next(path for path in (fastpath.FastPath(), GenericPath()) if path.applies(system, every))


# --- the parameter pass -------------------------------------------------------------------------


def _generic_products(system, params, sweep: Sweep, sl: slice, masks: torch.Tensor, per_sample: bool):
    """Immediate parameter vjps of steps ``sl`` by torch.func: per group ``(G, c, n)`` by name, and
    per-sample squared norms ``(c, B)`` when ``per_sample``. ``masks`` (G, B) picks each group's windows."""
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
        per = vmap(vmap(one_sample, in_dims=(0, 0, 0, None, 0)), in_dims=(0, 0, 0, 0, None))(h, x, b, last, ot)
        return group_samples(per, masks)
    return groups_first(vmap(groups_of_one_step)(h, x, b, last)), None


def _autograd_products(system, own: Params, sweep: Sweep, sl: slice, members: list[slice], per_sample: bool):
    """``_generic_products`` by torch.autograd against the module's own tensors ``own``
    (``pullback``): a backward pass per step and group of windows (``members``), per window with
    ``per_sample``."""
    R = sweep.b.shape[0]
    grouped, sq = [], []
    for t in range(sl.start, sl.stop):
        out_cot = sweep.out_cotangent if sweep.out_cotangent is not None and t == R - 1 else None
        pulls = [pullback.by_autograd(system, own, sweep.h_prev[t, rows], sweep.x[t, rows], sweep.b[t, rows],
                                      None if out_cot is None else out_cot[rows], per_sample) for rows in members]
        grouped.append([grads for grads, *_ in pulls])
        if per_sample:
            sq.append(torch.cat([row_sq for *_, row_sq in pulls]))
    products = {n: torch.stack([torch.stack([real(g[n], 0) for g in step]) for step in grouped], 1) for n in own}
    return products, torch.stack(sq) if per_sample else None


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


def _direct(system, readout: Params, outputs: torch.Tensor, targets, masks: torch.Tensor,
            every: bool) -> dict[str, torch.Tensor]:
    """The readout's gradient of each group's summed loss, ``{name: (G, n)}`` (real): a backward pass
    through the readout per group, by torch.autograd against the readout's own tensors (their
    gradient hooks apply; torch.func's first pullback imports torch._dynamo, ~2 s, which the fast
    path otherwise never needs). ``outputs``: the last step's
    (B, ...), or with ``every`` every step's (B, R, ...)."""
    if not readout:
        return {}
    own = system.readout_params()
    with torch.enable_grad():
        leaves = {n: own[n] for n in readout}  # the module's own tensors: their gradient hooks apply
        losses = bands.step_losses(system, leaves, outputs, targets).sum(1) if every else \
            system.loss(leaves, outputs, targets)
        per_group = [torch.autograd.grad(losses, list(leaves.values()), m.to(losses.dtype), retain_graph=True,
                                         allow_unused=True) if losses.requires_grad else [None] * len(leaves)
                     for m in masks]
    return {n: real(torch.stack([torch.zeros_like(p) if g[i] is None else g[i] for g in per_group]), 1)
            for i, (n, p) in enumerate(readout.items())}


@dataclass
class Lags:
    """What the parameter pass measured, by K and by lag, before normalising: the full gradient's
    pieces less the readout's (``{name: (G, n)}``, ``{name: (n,)}``), the tails' squared norms by K
    (index K: the tail past K), the lag contributions' by lag, and the per-window norms."""

    group_full: dict
    total_full: dict
    total_sq: torch.Tensor      # (R,)
    group_sq: torch.Tensor      # (R, G)
    group_dot: torch.Tensor     # (R, G)
    lag_sq: torch.Tensor        # (R,)
    lag_group_sq: torch.Tensor  # (R, G)
    phi: torch.Tensor           # (B_all, R)
    phi_state: torch.Tensor     # (R, D)
    losses: torch.Tensor        # (B_all,)
    phi_mahalanobis: torch.Tensor | None
    psi: torch.Tensor | None    # (B_all, R)
    positions: int = 1          # loss positions per window: the objective is the mean over windows and them


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
    loss_at: str = "last",
    progress: Callable[[int, int], None] | None = None,
    _path: GenericPath | fastpath.FastPath | None = None,
) -> xr.Dataset:
    """Per-lag gradient norms and the exact bias of TBPTT for every K in 0..R-1.

    By default the loss is taken at the last step of each window (the paper's
    BPTT(R, 1)); the objective is its mean over the batch, and full BPTT runs
    back to ``start`` (the state entering each window in the module's own
    format, e.g. what the model's forward over a burn-in returns; None: zeros).
    ``loss_at="every"``: a loss at every step (targets (batch, time, ...)), the
    objective their mean over windows and steps, and ĝ_K keeps for each loss
    the K + 1 steps ending at it (BPTT(R, 1) at every step; ``bands``): φ, ψ
    are then means over loss positions, and it costs about R/4 sweeps; its
    tails are the full gradient less the kept lags, so in float32 its biases
    are good to about 1e-6 of ||g|| (float64 for smaller ones).
    ``metric`` is the (D, D)
    Mahalanobis metric; by default it is estimated from ``metric_rows`` random
    (step, sample) pairs of these windows with ``probes`` random probes each (see
    ``cotangents.estimate_metric``); ``metric=False`` leaves the Mahalanobis norm out
    (the exact controller does: it needs no metric). ``psi=False`` skips the
    per-sample parameter-space norms. ``groups``: how many groups of windows the jackknife of
    ``exact_kappa`` resamples (at most one per window; under ``process_group``
    each process's, so the Dataset holds the sum over the processes).
    ``process_group`` (torch.distributed): the windows are this rank's share;
    sums, norms and biases are those of every rank's windows together, and
    per-window variables (φ, ψ, loss) are gathered, so every rank holds the
    same Dataset (see ``biaskit.distributed``). ``progress(done, R)`` is called as the parameter
    pass goes, the long part (steps, or with every step's losses lag bands, done of R; it starts
    again if a step makes it fall back to torch.autograd). ``_path``, for tests: the path to take
    (``GenericPath``, ``fastpath.FastPath``) instead of the one ``_pick`` finds.
    """
    every = bands.check_loss_at(loss_at)
    system, x = _prepare(system, inputs, targets, start, every)
    autograd_why = _autograd_reason(system, x, start)
    B, R = x.shape[:2]
    check_memory(system, B, R, x.device)
    params = {n: p.detach() for n, p in system.params().items()}
    if not params:
        raise InputError(f"{system.kind} has no trainable parameters in its recurrent step: truncation "
                         "changes no gradient (are they all frozen?)")
    if metric is None:  # estimated: its options are checked before any work
        _positive_int(probes, "probes", "random probes")
        _positive_int(metric_rows, "metric_rows", "(step, sample) rows")
    readout = {n: p.detach() for n, p in system.readout_params().items()}
    windows = Windows(_groups(groups, B, x.device), process_group)
    path = _path or _pick(system, every, autograd_why)
    sweep = bands.forward(system, params, readout, x, start, targets) if every else \
        path.sweep(system, params, readout, x, start, targets)
    if not torch.isfinite(sweep.b).all() or not torch.isfinite(sweep.losses).all():
        raise InputError("the gradient has NaN or infinite entries: check the model and inputs")
    metric, estimator = _metric(system, params, sweep, metric, probes, metric_rows, seed, process_group, path)

    def parameter_pass(path):
        if every:
            return _every_step(system, params, sweep, windows, psi, metric, path, progress)
        return _last_step(system, params, sweep, windows, psi, metric, path, progress)

    if isinstance(path, AutogradPath):
        _warn_autograd(system, path.why)
    try:
        lags = parameter_pass(path)
    except RuntimeError as err:  # torch.func cannot follow the step: the same products by torch.autograd
        instead = path.fallback(system, err)
        if instead is None:
            raise
        path = instead
        _warn_autograd(system, path.why)
        if estimator.startswith("rademacher"):  # its batches mixed steps, which such a step may not allow
            metric, estimator = _metric(system, params, sweep, None, probes, metric_rows, seed, process_group, path)
        lags = parameter_pass(path)
    keys = _readout_keys(system)
    direct = _direct(system, readout, sweep.outputs if every else sweep.output, targets, windows.masks, every)
    n_params = sum(real(p, 0).numel() for p in params.values()) + \
        sum(real(p, 0).numel() for n, p in readout.items() if keys[n] not in params)  # a tied one is in θ
    return _dataset(system, lags, _finish(lags, direct, keys, windows), metric,
                    {"n_params": n_params, "metric_estimator": estimator, "path": path.describe(system, every),
                     "processes": distributed.world(process_group), "loss_at": loss_at})


def _warn_autograd(system, why: str):
    warnings.warn(f"{system.kind}: {why}; its parameter products are taken by torch.autograd against the module's own "
                  "tensors, a backward pass per step and group of windows (per window for psi): exact, and slower "
                  "than batched", stacklevel=4)


def _last_step(system, params, sweep: Sweep, windows: Windows, psi: bool, metric,
               path: GenericPath | fastpath.FastPath, progress=None) -> Lags:
    """The parameter pass of a last-step loss, oldest step first, in the path's chunks of steps: T_K is
    the running sum before step R-K."""
    R, G, process_group = sweep.b.shape[0], windows.masks.shape[0], windows.process_group
    chunk = path.chunks(system, params, windows, psi)
    tails, psi_rows = Tails(), []
    for first in range(0, R, chunk):
        blocks, psi_sq = path.blocks(system, params, sweep, slice(first, min(R, first + chunk)), windows, psi)
        tails.add(blocks, G)
        if psi:
            psi_rows.append(psi_sq)
        if progress is not None:
            progress(min(R, first + chunk), R)
    group_full, total_full = tails.carries()
    phi, phi_state, losses = _lag_norms(sweep, process_group)
    b_lag = sweep.b.flip(0).transpose(0, 1)
    maha = None if metric is None else distributed.gather_samples(cotangents.mahalanobis(b_lag, metric.to(b_lag)),
                                                                  process_group)
    psi_table = None if not psi else \
        distributed.gather_samples(torch.cat(psi_rows).clamp_min(0).sqrt().flip(0).T, process_group)
    flip = partial(torch.flip, dims=(0,))  # per step, oldest first → per K (index K: the tail before step R-1-K)
    return Lags(group_full, total_full, flip(torch.cat(tails.total_sq)), flip(torch.cat(tails.group_sq)),
                flip(torch.cat(tails.group_dot)), flip(torch.cat(tails.lag_sq)), flip(torch.cat(tails.lag_group_sq)),
                phi, phi_state, losses, maha, psi_table)


def _every_step(system, params, fwd: bands.Forward, windows: Windows, psi: bool, metric, path: GenericPath,
                progress=None) -> Lags:
    """The parameter pass of losses at every step, by lag bands (``bands``, through the path's
    ``band``): the tails start at the full gradient F and each band k is subtracted, so the tail
    before band k+1 is T_k."""
    R, B, D = fwd.b.shape
    G, process_group = windows.masks.shape[0], windows.process_group
    tails = Tails()

    def add(products: list[dict]):
        tails.add(held({n: torch.stack([real(p[n], 1) for p in products], 1) for n in params}, process_group), G)

    with torch.enable_grad():
        add([path.band(system, params, fwd, fwd.b, fwd.out_cotangent, windows, False).products])
    group_full, total_full = ({n: c.clone() for n, c in carries.items()} for carries in tails.carries())
    chunk = path.chunks(system, params, windows, False)  # bands a chunk: ψ comes a band at a time
    lag_norms = bands.LagNorms.empty(B, R, D, fwd.b, metric)
    psi_sum, pending, e = fwd.b.new_zeros(B, R), [], fwd.direct
    for k in range(R):
        lag_norms.add(k, e, metric)
        with torch.enable_grad():
            band = path.band(system, params, fwd, e, fwd.out_cotangent if k == 0 else None, windows, psi)
        pending.append({n: -g for n, g in band.products.items()})
        if psi:
            psi_sum[:, k] = band.psi
        e = band.entering[1:]
        if len(pending) == chunk or k == R - 1:
            add(pending)
            pending = []
        if progress is not None:
            progress(k + 1, R)
    phi, phi_state, maha = lag_norms.means(process_group)
    count = torch.arange(R, 0, -1, dtype=psi_sum.dtype, device=psi_sum.device)

    def by_K(rows):  # records before the F block, before each band: T_{-1}, T_0, ..., T_{R-2}; T_{R-1} = 0
        rows = torch.cat(rows)[2:]
        return torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])

    return Lags(group_full, total_full, by_K(tails.total_sq), by_K(tails.group_sq), by_K(tails.group_dot),
                torch.cat(tails.lag_sq)[1:], torch.cat(tails.lag_group_sq)[1:], phi, phi_state,
                distributed.gather_samples(fwd.losses.mean(1), process_group), maha,
                distributed.gather_samples(psi_sum / count, process_group) if psi else None, positions=R)


@denormals.flushed
def state_gradient_norms(system: RecurrentSystem | torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         *, start: Any = None, process_group: Any = None, loss_at: str = "last") -> xr.Dataset:
    """φ alone: ``phi`` (sample, lag) = ||∂L_s/∂h_{s-k}|| and ``phi_state``, as ``decompose`` gives them,
    from its forward and backward sweep without the parameter pass (about a third of its time).

    What the paper's estimator needs (``fit_decay`` and ``bias_bound`` take the result); the
    exact bias needs ``decompose``. Windows, targets, ``start``, ``process_group`` and
    ``loss_at`` as there (every step: the lags' cotangents band by band, no parameter products).
    """
    every = bands.check_loss_at(loss_at)
    system, x = _prepare(system, inputs, targets, start, every)
    if isinstance(system, CustomStep):
        unreachable(system, system.initial_state(start, x.shape[0]), x[:, 0])  # refuses a step that mixes windows
    params = {n: p.detach() for n, p in system.params().items()}
    readout = {n: p.detach() for n, p in system.readout_params().items()}
    sweep = bands.forward(system, params, readout, x, start, targets) if every else \
        _pick(system, False, None).sweep(system, params, readout, x, start, targets)
    if not torch.isfinite(sweep.b).all() or not torch.isfinite(sweep.losses).all():
        raise InputError("the gradient has NaN or infinite entries: check the model and inputs")
    if every:
        R, B, D = sweep.b.shape
        lag_norms = bands.LagNorms.empty(B, R, D, sweep.b, None)
        for k, e in bands.lag_cotangents(system, params, sweep):
            lag_norms.add(k, e, None)
        phi, phi_state, _ = lag_norms.means(process_group)
        losses = distributed.gather_samples(sweep.losses.mean(1), process_group)
    else:
        phi, phi_state, losses = _lag_norms(sweep, process_group)
        R = x.shape[1]
    return xr.Dataset({"phi": (("sample", "lag"), _numpy(phi)), "phi_state": (("lag", "state"), _numpy(phi_state)),
                       "loss": (("sample",), _numpy(losses))},
                      coords={"sample": np.arange(phi.shape[0]), "lag": np.arange(R)},
                      attrs={**system.describe(), "window_length": R, "batch": int(phi.shape[0]),
                             "dtype": str(sweep.b.dtype).removeprefix("torch."), "device": str(sweep.b.device),
                             "processes": distributed.world(process_group), "loss_at": loss_at})


def _lag_norms(sweep: Sweep, process_group):
    """φ per window and lag, the mean |∂L/∂h| per lag and state element, and the losses, over every rank."""
    b_lag = sweep.b.flip(0).transpose(0, 1)  # (B, R, D) by lag: lag k is the state after step R-k
    phi = distributed.gather_samples(cotangents.euclidean(b_lag), process_group)
    phi_state = distributed.gather_samples(b_lag.abs(), process_group).mean(0)
    return phi, phi_state, distributed.gather_samples(sweep.losses, process_group)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _metric(system, params, sweep, metric, probes, rows, seed, process_group, path: GenericPath | fastpath.FastPath):
    """The Mahalanobis metric given, estimated (the path's way, over every rank), or None, and how it
    was had."""
    D = system.layout.size
    if metric is False:
        return None, "none (metric=False)"
    if metric is not None:
        if not torch.is_tensor(metric) or tuple(metric.shape) != (D, D):
            got = tuple(metric.shape) if torch.is_tensor(metric) else type(metric).__name__
            raise InputError(f"metric must be ({D}, {D}), got {got}")
        return metric.to(sweep.b), "given"
    gen = torch.Generator(device=sweep.b.device).manual_seed(seed)
    estimate = distributed.mean(path.metric(system, params, sweep, probes, rows, gen), process_group)
    return estimate, f"rademacher probes={probes}, rows={rows}, seed={seed}"


def _readout_keys(system) -> dict[str, str]:
    """Each readout parameter's coordinate in the full gradient: the θ entry it is tied to, else its own."""
    theta_ids = {id(p): n for n, p in system.params().items()}
    return {n: theta_ids.get(id(p), "readout." + n) for n, p in system.readout_params().items()}


@dataclass
class Totals:
    """The tails and the full gradient over every rank's windows and groups, divided by the count of
    losses the objective averages: what the Dataset holds besides ``Lags``' per-window norms."""

    abs_bias: torch.Tensor            # (R,) ||T_K||
    grad_norm: torch.Tensor           # () ||g||
    lag_contribution: torch.Tensor    # (R,)
    group_contribution: torch.Tensor  # (G_all, R) over each group's windows
    group_tail_sq: torch.Tensor       # (R, G_all)
    group_tail_dot: torch.Tensor      # (R, G_all)
    group_grad_sq: torch.Tensor       # (G_all,)
    group_grad_dot: torch.Tensor      # (G_all,)
    group_size: torch.Tensor          # (G_all,)


def _finish(lags: Lags, direct: dict, keys: dict, windows: Windows) -> Totals:
    """The distributed finish of the parameter pass: the full gradient, every lag's products plus the
    readout's ``direct`` (a tied readout weight added to its coordinate in θ, ``keys``, rather than
    counted apart), per group and over every window; every rank's groups gathered."""
    process_group = windows.process_group
    scale = windows.total * lags.positions  # the objective is the mean over these losses
    group_full, total_full = dict(lags.group_full), dict(lags.total_full)
    direct_total = distributed.all_reduce_sum({n: g.sum(0) for n, g in direct.items()}, process_group)
    for name, g in direct.items():
        key = keys[name]
        group_full[key] = group_full[key] + g if key in group_full else g
        total_full[key] = total_full[key] + direct_total[name] if key in total_full else direct_total[name]
    grad_sq = sum(v.pow(2).sum() for v in total_full.values())
    group_grad_sq = sum(v.pow(2).sum(-1) for v in group_full.values())
    group_grad_dot = sum(v @ total_full[n] for n, v in group_full.items())
    group_sizes = distributed.gather_groups(windows.masks.sum(1), process_group)

    def by_group(t):  # (R, G) this process's groups → every rank's
        return distributed.gather_groups(t.T, process_group).T

    return Totals(abs_bias=lags.total_sq.clamp_min(0).sqrt() / scale, grad_norm=grad_sq.sqrt() / scale,
                  lag_contribution=lags.lag_sq.clamp_min(0).sqrt() / scale,
                  group_contribution=by_group(lags.lag_group_sq.clamp_min(0).sqrt()).T
                  / (group_sizes[:, None].to(lags.phi) * lags.positions),
                  group_tail_sq=by_group(lags.group_sq) / scale**2, group_tail_dot=by_group(lags.group_dot) / scale**2,
                  group_grad_sq=distributed.gather_groups(group_grad_sq, process_group) / scale**2,
                  group_grad_dot=distributed.gather_groups(group_grad_dot, process_group) / scale**2,
                  group_size=group_sizes)


def _dataset(system, lags: Lags, totals: Totals, metric, attrs: dict) -> xr.Dataset:
    """The decomposition as a Dataset: ``lags``' per-window norms and the ``totals``, named and
    described; ``attrs`` after the run's own."""
    R, phi, np_ = lags.total_sq.shape[0], lags.phi, _numpy
    layout, lag_index = system.layout, np.arange(R)
    group_count = int(totals.group_size.numel())
    ds = xr.Dataset(
        {
            "phi": (("sample", "lag"), np_(phi)),
            "phi_state": (("lag", "state"), np_(lags.phi_state)),
            "abs_bias": (("K",), np_(totals.abs_bias)),
            "rel_bias": (("K",), np_(totals.abs_bias / totals.grad_norm)),
            "lag_contribution": (("lag",), np_(totals.lag_contribution)),
            "group_contribution": (("group", "lag"), np_(totals.group_contribution)),
            "group_tail_sq": (("K", "group"), np_(totals.group_tail_sq)),
            "group_tail_dot": (("K", "group"), np_(totals.group_tail_dot)),
            "group_grad_sq": (("group",), np_(totals.group_grad_sq)),
            "group_grad_dot": (("group",), np_(totals.group_grad_dot)),
            "group_size": (("group",), np_(totals.group_size).astype(np.int64)),
            "loss": (("sample",), np_(lags.losses)),
        },
        coords={
            "sample": np.arange(phi.shape[0]),
            "lag": lag_index,
            "K": lag_index,
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
            "dtype": str(lags.total_sq.dtype).removeprefix("torch."),
            "device": str(lags.total_sq.device),
            "grad_norm": float(totals.grad_norm),
            **attrs,
        },
    )
    if lags.phi_mahalanobis is not None:
        ds["phi_mahalanobis"] = (("sample", "lag"), np_(lags.phi_mahalanobis))
        ds["metric"] = (("state", "state_"), np_(metric))
    if lags.psi is not None:
        ds["psi"] = (("sample", "lag"), np_(lags.psi))
    ds["phi"].attrs["long_name"] = "||dL_s/dh_{s-k}||"
    ds["rel_bias"].attrs["long_name"] = "||E g_K - E g|| / ||E g||"
    ds["lag_contribution"].attrs["long_name"] = "||E g^(k)||, the norm of lag k's mean contribution"
    ds["group_contribution"].attrs["long_name"] = "norm of lag k's mean contribution over each group's windows"
    ds["group_tail_sq"].attrs["long_name"] = "||sum over the group's windows of the tail past K||^2 / B^2"
    ds["group_tail_dot"].attrs["long_name"] = "<group's tail past K, every window's tail past K> / B^2"
    return ds
