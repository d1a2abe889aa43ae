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

from .recurrent import CELLS, RecurrentSystem, TorchRecurrent, _linear


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
    from .decompose import Sweep as Full  # the generic sweep's record, which this one extends

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
            hs, gh_layer, alias_layer, hidden_layer, h_out = tuple(hs0), [], [], [], []
            for t in range(R):
                hidden_layer.append(torch.cat([part.detach() for part in hs], dim=1))  # (h, c) entering step t
                gh = _linear(hs[0], p["weight_hh" + suffix], p.get("bias_hh" + suffix))
                gh_layer.append(gh)
                new = CELLS[system.base](gi[t], gh, hs, system.nonlinearity)
                h_out.append(new[0])
                if t < R - 1:  # the state as the next step reads it: a node of its own
                    hs = tuple(part.view_as(part) for part in new)
                    alias_layer.append(hs)
                else:
                    last = new
            gh_steps.append(gh_layer)
            aliases.append(alias_layer)
            hidden.append(torch.stack(hidden_layer))  # (R, B, parts·H)
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
    per_step = []
    for t in range(R):
        row = []
        for layer in range(L):
            for part in range(parts):
                if t < R - 1:
                    row.append(alias_grads[(layer * (R - 1) + t) * parts + part])
                elif layer == L - 1 and part == 0:
                    row.append(output_grad)
                else:
                    row.append(torch.zeros_like(output_grad))
        per_step.append(torch.cat(row, dim=1))
    b = torch.stack(per_step)
    h_prev = torch.cat(hidden, dim=-1)  # (R, B, D): the flat state entering each step
    hidden = [h[..., :system.hidden] for h in hidden]  # what W_hh multiplies: h alone
    fast = Sweep(list(delta_i), list(delta_h), inputs, hidden, encoded_cotangent)
    return Full(b, losses.detach(), output.detach(), h_prev, x_t, None, fast)


def _grouped(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(c, B, F) rows gathered into groups, (G, c, m, F), a missing member (index B) a zero row."""
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


def products(system: TorchRecurrent, params, sweep, sl: slice, masks: torch.Tensor, per_sample: bool):
    """The steps ``sl``'s parameter products per group ``{name: (G, c, n)}``, and per-window squared
    norms ``(c, B)`` when ``per_sample``: outer products of the gates' cotangents and inputs."""
    fast, index = sweep.fast, _members(masks)
    out, sq = {}, 0.0
    for layer in range(system.num_layers):
        suffix = system.suffix(layer)
        di, dh = fast.delta_i[layer][sl], fast.delta_h[layer][sl]
        xi, hh = fast.inputs[layer][sl], fast.hidden[layer][sl]
        blocks = [("weight_ih" + suffix, di, xi), ("weight_hh" + suffix, dh, hh),
                  ("bias_ih" + suffix, di, None), ("bias_hh" + suffix, dh, None)]
        for name, delta, by in blocks:
            if name not in params:  # absent (bias=False) or frozen
                continue
            gd = _grouped(delta, index)
            if by is None:
                out[name] = gd.sum(2)
            else:
                out[name] = (gd.transpose(-1, -2) @ _grouped(by, index)).flatten(2)
            if per_sample:
                sq = sq + delta.pow(2).sum(-1) * (1 if by is None else by.pow(2).sum(-1))
    encoder = {n: p for n, p in params.items() if n.startswith("encoder.")}
    if encoder:
        x, cot = sweep.x[sl], fast.encoded_cotangent[sl]
        grouped, enc_sq = _encoder_products(system, encoder, x, cot, masks, per_sample)
        out.update(grouped)
        sq = sq + enc_sq if per_sample else sq
    return out, (sq if per_sample else None)


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
