"""Gradient hooks on parameters (``p.register_hook``), applied as ``loss.backward()`` applies them.

``loss.backward()`` hands a parameter's hooks its *total* gradient; biaskit
splits that gradient by lag and by window, and every piece passes through the
hooks on its own. The two agree exactly when every hook is linear, which is
checked at run time (a hook that zeroes a weight's diagonal or scales it is; a
clipping hook is not, and is refused). A hook's side effects (logging, say)
run once per piece.
"""
from __future__ import annotations

import torch

from .errors import InputError


def hooks_of(tensor: torch.Tensor) -> list:
    """The gradient hooks registered on ``tensor``, in the order autograd runs them."""
    return list((getattr(tensor, "_backward_hooks", None) or {}).values())


def apply(tensor: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as ``tensor``'s hooks leave it: each hook gets the previous one's result (a hook that
    returns None keeps it; one that writes into its argument gets a copy)."""
    for hook in hooks_of(tensor):
        result = hook(grad.clone())
        grad = grad if result is None else result
    return grad


def hooked(params: dict[str, torch.Tensor]) -> list[str]:
    """The names in ``params`` whose tensors carry gradient hooks; an InputError when one is not linear."""
    names = [name for name, p in params.items() if hooks_of(p)]
    for name in names:
        _check_linear(name, params[name])
    return names


def _check_linear(name: str, p: torch.Tensor):
    gen = torch.Generator(device=p.device).manual_seed(0)
    a, b = (torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for _ in range(2))
    with torch.no_grad():
        together, apart = apply(p, a + 2.5 * b), apply(p, a) + 2.5 * apply(p, b)
    scale = float(apart.abs().max()) if apart.numel() else 0.0
    if together.shape != p.shape or not torch.allclose(together, apart, rtol=1e-5, atol=1e-6 * scale + 1e-12):
        raise InputError(f"the gradient hook on {name} is not linear (hook(a + c·b) differs from "
                         "hook(a) + c·hook(b)): loss.backward() applies it to the total gradient, biaskit to "
                         "each lag's part, and the two agree only for linear hooks; measure without it")
