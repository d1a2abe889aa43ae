"""The bias of synthetic-gradient (DNI) training against exact BPTT.

Streaming training with synthetic gradients (Jaderberg et al. 2016) cuts the
sequence into chunks of K steps, detaches the state between them, and gives
each chunk's last state h_T a predicted gradient δ̂_T of all later losses. Over
a window of W steps the gradient that training follows is

    ĝ = Σ_chunks ∇θ [ Σ_{t in chunk} ℓ_t + δ̂_T · h_T ]

and the exact gradient it stands for is full BPTT of every loss, those of the
``lookahead`` steps after the window included, through the window's steps
(parameters used after the window are held fixed: their gradient belongs to
later windows). With δ̂ = 0 this is plain truncation, BPTT(K, K); with δ̂ the
exact future gradient it is full BPTT. Both gradients are normalised by 1/(B·W).

A DNI is any callable ``dni(state, memory) -> (gradient, memory)`` on flat
states (batch, D) in the system's layout, returning the per-sample gradient of
the sum of all later losses; ``memory`` is its own recurrent state, ``None`` at
the start (a stateless DNI passes it through).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import xarray as xr

from .errors import InputError
from .recurrent import RecurrentSystem, wrap


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors])


def warm_up(system: RecurrentSystem | torch.nn.Module, dni: Callable, burn: torch.Tensor, K: int,
            start: Any = None) -> tuple[Any, Any]:
    """Run the burn-in ``burn`` (batch first) from ``start`` and the DNI at its chunk boundaries,
    aligned so that a boundary falls at the burn-in's end. Returns ``(start, memory)`` for
    ``synthetic_bias``: the state entering the window (module format) and the DNI's memory."""
    system = wrap(system)
    xb = system.batch_first(burn)
    params = {n: p.detach() for n, p in system.params().items()}
    memory = None
    with torch.no_grad():
        state = system.initial_state(start, xb.shape[0])
        for t in range(xb.shape[1]):
            state, _ = system.step(params, state, xb[:, t])
            if (xb.shape[1] - t - 1) % K == 0:
                _, memory = dni(state, memory)
    return system.unflatten(state), memory


def _loss(system: RecurrentSystem, readout, reads: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The sum of a chunk's losses from what the readout reads after each step, (batch, T, ...)."""
    return system.loss(readout, reads.flatten(0, 1), targets.flatten(0, 1)).sum()


def synthetic_bias(system: RecurrentSystem | torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, K: int,
                   dni: Callable | None = None, *, start: Any = None, memory: Any = None,
                   lookahead: int = 0, K1: int | None = None) -> xr.Dataset:
    """Relative bias of BPTT(K, K) with and without ``dni``'s synthetic gradients, or of BPTT(K1, K).

    ``K1`` (default K; without a DNI): the trainers' BPTT(K1, K2 = K), each K losses back-propagated
    over K1 steps from the state carried, detached, from the previous backward's split, exactly
    as ``trainers.tbptt.Stream`` walks a stream; its bias is ``rel_bias_truncated``.

    ``inputs`` and ``targets`` are batch-first, (B, W + lookahead, ...) and
    (B, W + lookahead, ...): a loss at every step. ``start`` is the state
    entering the window (module format; None: zeros) and ``memory`` the DNI's
    memory there (``warm_up`` gives both from a burn-in). Returns the scalars
    ``rel_bias_truncated`` and ``rel_bias_synthetic`` and, per boundary, the
    exact future gradient's mean norm, the DNI's, and the DNI's relative error.
    """
    system = wrap(system)
    x = system.batch_first(inputs)
    B, T = x.shape[:2]
    W = T - lookahead
    if not 0 <= lookahead < T:
        raise InputError(f"lookahead must be in 0..{T - 1} for {T} steps, got {lookahead}")
    if not torch.is_tensor(targets) or tuple(targets.shape[:2]) != (B, T):
        got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise InputError(f"targets must be (batch, steps) = ({B}, {T}), one per step, got {got}")
    if not 1 <= K <= W:
        raise InputError(f"K must be in 1..{W} for a window of {W} steps, got {K}")
    K1 = K if K1 is None else K1
    if K1 < K or (dni is not None and K1 != K):
        raise InputError(f"K1 must be at least K = {K}, and equal to it with a DNI (BPTT(K, K) chunks), got {K1}")
    params, readout = system.params(), system.readout_params()
    seen = {id(p) for p in params.values()}
    trained = [*params.values(), *(p for p in readout.values() if id(p) not in seen)]  # a tied weight once
    fixed = {n: p.detach() for n, p in params.items()}
    fixed_readout = {n: p.detach() for n, p in readout.items()}
    ends = [*range(K, W, K), W]  # steps after which a chunk ends
    with torch.no_grad():
        state = system.initial_state(start, B)

    with torch.enable_grad():
        # Exact: full BPTT; each boundary's continuing state is its own node, so its
        # gradient is the gradient of the later losses alone.
        h, loss, carried = state, 0.0, []
        for begin, end in zip([0, *ends], [*ends, T] if lookahead else ends):
            inside = end <= W
            h, reads = system.run(params if inside else fixed, h, x[:, begin:end])  # fused where it can be
            loss = loss + _loss(system, readout if inside else fixed_readout, reads, targets[:, begin:end])
            if inside:
                h = h.clone()
                carried.append(h)
        grads = torch.autograd.grad(loss / (B * W), [*trained, *carried], allow_unused=True)
        exact = _flat(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, trained))
        # per sample, Σ of later losses (none after the last boundary without a lookahead: zero)
        future = [torch.zeros_like(h) if g is None else g * (B * W) for g, h in zip(grads[len(trained):], carried)]

        # Truncated: each backward's K losses [pos, end) from the state carried, detached, at carry_pos
        # (K1 - K steps before pos, never before the last carry); the DNI's term at each end.
        carry, carry_pos, pos, loss, term, predicted = state, 0, 0, 0.0, 0.0, []
        while pos < W:
            end = min(pos + K, W)
            split = min(max(carry_pos, end - (K1 - K)), end)
            h = next_carry = carry.detach()
            points = sorted({carry_pos, split, pos, end})
            for begin, stop in zip(points, points[1:]):  # pos and split fall between pieces
                h, reads = system.run(params, h, x[:, begin:stop])
                next_carry = h if stop == split else next_carry
                if begin >= pos:
                    loss = loss + _loss(system, readout, reads, targets[:, begin:stop])
            if dni is not None:
                with torch.no_grad():
                    delta, memory = dni(h.detach(), memory)
                predicted.append(delta)
                term = term + (delta * h).sum()
            carry, carry_pos, pos = next_carry, split, end
        grads = torch.autograd.grad(loss / (B * W), trained, allow_unused=True, retain_graph=dni is not None)
        truncated = _flat(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, trained))
        if dni is not None:
            grads = torch.autograd.grad(term / (B * W), trained, allow_unused=True)
            synthetic = truncated + _flat(g if g is not None else torch.zeros_like(p) for g, p in zip(grads, trained))

    norm = exact.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise InputError("the exact gradient is zero or not finite on these windows: nothing to compare against")
    nan = float("nan")
    future_norm = torch.stack([f.norm(dim=1).mean() for f in future])
    ds = xr.Dataset(
        {
            "rel_bias_truncated": float((truncated - exact).norm() / norm),
            "rel_bias_synthetic": float((synthetic - exact).norm() / norm) if dni is not None else nan,
            "future_norm": (("boundary",), future_norm.detach().cpu().numpy()),
        },
        coords={"boundary": np.asarray(ends)},
        attrs={**system.describe(), "K": K, "K1": K1, "window_length": W, "lookahead": lookahead, "batch": B,
               "grad_norm": float(norm)},
    )
    if dni is not None:
        ds["synthetic_norm"] = ("boundary", torch.stack([p.norm(dim=1).mean() for p in predicted]).cpu().numpy())
        errors = [(p - f).norm(dim=1).mean() / f.norm(dim=1).mean().clamp_min(1e-30) for p, f in zip(predicted, future)]
        ds["synthetic_error"] = ("boundary", torch.stack(errors).detach().cpu().numpy())
    ds["future_norm"].attrs["long_name"] = "mean ||d(later losses)/dh_T||"
    return ds
