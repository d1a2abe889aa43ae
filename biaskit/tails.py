"""The running tails of the per-lag contributions, a chunk of steps at a time, oldest first.

``T_K``, the bias of truncation K, is the sum of the contributions of the steps
older than R-K: a running sum from the oldest step. What the bias and its
jackknife need of it, for every K, are squared norms and dot products, of the
total tail and of each group of windows' tail. A chunk's blocks (one per
parameter) report their products with the carries (the tails before the chunk)
and the chunk's Gram matrices; the running sums inside the chunk then follow by
cumulative sums over its c steps, not over |θ|.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from . import distributed


@dataclass
class Chunk:
    """What one chunk of c steps adds to the tails, summed over parameter blocks. ``X_gi`` is group
    g's product at step i, ``T_i`` every window's, ``C_g`` and ``C`` the carries (the tails before
    the chunk)."""

    carry_sq: Any = 0.0        # ||C||²
    group_carry_sq: Any = 0.0  # (G,) ||C_g||²
    group_carry_dot: Any = 0.0  # (G,) <C_g, C>
    v: Any = 0.0               # (c,) <C, T_i>
    TT: Any = 0.0              # (c, c) <T_i, T_i'>
    u: Any = 0.0               # (G, c) <C_g, X_gi>
    W: Any = 0.0               # (G, c) <C_g, T_i>
    y: Any = 0.0               # (G, c) <X_gi, C>
    XX: Any = 0.0              # (G, c, c) <X_gi, X_gi'>
    XT: Any = 0.0              # (G, c, c) <X_gi, T_i'>

    def __add__(self, other: Chunk) -> Chunk:
        return Chunk(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Chunk)))


def carry_products(carry_g: torch.Tensor, carry_t: torch.Tensor, T: torch.Tensor, entries=None) -> Chunk:
    """A block's carries with themselves and with the chunk's totals ``T`` (c, n), which cover the
    carries' ``entries`` (all of them when None)."""
    covered_g, covered_t = (carry_g, carry_t) if entries is None else (carry_g[:, entries], carry_t[entries])
    return Chunk(carry_sq=carry_t @ carry_t, group_carry_sq=torch.linalg.vector_norm(carry_g, dim=1).square(),
                 group_carry_dot=carry_g @ carry_t, v=T @ covered_t, TT=T @ T.T, W=covered_g @ T.T)


@dataclass
class Products:
    """One parameter's products in a chunk, held whole: per group (G, c, n) and in total (c, n)."""

    name: str
    X: torch.Tensor
    T: torch.Tensor

    @property
    def width(self) -> int:
        return self.X.shape[2]

    def stats(self, carry_g, carry_t) -> Chunk:
        X, T = self.X, self.T
        return carry_products(carry_g, carry_t, T) + Chunk(
            u=torch.bmm(X, carry_g[:, :, None])[..., 0], y=X @ carry_t, XX=X @ X.transpose(1, 2), XT=X @ T.T)

    def update(self, carry_g, carry_t):
        carry_g += self.X.sum(1)
        carry_t += self.T.sum(0)


@dataclass
class Tails:
    """Running tails of the per-lag contributions, from the oldest step on: every window's together
    (all ranks' under a process group) and each of this process's groups of windows apart.

    For each step t (oldest first) it records, before adding step t's products,
    the squared norm of the total tail and, per group, the squared norm of its
    tail and its dot product with the total tail; and the squared norms of step
    t's own products, total and per group.
    """

    group_carry: dict = field(default_factory=dict)  # name -> (G, n)
    total_carry: dict = field(default_factory=dict)  # name -> (n,)
    total_sq: list = field(default_factory=list)
    group_sq: list = field(default_factory=list)
    group_dot: list = field(default_factory=list)
    lag_sq: list = field(default_factory=list)
    lag_group_sq: list = field(default_factory=list)

    def carries(self) -> tuple[dict, dict]:
        """Each parameter's carries, ``{name: (G, n)}`` and ``{name: (n,)}``: the whole gradient's
        pieces once every step is in. A block kept for several parameters side by side (its name a
        tuple of (parameter, columns)) is split back into theirs."""
        group, total = {}, {}
        for key, carry_g in self.group_carry.items():
            if isinstance(key, str):
                group[key], total[key] = carry_g, self.total_carry[key]
                continue
            names, columns = zip(*key)
            G = carry_g.shape[0]
            for name, g, t in zip(names, carry_g.view(G, -1, sum(columns)).split(columns, dim=2),
                                  self.total_carry[key].view(-1, sum(columns)).split(columns, dim=1)):
                group[name], total[name] = g.reshape(G, -1), t.reshape(-1)
        return group, total

    def add(self, blocks, groups: int):
        """Add one chunk of steps, given as blocks (``Products``, or the fast path's) that each
        report their ``Chunk`` against the carries before the chunk and then update them.

        Each tail before step j is a carry plus the chunk's steps i < j, so its squared norms and
        dot products expand into the carries' products with the chunk's steps and 2-d running sums
        of the chunk's Gram matrices: matmuls, never a cumulative sum of (G × c × n) tensors.
        """
        s = Chunk()
        for block in blocks:
            name = getattr(block, "name", None)
            if name is None:  # the Gram of the chunk's rows: no carry of its own
                s = s + block.stats()
                continue
            if name not in self.group_carry:
                self.group_carry[name] = block.T.new_zeros(groups, block.width)
                self.total_carry[name] = block.T.new_zeros(block.width)
            carry_g, carry_t = self.group_carry[name], self.total_carry[name]
            s = s + block.stats(carry_g, carry_t)
            block.update(carry_g, carry_t)
        self.total_sq.append(s.carry_sq + 2 * _before(s.v) + _within(s.TT))
        self.group_sq.append((s.group_carry_sq[:, None] + 2 * _before(s.u) + _within(s.XX)).T)
        self.group_dot.append((s.group_carry_dot[:, None] + _before(s.W + s.y) + _within(s.XT)).T)
        self.lag_sq.append(s.TT.diagonal())
        self.lag_group_sq.append(s.XX.diagonal(dim1=1, dim2=2).T)


def _before(values: torch.Tensor) -> torch.Tensor:
    """Σ_{i<j} values[..., i] for each j (the last dimension)."""
    return values.cumsum(-1) - values


def _within(gram: torch.Tensor) -> torch.Tensor:
    """Σ_{i, i' < j} gram[..., i, i'] for each j: the squared norm of the chunk's steps before j."""
    inclusive = gram.cumsum(-1).cumsum(-2).diagonal(dim1=-2, dim2=-1)
    return torch.cat([inclusive.new_zeros(*inclusive.shape[:-1], 1), inclusive[..., :-1]], dim=-1)


def held(products: dict[str, torch.Tensor], process_group) -> list[Products]:
    """Per-group products ``{name: (G, c, n)}`` as blocks, with their totals over every rank's windows."""
    totals = distributed.all_reduce_sum({n: X.sum(0) for n, X in products.items()}, process_group)
    return [Products(n, X, totals[n]) for n, X in products.items()]
