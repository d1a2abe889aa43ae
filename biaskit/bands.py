"""Losses at every step: the per-lag decomposition by lag bands.

With a loss ``L_s`` at every step s of a window of R steps, the objective is
the mean of the losses over windows and steps, g is full BPTT over the window,
and ĝ_K keeps, for each loss, the K + 1 steps ending at its own step (BPTT(R,
1) applied at every step). Lag k's contribution gathers every loss's:

    G_k = Σ_t e^k_t · ∂H/∂θ|_{step t},   e^k_t = ∂L_{t+k}/∂h_t,

where ``e^k_t`` is the cotangent, on what step t returns, of the loss k steps
later. The cotangents of one lag follow from the previous lag's by one step
back, for every t at once:

    e^0_t = the readout's own partial of L_t,   e^k_t = (∂h_{t+1}/∂h_t)ᵀ e^{k-1}_{t+1},

so lag k's *band* (steps 0..R-1-k) is one batched vector-Jacobian product of
the step over (R-k)·B rows, which also yields the band's parameter products.
The bias of K is ``T_K = Σ_{k>K} G_k = F - Σ_{k≤K} G_k``, where F (the full
gradient less the readout's) comes from one ordinary backward pass with every
loss injected: the running tails start at F and each band is subtracted, so
the tails of ``tails.Tails`` serve unchanged. The bands cost Σ_k (R-k) = R(R+1)/2
step products where a last-step loss needs R: this is inherent (G_k is a sum
along a diagonal of the R × R pairs (step, loss)), and the benchmark reports it.

φ_k is the mean over loss positions s (those with s ≥ k) of ``||∂L_s/∂h_{s-k}||``
and ψ_k the mean of the norms of the single products, per window, so every
output of ``decompose`` keeps its meaning per K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import vjp, vmap

from . import cotangents, distributed, limits, pullback
from .errors import InputError
from .recurrent import Params, TorchRecurrent
from .sweep import CHUNK_ELEMENTS, real, unroll

#: Where a window's losses are: its last step (the paper's BPTT(R, 1)) or every step.
LOSS_AT = ("last", "every")


def check_loss_at(loss_at) -> bool:
    """Whether ``loss_at`` asks for every step's loss; an InputError for anything but ``LOSS_AT``."""
    if loss_at not in LOSS_AT:
        raise InputError(f"loss_at must be one of {', '.join(map(repr, LOSS_AT))}, got {loss_at!r}")
    return loss_at == "every"


def check_targets(targets, batch: int, length: int):
    """Every-step targets: one per window and step, (batch, length, ...)."""
    if not torch.is_tensor(targets) or targets.dim() < 2 or tuple(targets.shape[:2]) != (batch, length):
        got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise InputError(f"with losses at every step, targets must have one entry per window and step "
                         f"({batch}, {length}, ...), got {got}")


def check_readout_memory(system, readout, read: torch.Tensor):
    """Refuse, with the figures, every step's readout (a language model's logits over the vocabulary at
    every step of every window) that cannot fit: sized from one row before the whole is formed."""
    with torch.no_grad():
        row = system.call(system.readout, system.readout_params(), readout, (read[0, :1],))
    need = 3 * row.numel() * row.element_size() * read.shape[0] * read.shape[1]  # outputs, their gradient, the loss's
    free = limits.available_memory(read.device)
    if need > free:
        raise InputError(f"the readout at every step of {read.shape[1]} windows of {read.shape[0]} steps needs about "
                         f"{need / 2**30:.1f} GiB, but {read.device} has {free / 2**30:.1f} GiB free: use fewer or "
                         "shorter windows")


def step_losses(system, readout, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, R) the loss at each step of each window, from the outputs (B, R, ...) in one call of the loss."""
    B, R = outputs.shape[:2]
    return system.loss(readout, outputs.flatten(0, 1), targets.flatten(0, 1)).reshape(B, R)


@dataclass
class Forward:
    """What the forward pass and the ordinary backward pass leave for the bands."""

    h_prev: torch.Tensor        # (R, B, D) the state entering each step
    x: torch.Tensor             # (R, B, ...) each step's input
    outputs: torch.Tensor       # (B, R, ...) what the readout reads at each step, detached
    losses: torch.Tensor        # (B, R)
    after: torch.Tensor         # (R, B, D) the state after each step
    b: torch.Tensor             # (R, B, D) ∂(Σ_s L_s)/∂h_t: full BPTT's state cotangents
    direct: torch.Tensor        # (R, B, D) e^0: the readout's own partial on the state after each step
    out_cotangent: torch.Tensor | None  # (R, B, ...) ∂L_t/∂o_t for steps that return an output


def forward(system, params, readout, x: torch.Tensor, start, targets) -> Forward:
    """The unrolled window with its graph, every step's loss, and full BPTT's cotangents."""
    R = x.shape[1]
    with torch.enable_grad():
        first = system.initial_state(start, x.shape[0]).detach().requires_grad_()
        states, outs = unroll(system, params, x, first, nodes=True, outputs=True)
        after = torch.stack(states[1:]).detach().requires_grad_()  # (R, B, D): leaves for the readout's partial
        read = torch.stack(outs) if system.step_output else system.output(after.flatten(0, 1)).unflatten(0, (R, -1))
        read_leaf = read.detach().requires_grad_()
        check_readout_memory(system, readout, read_leaf)
        losses = step_losses(system, readout, read_leaf.transpose(0, 1), targets)
        (out_cot,) = torch.autograd.grad(losses.sum(), [read_leaf])
        if system.step_output:
            direct = torch.zeros_like(after)
            surrogate = sum((o * c).sum() for o, c in zip(outs, out_cot))
        else:
            (direct,) = torch.autograd.grad(read, [after], out_cot)
            surrogate = sum((s * d).sum() for s, d in zip(states[1:], direct))
        grads = torch.autograd.grad(surrogate, states[1:], allow_unused=True) if surrogate.requires_grad \
            else [None] * R
    b = torch.stack([torch.zeros_like(s) if g is None else g for g, s in zip(grads, states[1:])])
    return Forward(torch.stack(states[:-1]).detach(), x.transpose(0, 1), read.detach().transpose(0, 1),
                   losses.detach(), after.detach(), b, direct.detach(), out_cot if system.step_output else None)


def check_rows(system, new: torch.Tensor, expected: torch.Tensor):
    """Refuse a step whose rows of one batch are not independent: a band batches the rows of many steps
    at once, and a step that reads one row for all (``.item()``, batch statistics) would be measured
    wrong. ``new``: the band's new states, ``expected``: the forward pass's, step by step."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not torch.allclose(new, expected, rtol=1e-4, atol=1e-5 * scale + 1e-12):
        raise InputError(f"{system.kind}'s step gives other states when the rows of several steps share a batch "
                         "than step by step (a value read from one row for all, such as .item(), or batch "
                         "statistics): losses at every step batch the steps together, so this cell can be "
                         "measured with loss_at='last' only")


def gate_norms_apply(system, params: Params, x: torch.Tensor) -> bool:
    """Whether ``gate_norms`` serves ``system``: a built-in module whose weights are distinct real tensors,
    under no encoder or an ``nn.Embedding`` of its own that reads one token a row."""
    if not isinstance(system, TorchRecurrent) or system.aliases or any(p.is_complex() for p in params.values()):
        return False
    encoder = system.encoder
    if encoder is None:
        return True
    return (type(encoder) is nn.Embedding and encoder.max_norm is None and not encoder.scale_grad_by_freq
            and x.dim() == 1 and all(id(p) != id(encoder.weight) for p in system.module.parameters()))


def gate_norms(system: TorchRecurrent, params: Params, h: torch.Tensor, x: torch.Tensor,
               cotangent: torch.Tensor) -> torch.Tensor:
    """Each row's squared parameter-product norm (N,) without forming the products: a weight's product
    with one row is ``δ aᵀ``, the cotangent of its pre-activation times what it multiplies, so its
    squared norm is ``||δ||²·||a||²`` (a bias: ``||δ||²``), and an embedding's is its row's
    cotangent's (none at ``padding_idx``). The δ come from one batched backward of the step."""
    with torch.enable_grad():
        inp = system.encode(params, x).detach().requires_grad_()
        new, read = system.layers(params, h.detach().requires_grad_(), inp)  # every δ then has a graph
        pre = [t for gi, gh, _, _ in read for t in (gi, gh)]
        cots = torch.autograd.grad(new, [*pre, inp], cotangent, allow_unused=True)
    sq = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    for layer, (_, _, layer_in, h_read) in enumerate(read):
        suffix = system.suffix(layer)
        for kind, delta, a in (("ih", cots[2 * layer], layer_in), ("hh", cots[2 * layer + 1], h_read)):
            if delta is None:
                continue
            size = delta.pow(2).sum(-1)
            if f"weight_{kind}{suffix}" in params:
                sq += size * a.detach().pow(2).sum(-1)
            if f"bias_{kind}{suffix}" in params:
                sq += size
    if "encoder.weight" in params and cots[-1] is not None:
        kept = torch.ones_like(sq) if system.encoder.padding_idx is None else (x != system.encoder.padding_idx)
        sq += cots[-1].pow(2).sum(-1) * kept
    return sq


def _pull(system, params, h, x, cotangent, out_cotangent, per_row: bool, expected: torch.Tensor,
          own: Params | None):
    """The step over the rows ``h`` (N, D), ``x`` (N, ...) pulled back from the cotangents on what it
    returns: the summed parameter products ``{name: tensor}``, the cotangent on the entering state
    (N, D), and, with ``per_row``, each row's squared parameter-product norm (N,). ``expected``: the
    new states the forward pass gave these rows (``check_rows``). By torch.func, or with ``own``
    (the module's own tensors) by torch.autograd (``pullback``)."""
    if own is not None:
        grads, state_cot, new, sq = pullback.by_autograd(system, own, h, x, cotangent, out_cotangent, per_row)
        check_rows(system, new, expected)
        return grads, state_cot, sq

    def step(p, s):
        new, out = system.step(p, s, x)
        return (new, out) if out_cotangent is not None else new

    cot = (cotangent, out_cotangent) if out_cotangent is not None else cotangent
    primal, pull = vjp(step, params, h)
    check_rows(system, primal[0] if out_cotangent is not None else primal, expected)
    if not per_row or gate_norms_apply(system, params, x):
        grads, state_cot = pull(cot)
        return grads, state_cot, gate_norms(system, params, h, x, cotangent) if per_row else None

    def one_row(hr, xr, cr):
        def row_step(p, s):
            new, out = system.step(p, s, xr[None])
            return (new, out) if out_cotangent is not None else new
        _, pull = vjp(row_step, params, hr[None])
        return pull(tuple(c[None] for c in cr) if isinstance(cr, tuple) else cr[None])

    rows = max(1, CHUNK_ELEMENTS // sum(p.numel() for p in params.values()))  # single products held at once
    totals, entering, sq = {}, [], []
    for part in range(0, h.shape[0], rows):
        piece = slice(part, part + rows)
        grads, state_cot = vmap(one_row)(h[piece], x[piece], tuple(c[piece] for c in cot)
                                         if isinstance(cot, tuple) else cot[piece])
        sq.append(sum(real(g, 1).pow(2).sum(-1) for g in grads.values()))
        totals = {n: g.sum(0) + totals[n] if totals else g.sum(0) for n, g in grads.items()}
        entering.append(state_cot)
    return totals, torch.cat(entering).reshape(h.shape), torch.cat(sq)


@dataclass
class Band:
    """One band's parameter products per group ``{name: (G, ...)}``, the cotangents on the states
    entering its steps (R-k, B, D), and its per-window sums of single-product norms (B,) or None."""

    products: dict
    entering: torch.Tensor
    psi: torch.Tensor | None


def _pull_groups(system, params, h, x, cotangent, out_cotangent, expected):
    """``_pull`` for G equal groups of rows at once, (G, N, ...) each: the step vmapped over the groups
    with θ expanded per group, so one pullback yields every group's products ``{name: (G, ...)}``."""
    G = h.shape[0]
    expanded = {n: p.expand(G, *p.shape) for n, p in params.items()}

    def one(p, s, xg):
        new, out = system.step(p, s, xg)
        return (new, out) if out_cotangent is not None else new

    primal, pull = vjp(lambda p, s: vmap(one)(p, s, x), expanded, h)
    check_rows(system, primal[0] if out_cotangent is not None else primal, expected)
    return pull((cotangent, out_cotangent) if out_cotangent is not None else cotangent)


def band(system, params, fwd: Forward, cotangent, out_cotangent, members: list[slice], per_row: bool,
         own: Params | None = None) -> Band:
    """The band whose steps are the first ``cotangent.shape[0]`` of the window: every (step, window) row
    of a group of windows (``members``) in one pull, and equal groups all in one (by torch.func; by
    torch.autograd against the module's own tensors ``own`` a group at a time)."""
    n = cotangent.shape[0]
    h_prev, x, after = fwd.h_prev, fwd.x, fwd.after
    sizes = {rows.stop - rows.start for rows in members}
    gates = per_row and own is None and gate_norms_apply(system, params, x[:n].flatten(0, 1))
    if own is None and (not per_row or gates) and len(sizes) == 1:
        G, m = len(members), sizes.pop()
        B = G * m

        def grouped(t):  # (n, B, ...) → (G, n·m, ...): each group's rows together
            return None if t is None else t[:n, :B].unflatten(1, (G, m)).transpose(0, 1).flatten(1, 2)
        try:
            grads, entering = _pull_groups(system, params, grouped(h_prev), grouped(x), grouped(cotangent),
                                           grouped(out_cotangent), grouped(after))
            entering = entering.unflatten(1, (n, m)).transpose(0, 1).flatten(1, 2)
            if not gates:
                return Band(grads, entering, None)
            sq = gate_norms(system, params, *(t[:n].flatten(0, 1) for t in (h_prev, x, cotangent)))
            return Band(grads, entering, sq.clamp_min(0).sqrt().reshape(n, -1).sum(0))
        except RuntimeError as err:  # a step vmap cannot batch: the groups one at a time
            if "vmap" not in str(err) and "batch" not in str(err).lower():
                raise
    grouped, entering, psi = {name: [] for name in params}, torch.empty_like(cotangent), []
    for rows in members:
        def flat(t, rows=rows):
            return None if t is None else t[:n, rows].flatten(0, 1)
        grads, state_cot, sq = _pull(system, params, flat(h_prev), flat(x), flat(cotangent), flat(out_cotangent),
                                     per_row, flat(after), own)
        entering[:, rows] = state_cot.reshape(n, -1, *cotangent.shape[2:])
        for name in params:
            grouped[name].append(grads[name])
        if per_row:
            psi.append(sq.clamp_min(0).sqrt().reshape(n, -1).sum(0))
    return Band({name: torch.stack(g) for name, g in grouped.items()}, entering,
                torch.cat(psi) if per_row else None)


@dataclass
class LagNorms:
    """Running per-window sums over loss positions of each lag's cotangent norms."""

    phi: torch.Tensor                 # (B, R) Σ_t ||e^k_t||
    phi_state: torch.Tensor           # (B, R, D) Σ_t |e^k_t|
    phi_mahalanobis: torch.Tensor | None

    @classmethod
    def empty(cls, B: int, R: int, D: int, like: torch.Tensor, metric) -> "LagNorms":
        return cls(like.new_zeros(B, R), like.new_zeros(B, R, D), None if metric is None else like.new_zeros(B, R))

    def add(self, k: int, e: torch.Tensor, metric):
        """Lag k's cotangents (R-k, B, D) on the states after steps 0..R-1-k."""
        self.phi[:, k] = cotangents.euclidean(e).sum(0)
        self.phi_state[:, k] = e.abs().sum(0)
        if metric is not None:
            self.phi_mahalanobis[:, k] = cotangents.mahalanobis(e, metric.to(e)).sum(0)

    def means(self, process_group):
        """Each lag's mean over its R-k loss positions, per window, gathered over the ranks."""
        R = self.phi.shape[1]
        count = torch.arange(R, 0, -1, dtype=self.phi.dtype, device=self.phi.device)
        phi = distributed.gather_samples(self.phi / count, process_group)
        phi_state = distributed.gather_samples(self.phi_state / count[:, None], process_group).mean(0)
        maha = None if self.phi_mahalanobis is None else \
            distributed.gather_samples(self.phi_mahalanobis / count, process_group)
        return phi, phi_state, maha


def lag_cotangents(system, params, fwd: Forward):
    """Each lag's cotangents e^k (R-k, B, D), k = 0..R-1, one batched step back at a time by
    torch.autograd, without parameter products (what φ alone needs)."""
    R = fwd.b.shape[0]
    e = fwd.direct
    for k in range(R):
        yield k, e
        if k + 1 == R:
            return
        h, x = fwd.h_prev[1:R - k].flatten(0, 1), fwd.x[1:R - k].flatten(0, 1)
        out_cot = fwd.out_cotangent[1:].flatten(0, 1) if fwd.out_cotangent is not None and k == 0 else None
        entering, new = pullback.state_cotangent(system, params, h, x, e[1:].flatten(0, 1), out_cot)
        check_rows(system, new, fwd.after[1:R - k].flatten(0, 1))
        e = entering.reshape(e[1:].shape)
