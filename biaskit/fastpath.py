"""The decomposition's fast path for nn.RNN, nn.GRU, nn.LSTM (any layers) and their cells.

A step of these cells reads its weights only through ``W x`` products, so its
immediate parameter product with a cotangent is a sum of outer products: for
layer l at step t, ``∂/∂W_ih = δ_iᵀ x``, ``∂/∂W_hh = δ_hᵀ h_{t−1}``, the biases
the summed δ, with δ the cotangents of the gates' pre-activations. The sweep
runs each layer forward by PyTorch's fused kernel, without a graph, and then
the cells' backward recurrences, written out per cell kind (``cells``; one product with
``W_hh`` a step), which yield every δ and the state cotangents φ needs: no
autograd graph is built. The per-window norm ψ needs no per-window product at all:
``||δ aᵀ|| = ||δ||·||a||``, and the tails need no per-group product of |θ|
entries a step either (``Outer``, ``RowGram``): ``<δ aᵀ, δ' a'ᵀ> = (δ·δ')(a·a')``. The estimated
metric's probes go through each cell's forward-mode product, written out too (``pushes``).

The state cotangents keep the generic path's meaning: ``b_t`` is the gradient
with respect to the state after step t *as the next step reads it* (its
recurrent input), apart from the same h going up to the next layer within the
step. Tests check every quantity against the generic path to float64 precision.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import vjp, vmap

from . import cotangents, distributed
from .cells import Layer, linear, no_tf32
from .recurrent import RecurrentSystem, TorchRecurrent
from .sweep import Sweep, Windows, chunk_steps, group_samples, groups_first
from .tails import Chunk, carry_products, held


@dataclass
class Gates:
    """Per layer: the gates' cotangents and the tensors they multiply, for every step."""

    delta_i: list      # per layer (R, B, gates·H): cotangent of the input pre-activations
    delta_h: list      # per layer (R, B, gates·H): of the hidden pre-activations (GRU; else delta_i)
    inputs: list       # per layer (R, B, F_l): what W_ih multiplies
    hidden: list       # per layer (R, B, H): what W_hh multiplies (the state entering the step)
    encoded_cotangent: torch.Tensor | None  # (R, B, F) the cotangent of the encoder's output, if any


@dataclass
class FastPath:
    """The decomposition's path for the built-in cells (the module's docstring): the sweep by the
    fused kernels and the cells' backward recurrences, the tails from the gates' cotangents."""

    rows: bool | None = None   # keep the weights' products as rows (None: ``by_rows`` decides; tests force it)
    steps: int | None = None   # steps per chunk (None: ``chunk_limits`` decide; tests force several chunks)

    def applies(self, system: RecurrentSystem, every: bool) -> bool:
        """Whether this path serves ``system``: a loss at the last step, and a built-in cell whose weights
        are distinct real tensors."""
        if every or not isinstance(system, TorchRecurrent):
            return False
        mine = [p for _, p in system.module.named_parameters(remove_duplicate=False)]
        return len({id(p) for p in mine}) == len(mine) and not any(p.is_complex() for p in mine)

    def sweep(self, system: TorchRecurrent, params, readout, x: torch.Tensor, start, targets) -> Sweep:
        """Forward layer by layer without a graph, then the cells' backward recurrences by hand, from the
        top layer down: per step one product with ``W_hh`` and a few elementwise operations."""
        p = {**system.frozen, **params}
        B, R = x.shape[:2]
        x_t = x.transpose(0, 1)
        layers = []
        with torch.no_grad():
            inp = x_t if system.encoder is None else \
                system.encode(params, x_t.reshape(R * B, *x_t.shape[2:])).reshape(R, B, -1)
            for layer, hs in enumerate(system.split(system.initial_state(start, B).detach())):
                w = _layer_weights(system, p, layer)
                h = _fused(system, w, inp, hs)
                entering = [torch.cat([hs[0][None], h[:-1]])]
                gates, kept = system.cell.kept(w, inp, entering[0], hs)  # an LSTM's gates and c
                entering += kept
                layers.append(Layer(w, inp, entering, h, gates))
                inp = h
        with torch.enable_grad():
            output = layers[-1].h[-1].clone().requires_grad_()  # what the readout reads: the top h at the end
            losses = system.loss(readout, output, targets)
            (output_grad,) = torch.autograd.grad(losses.sum(), [output])
        deltas, b_parts, above = [None] * len(layers), [None] * len(layers), None
        with torch.no_grad():
            for layer in reversed(range(len(layers))):
                arriving = above  # what reaches each step's h from the layer above
                if arriving is None:
                    arriving = torch.zeros_like(layers[layer].h)
                    arriving[-1] = output_grad
                *deltas[layer], b_parts[layer] = system.cell.backward(layers[layer], arriving, system.nonlinearity)
                if layer or system.encoder is not None:
                    above = (deltas[layer][0].flatten(0, 1) @ layers[layer].weights["weight_ih"]).reshape(R, B, -1)
        b_parts[-1][0][-1] = output_grad  # the last step's state is read by the readout alone: its top h
        b = torch.cat([part for parts in b_parts for part in parts], dim=-1)
        h_prev = torch.cat([part for layer in layers for part in layer.entering], dim=-1)  # (R, B, D)
        fast = Gates([d[0] for d in deltas], [d[1] for d in deltas], [layer.inputs for layer in layers],
                     [layer.entering[0] for layer in layers], None if system.encoder is None else above)
        return Sweep(b, losses.detach(), output.detach(), h_prev, x_t, None, fast)

    def chunks(self, system: TorchRecurrent, params, windows: Windows, psi: bool) -> int:
        """Steps per chunk of the parameter pass (``chunk_limits``)."""
        G, B = windows.masks.shape
        rows = self._rows(system, params, windows)
        return self.steps or chunk_steps(*chunk_limits(system, params, G, B, windows.total, psi, rows))

    def blocks(self, system: TorchRecurrent, params, sweep: Sweep, sl: slice, windows: Windows, per_sample: bool):
        """The steps ``sl`` as blocks for ``Tails.add``: by rows, each layer's weights as rows
        (``Outer``) and one Gram of every row pair (``RowGram``), else each weight's products per group
        whole; an embedding's gathered by token (``Lookup``), any other encoder's whole; and per-window
        squared norms ``(c, B)`` when ``per_sample`` (``||δ aᵀ|| = ||δ||·||a||``)."""
        fast, index, process_group = sweep.fast, _members(windows.masks), windows.process_group
        rows = self._rows(system, params, windows)
        masks = windows.masks.to(sweep.b.dtype)
        everyone = {}  # every rank's rows of a tensor, gathered once per chunk

        def all_rows(t):
            if id(t) not in everyone:
                everyone[id(t)] = distributed.gather_rows(t.transpose(0, 1), process_group).transpose(0, 1)
            return everyone[id(t)]

        out, whole, sq, K = [], {}, 0.0, 0.0
        for layer in range(system.num_layers):
            shared = {}  # the layer's weights by the δ they multiply: one for LSTM and RNN, two for GRU
            for name, delta, by in _weights(system, params, fast, layer, sl):
                shared.setdefault(id(delta), (delta, []))[1].append((name, by))
            for delta, members in shared.values():
                by = torch.cat([part for _, part in members], dim=-1)  # [x, h, 1, 1]: one block for them all
                if per_sample:
                    sq = sq + delta.pow(2).sum(-1) * by.pow(2).sum(-1)
                if not rows:
                    for name, part in members:
                        whole[name] = (_grouped(delta, index).transpose(-1, -2) @ _grouped(part, index)).flatten(2)
                    continue
                T = torch.bmm(all_rows(delta).transpose(1, 2), all_rows(by)).flatten(1)
                out.append(Outer(tuple((name, part.shape[-1]) for name, part in members), delta, by, index, masks, T))
                K = K + (delta.flatten(0, 1) @ all_rows(delta).flatten(0, 1).T) * (by.flatten(0, 1) @
                                                                                    all_rows(by).flatten(0, 1).T)
        if rows:
            c, B = delta.shape[:2]
            out.append(RowGram(K.reshape(c, B, c, -1), masks, windows.offset))
        encoder = {n: p for n, p in params.items() if n.startswith("encoder.")}
        if encoder and lookup(system, params):
            out.append(_lookup_block(system, sweep, sl, masks, process_group))
            if per_sample:
                sq = sq + out[-1].cot.pow(2).sum(-1)
        elif encoder:
            x, cot = sweep.x[sl], fast.encoded_cotangent[sl]
            grouped, enc_sq = _encoder_products(system, encoder, x, cot, masks, per_sample)
            whole.update(grouped)
            sq = sq + enc_sq if per_sample else sq
        return out + held(whole, process_group), (sq if per_sample else None)

    def metric(self, system: TorchRecurrent, params, sweep: Sweep, probes: int, rows: int,
               generator: torch.Generator) -> torch.Tensor:
        """The metric's estimate (``cotangents.estimate_metric``), its probes pushed through each cell's
        forward-mode product written out (``pushes``) where ``metric_applies``."""
        pushed = partial(pushes, system, params) if metric_applies(system, params) else None
        return cotangents.estimate_metric(system, params, sweep.h_prev, sweep.x, probes, rows, generator, pushed)

    def fallback(self, system: TorchRecurrent, err: RuntimeError) -> None:
        """None: an error on this path stands (no other takes its products)."""
        return None

    def describe(self, system: TorchRecurrent, every: bool) -> str:
        """The Dataset's ``path``."""
        return "fast: " + system.kind

    def _rows(self, system: TorchRecurrent, params, windows: Windows) -> bool:
        G, B = windows.masks.shape
        return by_rows(system, params, B, windows.total, G) if self.rows is None else self.rows


def _fused(system: TorchRecurrent, w: dict, inp: torch.Tensor, hs) -> torch.Tensor:
    """One layer's h after each step (R, B, H), by PyTorch's fused kernel (oneDNN, cuDNN) for its kind
    (``CellKind.fused``): the same cell as ``CellKind.step``, ~3x faster than stepping it from Python."""
    weights = [w[k] for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if w[k] is not None]
    hx = tuple(part[None].contiguous() for part in hs)
    with warnings.catch_warnings(), no_tf32(inp):  # cuDNN copies weights not in one flat buffer, as wanted here
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
        return system.cell.fused(inp, hx, weights, system.nonlinearity)


def _layer_weights(system: TorchRecurrent, p, layer: int) -> dict:
    suffix = system.suffix(layer)
    return {name: p.get(name + suffix) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}


def metric_applies(system: TorchRecurrent, params) -> bool:
    """Whether ``pushes`` serves the metric: a trained encoder only as a plain embedding lookup."""
    return not any(n.startswith("encoder.") for n in params) or lookup(system, params)


def pushes(system: TorchRecurrent, params, states: torch.Tensor, inputs: torch.Tensor, tangents: dict) -> torch.Tensor:
    """``J v`` for every probe v, (probes, rows, D): the forward-mode product of one step (``system.step``)
    with the parameter tangents ``{name: (probes, ...)}``, written out per cell, layer by layer from
    the bottom (what ``torch.func.jvp`` gives; it imports torch._dynamo, ~2 s, on first use). A
    layer's pre-activations move by ``V x + W dx`` (dx: the tangent of its input, the new h below or
    an embedding's rows) ``+ V_h h + V_b``, then through the cell's derivatives."""
    p = {**system.frozen, **params}
    x = system.encode(params, inputs)
    dx = tangents["encoder.weight"][:, inputs] if "encoder.weight" in tangents else None
    probes = next(iter(tangents.values())).shape[0]
    out = []
    for layer, hs in enumerate(system.split(states)):
        w = _layer_weights(system, p, layer)
        gi, gh = linear(x, w["weight_ih"], w["bias_ih"]), linear(hs[0], w["weight_hh"], w["bias_hh"])
        dgi, dgh = gi.new_zeros(probes, *gi.shape), gh.new_zeros(probes, *gh.shape)
        for name, moved, by in (("weight_ih", dgi, x), ("weight_hh", dgh, hs[0]), ("bias_ih", dgi, None),
                                ("bias_hh", dgh, None)):
            v = tangents.get(name + system.suffix(layer))
            if v is not None:
                moved += v[:, None] if by is None else by @ v.transpose(1, 2)
        if dx is not None:
            dgi += dx @ w["weight_ih"].T
        x, moved = system.cell.tangent(gi, gh, hs, dgi, dgh, system.nonlinearity)
        out += moved
        dx = moved[0]
    return torch.cat(out, dim=-1)


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
    """The products of a layer's weights that multiply the same δ, in a chunk, kept as rows ``δ aᵀ``
    (``a`` their inputs side by side, 1 for a bias): every quantity the tails need is a product of the
    carries with the rows, so no (groups × |θ|) product is formed per step."""

    name: tuple           # ((parameter, the columns of a it takes), ...)
    delta: torch.Tensor   # (c, B, p) this process's rows
    by: torch.Tensor      # (c, B, q)
    index: torch.Tensor   # (G, m) each group's windows, padded with B
    masks: torch.Tensor   # (G, B)
    T: torch.Tensor       # (c, p·q) every window's product at each step (all ranks')

    @property
    def width(self) -> int:
        return self.T.shape[1]

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


@dataclass
class Lookup:
    """An embedding's products in a chunk: a window's step adds its output's cotangent to the row of
    its token, so the products live in the rows the chunk's tokens touch (``used``), and every
    quantity is a gather from the carries or a product over those rows; no (groups × vocabulary ×
    width) product is formed."""

    name: str
    tokens: torch.Tensor      # (c, B) this process's tokens
    cot: torch.Tensor         # (c, B, E) the cotangents of their embeddings
    index: torch.Tensor       # (G, m) each group's windows, padded with B
    masks: torch.Tensor       # (G, B)
    used: torch.Tensor        # (U,) the rows any rank's tokens touch in the chunk, sorted
    T: torch.Tensor           # (c, U·E) every window's product at each step, in the used rows
    width: int                # vocabulary × E: the weight's size

    def stats(self, carry_g, carry_t):
        G, (c, B, E) = carry_g.shape[0], self.cot.shape
        rows_g, rows_t = carry_g.view(G, -1, E), carry_t.view(-1, E)
        group = self.masks.argmax(0).expand(c, B)  # each window's group
        own = (rows_g[group, self.tokens] * self.cot).sum(-1)       # (c, B): <C_g, the window's row>
        every = (rows_t[self.tokens] * self.cot).sum(-1)            # (c, B): <C, the window's row>
        at = torch.searchsorted(self.used, self.tokens)             # each token's place among the used rows
        spread = (self.T.view(c, -1, E)[:, at] * self.cot).sum(-1)  # (c', c, B): <T_i', the window's row>
        tok_g = _grouped(self.tokens[..., None], self.index).flatten(1, 2)  # (G, c·m, 1)
        cot_g = _grouped(self.cot, self.index).flatten(1, 2)               # (G, c·m, E)
        same = (tok_g == tok_g.transpose(1, 2)).to(cot_g.dtype)
        XX = (same * (cot_g @ cot_g.transpose(1, 2))).view(G, c, -1, c, same.shape[-1] // c).sum((2, 4))
        entries = (self.used[:, None] * E + torch.arange(E, device=self.used.device)).flatten()
        return carry_products(carry_g, carry_t, self.T, entries) + Chunk(
            u=self.masks @ own.T, y=self.masks @ every.T, XX=XX, XT=torch.einsum("gb,jib->gij", self.masks, spread))

    def update(self, carry_g, carry_t):
        G, (c, B, E) = carry_g.shape[0], self.cot.shape
        V = self.width // E
        group = self.masks.argmax(0).expand(c, B)
        carry_g.view(G * V, E).index_add_(0, (group * V + self.tokens).flatten(), self.cot.flatten(0, 1))
        carry_t.view(V, E).index_add_(0, self.used, self.T.view(c, -1, E).sum(0))


def lookup(system: TorchRecurrent, params) -> bool:
    """Whether the encoder is a plain ``nn.Embedding`` lookup whose weight is trained (no max_norm,
    which rewrites the weight, no scale_grad_by_freq, which rescales its gradient)."""
    enc = system.encoder
    return type(enc) is nn.Embedding and "encoder.weight" in params and enc.max_norm is None \
        and not enc.scale_grad_by_freq


def _lookup_block(system, sweep, sl, masks, process_group):
    """The embedding's ``Lookup`` for steps ``sl`` (a padding token's row gets no gradient)."""
    tokens, cot = sweep.x[sl].contiguous(), sweep.fast.encoded_cotangent[sl]
    if system.encoder.padding_idx is not None:
        cot = cot * (tokens != system.encoder.padding_idx)[..., None]
    every_tok = distributed.gather_rows(tokens.transpose(0, 1), process_group).transpose(0, 1)
    every_cot = distributed.gather_rows(cot.transpose(0, 1), process_group).transpose(0, 1)
    used, at = torch.unique(every_tok, return_inverse=True)
    c, E = cot.shape[0], cot.shape[-1]
    T = cot.new_zeros(c, used.numel(), E)
    T.scatter_add_(1, at[..., None].expand(-1, -1, E), every_cot)
    return Lookup("encoder.weight", tokens, cot, _members(masks), masks, used, T.flatten(1),
                  system.encoder.weight.numel())


def _weights(system: TorchRecurrent, params, fast, layer: int, sl: slice):
    """Layer ``layer``'s trainable weights and biases in steps ``sl``: (name, δ, what δ multiplies)."""
    suffix = system.suffix(layer)
    di = fast.delta_i[layer][sl]
    dh = di if fast.delta_h[layer] is fast.delta_i[layer] else fast.delta_h[layer][sl]
    ones = di.new_ones(*di.shape[:2], 1)
    blocks = [("weight_ih" + suffix, di, fast.inputs[layer][sl]), ("weight_hh" + suffix, dh, fast.hidden[layer][sl]),
              ("bias_ih" + suffix, di, ones), ("bias_hh" + suffix, dh, ones)]
    return [b for b in blocks if b[0] in params]  # a missing one is absent (bias=False) or frozen


def _sizes(system: TorchRecurrent, params) -> tuple[int, int]:
    """|θ| of the recurrent weights, and the widths a pair of their rows costs in a Gram matrix: the
    columns of every a (``[x, h, 1, 1]``) and of every δ."""
    weights = [p for n, p in params.items() if not n.startswith("encoder.")]
    gates = system.cell.gates * system.hidden
    width = sum(p.shape[1] if p.dim() > 1 else 1 for p in weights) + \
        system.num_layers * gates * system.cell.deltas
    return sum(p.numel() for p in weights), width


#: Rows against whole products, and a chunk's steps on rows: both follow the ratio of the carries'
#: size, G·|θ|, to a row Gram's cost per step pair, B·B_all·widths (timed on a 2-core CPU).
BALANCE = 16


def by_rows(system: TorchRecurrent, params, batch: int, world_batch: int, groups: int) -> bool:
    """Whether to keep the weights' products as rows ``δ aᵀ`` (a step costs the rows' Gram matrix,
    ~ B·B_all·(the widths of the δ and the a's)) rather than whole per group (~ G·|θ| a step,
    memory-bound): rows win for wide layers and modest batches, whole products for narrow layers and
    many windows (``BALANCE``: where the two met over batches 32-256, hidden 50-200)."""
    size, width = _sizes(system, params)
    return batch * world_batch * width <= BALANCE * groups * size


def chunk_limits(system: TorchRecurrent, params, groups: int, batch: int, world_batch: int, per_sample: bool,
                 rows: bool) -> tuple[int, int, float]:
    """What bounds a chunk of steps (``sweep.chunk_steps``): the elements one step's products
    hold at once, the rows a step adds to the chunk's square Gram matrices (0: none), and the most
    steps worth taking. On rows the carries are read once a chunk (~ G·|θ|) while the chunk's Gram
    matrices grow as its square (~ c²·B·B_all·widths), so ``c = BALANCE·√(G·|θ| / (B·B_all·widths))``
    balances them: 16 (the cap) for an LSTM 2 × 128 at batch 32, 4 for the language controller's 256
    windows of an LSTM 200 (8.7 s a decomposition against 11.6 s with 11 steps)."""
    size, row_width = _sizes(system, params)
    weights = [p.numel() for n, p in params.items() if not n.startswith("encoder.")]
    width = max(weights) if rows else groups * size
    square = math.isqrt(batch * world_batch) + 1 if rows else 0
    most = round(BALANCE * math.sqrt(groups * size / (batch * world_batch * row_width))) if rows else math.inf
    encoder = [p.numel() for n, p in params.items() if n.startswith("encoder.")]
    if encoder and lookup(system, params):
        E = system.encoder.embedding_dim
        width += world_batch * E                               # the used rows' totals
        square = max(square, math.isqrt(batch * E) + 1)        # every total at every window's token
    elif encoder:
        width += sum(encoder) * (groups + (batch if per_sample else 0))
    return width, square, most


def _encoder_products(system, encoder, x, cot, masks, per_sample):
    """The encoder's immediate products, through torch.func (an encoder is any per-step module)."""
    def pullback(xt):
        return vjp(lambda p: system.encode(p, xt), encoder)[1]

    if per_sample:
        return group_samples(vmap(vmap(lambda xt, ct: pullback(xt[None])(ct[None])[0]))(x, cot), masks)

    def one_step(xt, ct):
        pull = pullback(xt)
        return vmap(lambda m: pull(ct * m.reshape((-1,) + (1,) * (ct.dim() - 1)))[0])(masks.to(ct.dtype))

    return groups_first(vmap(one_step)(x, cot)), None
