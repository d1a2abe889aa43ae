"""What the decomposition's paths share, below them: the sweep's record, the windows' groups and
ranks, the chunk size, the unrolled forward pass and the products' real form.

``decompose`` picks a path (its ``GenericPath``, ``fastpath.FastPath``) and runs it; ``fastpath``
and ``bands`` build on this module, never on ``decompose``, so no import runs in a circle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from . import distributed

#: Elements of a chunk's parameter products (and the fast path's square Gram matrices) held at once.
CHUNK_ELEMENTS = 2**23
#: Most steps in one chunk of the parameter pass.
CHUNK_STEPS = 16


@dataclass
class Sweep:
    """What one forward and one backward pass over the windows leave for the parameter pass."""

    b: torch.Tensor             # (R, B, D) per-sample ∂L_s/∂h_t, t = 1..R
    losses: torch.Tensor        # (B,)
    output: torch.Tensor        # (B, ...) the last step's output, detached
    h_prev: torch.Tensor        # (R, B, D) the state entering each step
    x: torch.Tensor             # (R, B, ...) each step's input
    out_cotangent: torch.Tensor | None = None  # (B, ...) ∂L_s/∂o for steps that return an output
    fast: Any = None            # the gates' cotangents on the fast path (``fastpath.Gates``)


@dataclass
class Windows:
    """This process's windows in groups (the jackknife's), and where they stand among every rank's."""

    masks: torch.Tensor         # (G, B) 0/1: each group's windows, contiguous
    process_group: Any
    total: int = field(init=False)   # every rank's windows
    offset: int = field(init=False)  # the windows of the ranks before this one

    def __post_init__(self):
        B = self.masks.shape[1]
        self.total = distributed.total(B, self.process_group)
        self.offset = distributed.offset(B, self.process_group)

    @cached_property
    def members(self) -> list[slice]:
        """Each group's windows as a slice."""
        return [slice(int(r[0]), int(r[-1]) + 1) for r in (torch.nonzero(m).flatten() for m in self.masks)]


def chunk_steps(width: int, rows: int = 0, most: float = CHUNK_STEPS) -> int:
    """Steps per chunk: as many as ``CHUNK_ELEMENTS`` hold at ``width`` elements a step and, on the
    fast path, square matrices of ``rows`` rows a step (their size grows as the chunk's square), at
    most ``most`` and ``CHUNK_STEPS`` (the Gram matrices' cost grows with the chunk)."""
    steps = CHUNK_ELEMENTS // max(1, width)
    if rows:
        steps = min(steps, math.isqrt(CHUNK_ELEMENTS) // rows)
    return max(1, min(CHUNK_STEPS, most, steps))


def unroll(system, params, x, state, detach_before=None, nodes=False, outputs=False):
    """States after each step of ``x`` (batch, time, F) and the last step's output (None when
    the readout reads the state), or with ``outputs`` every step's; optionally detach the state
    entering one step. ``nodes``: every state and output a graph node, even one that depends on
    nothing that requires grad (a step that ignores its incoming state), so its gradient can be
    asked for."""
    states, outs = [state], []
    for t in range(x.shape[1]):
        if t == detach_before:
            state = state.detach()
        state, out = system.step(params, state, x[:, t])
        if nodes and not state.requires_grad:
            state = state.detach().requires_grad_()
        if nodes and out is not None and not out.requires_grad:
            out = out.detach().requires_grad_()
        states.append(state)
        outs.append(out)
    return states, (outs if outputs else outs[-1])


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
