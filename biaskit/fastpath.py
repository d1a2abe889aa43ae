"""The decomposition's fast path for nn.RNN, nn.GRU, nn.LSTM (any layers) and their cells.

A step of these cells reads its weights only through ``W x`` products, so its
immediate parameter product with a cotangent is a sum of outer products: for
layer l at step t, ``∂/∂W_ih = δ_iᵀ x``, ``∂/∂W_hh = δ_hᵀ h_{t−1}``, the biases
the summed δ, with δ the cotangents of the gates' pre-activations. One
backward pass through a layer-by-layer unroll yields every δ (and the state
cotangents φ needs), so no step is run twice, and a group's product is one
batched matmul. The per-window norm ψ needs no per-window product at all:
``||δ xᵀ|| = ||δ||·||x||``.

The state cotangents keep the generic path's meaning: ``b_t`` is the gradient
with respect to the state after step t *as the next step reads it*, so each
layer's recurrent input is its own graph node (a view), apart from the same
tensor going up to the next layer within the step. Tests check every quantity
against the generic path to float64 precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vjp, vmap

from . import distributed
from .recurrent import CELLS, RecurrentSystem, TorchRecurrent, _linear
from .tails import Chunk, carry_products, held


@dataclass
class Sweep:
    """Per layer: the gates' cotangents and the tensors they multiply, for every step."""

    delta_i: list      # per layer (R, B, gates·H): cotangent of the input pre-activations
    delta_h: list      # per layer (R, B, gates·H): of the hidden pre-activations (GRU; else delta_i)
    inputs: list       # per layer (R, B, F_l): what W_ih multiplies
    hidden: list       # per layer (R, B, H): what W_hh multiplies (the state entering the step)
    encoded_cotangent: torch.Tensor | None  # (R, B, F) the cotangent of the encoder's output, if any


def applies(system: RecurrentSystem) -> bool:
    """Whether the fast path serves ``system``: a built-in cell whose weights are distinct tensors."""
    if not isinstance(system, TorchRecurrent):
        return False
    mine = [p for _, p in system.module.named_parameters(remove_duplicate=False)]
    return len({id(p) for p in mine}) == len(mine) and not any(p.is_complex() for p in mine)


def sweep(system: TorchRecurrent, params, readout, x: torch.Tensor, start, targets):
    """Forward layer by layer, then one backward pass for the state and gate cotangents."""
    from .decompose import (
        Sweep as Full,  # the generic sweep's record, which this one extends
    )

    p = {**system.frozen, **params}
    B, R = x.shape[:2]
    x_t = x.transpose(0, 1)
    with torch.enable_grad():
        encoded = None
        inp = x_t
        if system.encoder is not None:
            flat = system.encode(params, x_t.reshape(R * B, *x_t.shape[2:]))
            encoded = flat.reshape(R, B, *flat.shape[1:]).detach().requires_grad_()
            inp = encoded
        start_layers = system.split(system.initial_state(start, B).detach().requires_grad_())
        gi_all, gh_steps, aliases, hidden, inputs, outs = [], [], [], [], [], []
        for layer, hs0 in enumerate(start_layers):
            suffix = system.suffix(layer)
            gi = _linear(inp.reshape(R * B, -1), p["weight_ih" + suffix], p.get("bias_ih" + suffix))
            gi = gi.reshape(R, B, -1)
            if not gi.requires_grad:  # inputs and weights are constants: the gates are where gradients start
                gi = gi.detach().requires_grad_()
            gi_all.append(gi)
            inputs.append(inp.detach())
            hs, gh_layer, alias_layer, h_out = tuple(hs0), [], [], []
            entering = [[] for _ in hs]  # each part of the state entering each step
            gi_steps = gi.unbind(0)  # one backward node for every step (indexing would copy gi per step)
            for t in range(R):
                for part, rows in zip(hs, entering):
                    rows.append(part.detach())
                gh = _linear(hs[0], p["weight_hh" + suffix], p.get("bias_hh" + suffix))
                gh_layer.append(gh)
                new = CELLS[system.base](gi_steps[t], gh, hs, system.nonlinearity)
                h_out.append(new[0])
                if t < R - 1:  # the state as the next step reads it: a node of its own
                    hs = tuple(part.view_as(part) for part in new)
                    alias_layer.append(hs)
                else:
                    last = new
            gh_steps.append(gh_layer)
            aliases.append(alias_layer)
            hidden.append(torch.cat([torch.stack(rows) for rows in entering], dim=-1))  # (R, B, parts·H)
            inp = torch.stack(h_out)
            outs.append(last)
        output = outs[-1][0].view_as(outs[-1][0])  # what the readout reads: the top h after the last step
        losses = system.loss(readout, output, targets)
        flat_aliases = [part for layer in aliases for hs in layer for part in hs]
        wrt = [*flat_aliases, output, *gi_all]
        if system.base == "GRU":
            wrt += [gh for layer in gh_steps for gh in layer]
        if encoded is not None:
            wrt.append(encoded)
        grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    n_alias = len(flat_aliases)
    alias_grads, output_grad = grads[:n_alias], grads[n_alias]
    L, parts = system.num_layers, len(system.components)
    delta_i = grads[n_alias + 1:n_alias + 1 + L]
    rest = grads[n_alias + 1 + L:]
    if system.base == "GRU":
        delta_h = [torch.stack(rest[l * R:(l + 1) * R]) for l in range(L)]
        rest = rest[L * R:]
    else:
        delta_h = delta_i
    encoded_cotangent = rest[0] if encoded is not None else None
    # b_t in the flat layout: layer by layer, h then c; at the last step only the output's h.
    columns = []
    for layer in range(L):
        for part in range(parts):
            last = output_grad if layer == L - 1 and part == 0 else torch.zeros_like(output_grad)
            columns.append(torch.stack([*alias_grads[layer * (R - 1) * parts + part::parts][:R - 1], last]))
    b = torch.cat(columns, dim=-1)
    h_prev = torch.cat(hidden, dim=-1)  # (R, B, D): the flat state entering each step
    hidden = [h[..., :system.hidden] for h in hidden]  # what W_hh multiplies: h alone
    fast = Sweep(list(delta_i), list(delta_h), inputs, hidden, encoded_cotangent)
    return Full(b, losses.detach(), output.detach(), h_prev, x_t, None, fast)


def _grouped(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(c, B, F) rows gathered into groups, (G, c, m, F), a missing member (index B) a zero row."""
    G, m = index.shape
    if G * m == t.shape[1]:  # equal groups of consecutive windows (``decompose._groups``): a view
        return t.unflatten(1, (G, m)).transpose(0, 1)
    padded = torch.cat([t, t.new_zeros(t.shape[0], 1, *t.shape[2:])], dim=1)
    return padded[:, index].transpose(0, 1)


def _members(masks: torch.Tensor) -> torch.Tensor:
    """(G, m) the windows of each group, padded with B (no window)."""
    G, B = masks.shape
    rows = [torch.nonzero(m).flatten() for m in masks]
    m = max(len(r) for r in rows)
    index = torch.full((G, m), B, dtype=torch.long, device=masks.device)
    for g, r in enumerate(rows):
        index[g, :len(r)] = r
    return index


@dataclass
class Outer:
    """One weight's (or bias's, ``by`` all ones) products in a chunk, kept as rows ``δ aᵀ``: every
    quantity the tails need is a product of the carries with the rows, so no (groups × |θ|) product
    is formed per step."""

    name: str
    delta: torch.Tensor   # (c, B, p) this process's rows
    by: torch.Tensor      # (c, B, q)
    index: torch.Tensor   # (G, m) each group's windows, padded with B
    masks: torch.Tensor   # (G, B)
    T: torch.Tensor       # (c, p·q) every window's product at each step (all ranks')

    def __post_init__(self):
        G, m = self.index.shape
        self.dg = _grouped(self.delta, self.index).reshape(G, -1, self.delta.shape[-1])  # (G, c·m, p)
        self.ag = _grouped(self.by, self.index).reshape(G, -1, self.by.shape[-1])        # (G, c·m, q)

    def stats(self, carry_g, carry_t):
        (G, m), (p, q) = self.index.shape, (self.delta.shape[-1], self.by.shape[-1])
        own = torch.bmm(self.ag, carry_g.view(G, p, q).transpose(1, 2))  # C_g a for the group's rows
        every = self.by @ carry_t.view(p, q).T                          # C a for every row
        return carry_products(carry_g, carry_t, self.T) + Chunk(
            u=(self.dg * own).sum(-1).view(G, -1, m).sum(-1), y=self.masks @ (self.delta * every).sum(-1).T)

    def update(self, carry_g, carry_t):
        G, p, q = self.dg.shape[0], self.dg.shape[-1], self.ag.shape[-1]
        carry_g.view(G, p, q).baddbmm_(self.dg.transpose(1, 2), self.ag)
        carry_t += self.T.sum(0)


@dataclass
class RowGram:
    """The groups' products' dot products within a chunk, from the Gram matrix of the rows:
    ``<δ aᵀ, δ' a'ᵀ> = (δ·δ')(a·a')``, summed over the blocks, (c, B, c, B_all)."""

    K: torch.Tensor
    masks: torch.Tensor  # (G, B)
    offset: int          # where this process's windows start among every rank's

    def stats(self):
        B = self.masks.shape[1]
        own = self.K[..., self.offset:self.offset + B]
        return Chunk(XX=torch.einsum("gb,ibjc,gc->gij", self.masks, own, self.masks),
                     XT=torch.einsum("gb,ibj->gij", self.masks, self.K.sum(-1)))


def _weights(system: TorchRecurrent, params, fast, layer: int, sl: slice):
    """Layer ``layer``'s trainable weights and biases in steps ``sl``: (name, δ, what δ multiplies)."""
    suffix = system.suffix(layer)
    di = fast.delta_i[layer][sl]
    dh = di if fast.delta_h[layer] is fast.delta_i[layer] else fast.delta_h[layer][sl]
    ones = di.new_ones(*di.shape[:2], 1)
    blocks = [("weight_ih" + suffix, di, fast.inputs[layer][sl]), ("weight_hh" + suffix, dh, fast.hidden[layer][sl]),
              ("bias_ih" + suffix, di, ones), ("bias_hh" + suffix, dh, ones)]
    return [b for b in blocks if b[0] in params]  # a missing one is absent (bias=False) or frozen


def by_rows(params, batch: int, world_batch: int, groups: int) -> bool:
    """Whether to keep the weights' products as rows ``δ aᵀ`` (a step costs the rows' Gram matrix,
    ~ B·B_all·(p+q)) rather than whole per group (~ G·|θ| a step, memory-bound): rows win for wide
    layers and modest batches, whole products for narrow layers and many windows."""
    weights = [p for n, p in params.items() if not n.startswith("encoder.")]
    width = sum(p.shape[0] + (p.shape[1] if p.dim() > 1 else 1) for p in weights)
    return batch * world_batch * width <= 4 * groups * sum(p.numel() for p in weights)


def chunk_width(params, groups: int, rows: bool) -> int:
    """Elements a step of the weights' products holds at once: the largest block's totals when kept
    as rows, every block per group when whole."""
    weights = [p.numel() for n, p in params.items() if not n.startswith("encoder.")]
    return max(weights) if rows else groups * sum(weights)


def blocks(system: TorchRecurrent, params, sweep, sl: slice, masks: torch.Tensor, per_sample: bool,
           process_group, offset: int, rows: bool):
    """The steps ``sl`` as blocks for ``Tails.add``: with ``rows``, each weight's rows (``Outer``) and
    one Gram of every row pair (``RowGram``), else each weight's products per group whole; the
    encoder's products whole; and per-window squared norms ``(c, B)`` when ``per_sample``
    (``||δ aᵀ|| = ||δ||·||a||``)."""
    fast, index = sweep.fast, _members(masks)
    masks = masks.to(sweep.b.dtype)
    everyone = {}  # every rank's rows of a tensor, gathered once per chunk

    def all_rows(t):
        if id(t) not in everyone:
            everyone[id(t)] = distributed.gather_rows(t.transpose(0, 1), process_group).transpose(0, 1)
        return everyone[id(t)]

    out, whole, sq, by_delta = [], {}, 0.0, {}
    for layer in range(system.num_layers):
        for name, delta, by in _weights(system, params, fast, layer, sl):
            if per_sample:
                sq = sq + delta.pow(2).sum(-1) * by.pow(2).sum(-1)
            if not rows:
                whole[name] = (_grouped(delta, index).transpose(-1, -2) @ _grouped(by, index)).flatten(2)
                continue
            T = torch.einsum("ibp,ibq->ipq", all_rows(delta), all_rows(by)).flatten(1)
            out.append(Outer(name, delta, by, index, masks, T))
            pairs = by_delta.setdefault(id(delta), [delta, 0.0])
            pairs[1] = pairs[1] + by.flatten(0, 1) @ all_rows(by).flatten(0, 1).T
    if rows:
        c, B = delta.shape[:2]
        K = sum((d.flatten(0, 1) @ all_rows(d).flatten(0, 1).T) * gram for d, gram in by_delta.values())
        out.append(RowGram(K.reshape(c, B, c, -1), masks, offset))
    encoder = {n: p for n, p in params.items() if n.startswith("encoder.")}
    if encoder:
        x, cot = sweep.x[sl], fast.encoded_cotangent[sl]
        grouped, enc_sq = _encoder_products(system, encoder, x, cot, masks, per_sample)
        whole.update(grouped)
        sq = sq + enc_sq if per_sample else sq
    return out + held(whole, process_group), (sq if per_sample else None)


def _encoder_products(system, encoder, x, cot, masks, per_sample):
    """The encoder's immediate products, through torch.func (an encoder is any per-step module)."""
    from .decompose import group_samples, groups_first

    def pullback(xt):
        return vjp(lambda p: system.encode(p, xt), encoder)[1]

    if per_sample:
        return group_samples(vmap(vmap(lambda xt, ct: pullback(xt[None])(ct[None])[0]))(x, cot), masks)

    def one_step(xt, ct):
        pull = pullback(xt)
        return vmap(lambda m: pull(ct * m.reshape((-1,) + (1,) * (ct.dim() - 1)))[0])(masks.to(ct.dtype))

    return groups_first(vmap(one_step)(x, cot)), None
