"""A step's parameter products by ``torch.autograd``, against the module's own parameters.

``torch.func`` substitutes θ and batches the steps; some real cells defeat
it: an old-style ``torch.autograd.Function`` (no ``setup_context``), a step
that reads its parameters through a container made in ``__init__``, or
gradient hooks on parameters (which only autograd applies). For those, every
product is an ordinary backward pass through one step of the rows it needs,
differentiated with respect to the module's own parameter tensors: whatever
reaches them, and their hooks, count as in ``loss.backward()``. Slower
(a backward call per group of windows and step, one per window for ψ) and
exact.
"""
from __future__ import annotations

import torch

from .recurrent import Params


def by_autograd(system, own: Params, h: torch.Tensor, x: torch.Tensor, cotangent: torch.Tensor,
                out_cotangent: torch.Tensor | None, per_row: bool):
    """The step over the rows ``h`` (N, D), ``x`` (N, ...) pulled back from the cotangents on its new
    state (and output): the parameter products summed over the rows ``{name: tensor}``, the
    cotangent on the entering state (N, D), the new states (N, D), and with ``per_row`` each row's
    squared product norm (N,) (one step per row), else None."""
    if not per_row:
        grads, entering, new = _pull(system, own, h, x, cotangent, out_cotangent, True)
        return grads, entering, new, None
    rows = [_pull(system, own, h[i:i + 1], x[i:i + 1], cotangent[i:i + 1],
                  None if out_cotangent is None else out_cotangent[i:i + 1], True) for i in range(h.shape[0])]
    grads = {n: torch.stack([r[0][n] for r in rows]).sum(0) for n in own}
    sq = torch.stack([sum(_real(g).pow(2).sum() for g in r[0].values()) for r in rows])
    return grads, torch.cat([r[1] for r in rows]), torch.cat([r[2] for r in rows]), sq


def state_cotangent(system, params: Params, h: torch.Tensor, x: torch.Tensor, cotangent: torch.Tensor,
                    out_cotangent: torch.Tensor | None):
    """The cotangent on the state entering the step over the rows ``h``, ``x`` (any θ ``params``), and
    the new states: a backward pass with respect to the state alone."""
    _, entering, new = _pull(system, params, h, x, cotangent, out_cotangent, False)
    return entering, new


def _pull(system, params, h, x, cotangent, out_cotangent, wrt_params: bool):
    wrt = dict(params) if wrt_params else {}
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        new, out = system.step(params, h, x)
        outputs, cotangents = [new], [cotangent]
        if out_cotangent is not None:
            outputs.append(out)
            cotangents.append(out_cotangent)
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], [*wrt.values(), h], [c for _, c in pairs],
                                    allow_unused=True) if pairs else [None] * (len(wrt) + 1)
    products = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(wrt.items(), grads)}
    entering = torch.zeros_like(h) if grads[-1] is None else grads[-1]
    return products, entering.detach(), new.detach()


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t
