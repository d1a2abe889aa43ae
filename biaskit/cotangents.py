"""The norms of state cotangents ∂L/∂h in torch: Euclidean, Mahalanobis, and the Mahalanobis metric's estimate.

The Mahalanobis metric is the paper's proposed fix for high-dimensional
states (Sec. 5.4): ``M = E[J Jᵀ]`` with ``J = ∂H/∂θ`` the immediate Jacobian
of one step, so that ``bᵀ M b`` is the expected squared norm ``E||bᵀ J||²`` of
the parameter-space contribution a cotangent ``b`` makes at a typical step.
What each norm is, and which of decompose's options measure it, is the
registry's (``norms``, torch-free, which the statistics read); this is the
core's side, which ``decompose`` runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.func import jvp, vmap

from .recurrent import Params, RecurrentSystem


def _scale(cotangents: torch.Tensor) -> torch.Tensor:
    """Each vector's largest |entry| (1 where it is 0): the norms below divide by it first, so that
    entries whose squares underflow (below ~1e-19 in float32) still give a norm that is not 0."""
    top = cotangents.abs().amax(dim=-1, keepdim=True) if cotangents.shape[-1] else \
        cotangents.new_zeros(*cotangents.shape[:-1], 1)
    return torch.where(top > 0, top, torch.ones_like(top))


def euclidean(cotangents: torch.Tensor) -> torch.Tensor:
    """||b|| over the last (state) dimension, without underflow."""
    scale = _scale(cotangents)
    return torch.linalg.vector_norm(cotangents / scale, dim=-1) * scale.squeeze(-1)


def mahalanobis(cotangents: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """sqrt(bᵀ M b) over the last (state) dimension, without underflow."""
    scale = _scale(cotangents)
    unit = cotangents / scale
    quad = torch.einsum("...i,ij,...j->...", unit, metric, unit)
    return quad.clamp_min(0).sqrt() * scale.squeeze(-1)


def estimate_metric(
    system: RecurrentSystem,
    params: Params,
    states: torch.Tensor,
    inputs: torch.Tensor,
    probes: int,
    rows: int,
    generator: torch.Generator,
    pushes: Callable | None = None,
    own: bool = False,
) -> torch.Tensor:
    """Unbiased estimate of ``M = E[J Jᵀ]`` over the given (step, sample) pairs.

    For a Rademacher vector v in parameter space, ``E_v[(J v)(J v)ᵀ] = J Jᵀ``.
    ``rows`` (step, sample) pairs are drawn uniformly without replacement and
    ``J v`` for all of them is one forward-mode product of the step applied to
    them as one batch; ``M̂`` averages ``u uᵀ`` over the pairs and ``probes``
    independent draws of v.  Cost: ``rows * probes`` single-sample steps (with
    ``own``, a batch per step). A step
    that ``vmap`` cannot batch is probed one v at a time; one without
    forward-mode rules, through two reverse-mode passes. ``pushes(states, inputs,
    tangents)`` gives every probe's ``J v`` at once where it is written out (the
    fast path's, for the built-in cells); ``torch.func.jvp`` otherwise. ``own``:
    ``params`` are the module's own tensors, and ``J v`` is taken by double
    backward against them (``pullback``: cells torch.func cannot follow).

    states: (steps, batch, D) states entering each step; inputs: (steps, batch, ...).
    """
    flat_h = states.reshape(-1, states.shape[-1])
    flat_x = inputs.reshape(-1, *inputs.shape[2:])
    pick = torch.arange(flat_h.shape[0], device=flat_h.device)
    if rows < flat_h.shape[0]:
        pick = torch.randperm(flat_h.shape[0], generator=generator, device=generator.device)[:rows]
        flat_h, flat_x = flat_h[pick], flat_x[pick]

    tangents = {
        name: _rademacher((probes, *p.shape), generator, p)
        for name, p in params.items()
    }
    if pushes is not None:
        u = pushes(flat_h, flat_x, tangents)
    elif own:  # a cell torch.func cannot follow may read one row for all: only rows of one step share a batch
        step_of = pick // states.shape[1]
        u = torch.cat([_pushed(lambda p, rows=step_of == t: system.step(p, flat_h[rows], flat_x[rows])[0], params,
                               tangents, own) for t in step_of.unique()], dim=1)
    else:
        u = _pushed(lambda p: system.step(p, flat_h, flat_x)[0], params, tangents, own)
    u = u.reshape(-1, u.shape[-1])
    return u.T @ u / u.shape[0]


def _pushed(step, params: Params, tangents: Params, own: bool) -> torch.Tensor:
    """Every probe's ``J v``, (probes, rows, D), through torch.func: batched by vmap, else one probe
    at a time, else (no forward-mode rule) by double backward; by double backward against the
    module's own tensors when ``own``."""
    def push(tangent):
        return jvp(step, (params,), (tangent,))[1]

    draws = [{n: t[i] for n, t in tangents.items()} for i in range(next(iter(tangents.values())).shape[0])]
    if own:
        return torch.stack([_jvp_by_vjp(step, params, v, own) for v in draws])
    try:
        return vmap(push)(tangents)
    except RuntimeError:
        try:
            return torch.stack([push(v) for v in draws])
        except RuntimeError:  # no forward-mode rule: J v = d/du <vjp(u), v>, by double backward
            return torch.stack([_jvp_by_vjp(step, params, v, own) for v in draws])


def _rademacher(shape, generator, like: torch.Tensor) -> torch.Tensor:
    """±1 entries; ±1 ± i for a complex parameter, whose real and imaginary parts are two
    real coordinates each with E v vᵀ = I."""
    def signs():
        return torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.real.dtype).mul_(2).sub_(1)
    if like.is_complex():
        return torch.complex(signs(), signs())
    return signs().to(like.dtype)


def _jvp_by_vjp(f, params: Params, tangent: Params, own: bool) -> torch.Tensor:
    with torch.enable_grad():
        leaves = params if own else {n: p.detach().requires_grad_() for n, p in params.items()}
        out = f(leaves)
        u = torch.zeros_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_outputs=u, create_graph=True, allow_unused=True)
        inner = sum((g * tangent[n].conj()).real.sum() for n, g in zip(leaves, grads) if g is not None)
        return torch.autograd.grad(inner, u)[0].detach()
