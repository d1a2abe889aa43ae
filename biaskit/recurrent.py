"""One protocol for "a recurrent system", and adapters for torch's modules and anyone's cells.

A system is a step ``H(h, x; θ)`` on a *flat* state ``h`` of shape (batch, D),
real (a complex part counts twice, real and imaginary), an output the readout
reads, a readout and a per-sample loss. Everything downstream (decompose,
cotangents, the trainers' diagnostics) sees only this protocol; the system owns the
flat layout (``flatten``/``unflatten`` to and from the module's own state).

θ is the *trainable* parameters of the module and of the optional ``encoder``
(an embedding, say, applied to each step's input; named ``encoder.*``): each
tensor once, under its first name, however many names reach it. Parameters
with ``requires_grad=False`` and buffers are constants everywhere.

Adapters:

- ``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` (any layers, ``batch_first`` either way)
  and their ``*Cell`` modules, stepped by their kind (``cells``) as plain tensor
  operations with PyTorch's parameter names and layouts (the fused kernels have no ``vmap``
  rule, and decompose takes per-step, per-sample products). Their state is
  laid out layer by layer, h then c.
- Any module with ``initial_state(batch_size)`` and ``forward(x_t, state)``.
  The state is any pytree (nested tuples, lists, dicts) of tensors with a
  leading batch dimension and any trailing shape, real or complex.
  ``forward`` returns the new state, whose first leaf is what the readout
  reads; or, with ``step_output=True`` (an argument of ``wrap`` or an
  attribute of the module), ``(output, new_state)``, the readout reading the
  last step's output.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from . import cells, hooks
from .cells import linear
from .errors import InputError

ACCEPTED = (
    "nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell, or a module "
    "with initial_state(batch_size) and forward(x_t, state) -> state (or -> (output, state) with step_output=True)"
)

Params = dict[str, torch.Tensor]


def _gates(p: Params, x, h, suffix: str):
    """Input and hidden pre-activations of one layer, with PyTorch's names."""
    gi = linear(x, p["weight_ih" + suffix], p.get("bias_ih" + suffix))
    gh = linear(h, p["weight_hh" + suffix], p.get("bias_hh" + suffix))
    return gi, gh


@dataclass
class StateLayout:
    """What each flat state coordinate is: its part of the state (``h``, ``c``, a pytree path such
    as ``['mem'][0]``), its layer, and its index within the part's own shape (``re``/``im`` for
    the two halves of a complex value)."""

    part: list[str]
    layer: list[int]
    unit: list[str]

    @property
    def size(self) -> int:
        return len(self.unit)


def _units(shape: tuple[int, ...], complex_: bool) -> list[str]:
    index = [",".join(map(str, i)) for i in torch.cartesian_prod(*(torch.arange(n) for n in shape)).reshape(
        -1, len(shape)).tolist()] if shape else [""]
    return [f"{i} {half}".strip() for i in index for half in ("re", "im")] if complex_ else index


class RecurrentSystem:
    """A recurrent module, its readout and its per-sample loss, as pure functions of θ."""

    kind: str
    input_size: int | None
    time_major: bool
    layout: StateLayout
    step_output: bool = False

    def __init__(self, module: nn.Module, readout: nn.Module | None, loss_fn: Callable | None,
                 encoder: nn.Module | None = None):
        self.module = module
        self.readout = readout if readout is not None else nn.Identity()
        self.loss_fn = loss_fn
        self.encoder = encoder

    # --- parameters -------------------------------------------------------
    def params(self) -> Params:
        """θ of the step: the trainable parameters of the module, then of the encoder (``encoder.*``),
        each tensor once under its first name."""
        seen, params = set(), {}
        named = [*self.module.named_parameters()]
        if self.encoder is not None:
            named += [("encoder." + n, p) for n, p in self.encoder.named_parameters()]
        for name, p in named:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params[name] = p
        return params

    def readout_params(self) -> Params:
        """The readout's trainable parameters (a tensor also in θ, a tied weight, appears in both)."""
        return {n: p for n, p in self.readout.named_parameters() if p.requires_grad}

    @staticmethod
    def call(module: nn.Module, originals: Params, given: Params, args):
        """``module(*args)`` with each tensor of ``originals`` (name → the module's own tensor)
        replaced by ``given[name]``, under every name that reaches it; the rest (frozen
        parameters, buffers) as they are."""
        swap = {id(originals[n]): t for n, t in given.items() if n in originals}
        full = {name: swap[id(p)] for name, p in module.named_parameters(remove_duplicate=False) if id(p) in swap}
        return functional_call(module, full, args, strict=False)

    def encode(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The input the recurrent module sees at one step."""
        if self.encoder is None:
            return x
        return self.call(self.encoder, self.params(), params, (x,))

    # --- the recurrence ---------------------------------------------------
    def step(self, params: Params, state: torch.Tensor, x: torch.Tensor):
        """One step on the flat state: ``(new state (batch, D), output or None)``; the output is None
        when the readout reads the new state (``output(state)``)."""
        raise NotImplementedError

    def run(self, params: Params, state: torch.Tensor, x: torch.Tensor):
        """The steps over a chunk ``x`` (batch, T, ...) from the flat state, with their graph: (the flat
        state after it, what the readout reads after each step, (batch, T, ...))."""
        reads = []
        for t in range(x.shape[1]):
            state, out = self.step(params, state, x[:, t])
            reads.append(self.read(state, out))
        return state, torch.stack(reads, dim=1)

    def output(self, state: torch.Tensor) -> torch.Tensor:
        """What the readout reads off the flat state (systems whose step returns no output)."""
        raise NotImplementedError

    def read(self, state: torch.Tensor, out) -> torch.Tensor:
        """What the readout reads after a step: its output, or the new state's."""
        return out if self.step_output else self.output(state)

    def flatten(self, native) -> torch.Tensor:
        """A state in the module's own format as the flat (batch, D) state of this layout."""
        raise NotImplementedError

    def unflatten(self, flat: torch.Tensor):
        """The flat (batch, D) state in the module's own format."""
        raise NotImplementedError

    def zeros(self, batch: int):
        """The module's own zero state for ``batch`` windows."""
        raise NotImplementedError

    def initial_state(self, start, batch: int) -> torch.Tensor:
        """The flat state entering the window: ``start`` (module format) or zeros, checked."""
        flat = self.flatten(self.zeros(batch) if start is None else start)
        if tuple(flat.shape) != (batch, self.layout.size):
            raise InputError(f"the starting state flattens to {tuple(flat.shape)}, expected "
                             f"{(batch, self.layout.size)}: give it in the module's own format, one per window")
        return flat

    def _like(self) -> torch.Tensor:
        """A tensor with the module's real precision and device, for new states and input checks: its
        first real floating-point parameter (or buffer), else the real part of a complex one."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        p = next((t for t in tensors if t.is_floating_point()), None)
        if p is None:
            p = next((t for t in tensors if t.is_complex()), torch.zeros(()))
        return p.real if p.is_complex() else p

    # --- readout and loss -------------------------------------------------
    def loss(self, readout_params: Params, output: torch.Tensor, targets) -> torch.Tensor:
        """Per-sample loss of an output: ``loss_fn(readout(output), targets)``."""
        if self.loss_fn is None:
            raise InputError("this system has no loss: pass loss_fn= to biaskit.wrap")
        logits = self.call(self.readout, self.readout_params(), readout_params, (output,))
        loss = self.loss_fn(logits, targets)
        if not torch.is_tensor(loss) or loss.dim() == 0 or loss.shape[0] != output.shape[0]:
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise InputError(f"loss_fn returned shape {shape}, expected one loss per sample "
                             f"({output.shape[0]},): use reduction='none'")
        return loss.reshape(loss.shape[0], -1).sum(dim=1)

    # --- inputs -----------------------------------------------------------
    def batch_first(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs as (batch, time, features), checked against the module."""
        want = 3 if self.encoder is None else 2
        if not torch.is_tensor(inputs) or inputs.dim() < want or (self.encoder is None and inputs.dim() > 3):
            shape = tuple(inputs.shape) if torch.is_tensor(inputs) else type(inputs).__name__
            order = "(time, batch, features)" if self.time_major else "(batch, time, features)"
            if self.encoder is not None:
                order = order.replace("features", "...")
            raise InputError(f"inputs must be a {want}-d tensor {order}, got {shape}")
        x = inputs.transpose(0, 1) if self.time_major else inputs
        if x.shape[1] == 0:
            raise InputError("the window is empty: inputs have 0 time steps")
        if self.encoder is None and self.input_size is not None and x.shape[2] != self.input_size:
            raise InputError(
                f"inputs have {x.shape[2]} features but the {self.kind} expects {self.input_size}"
            )
        p = self._like()
        if x.device != p.device or (self.encoder is None and x.dtype != p.dtype and not x.dtype.is_complex):
            raise InputError(
                f"inputs are {x.dtype} on {x.device} but the module is {p.dtype} on {p.device}: "
                "move one to match the other"
            )
        return x

    def describe(self) -> dict:
        """Attributes that name the system in a results Dataset."""
        frozen = sum(p.numel() for p in self.module.parameters() if not p.requires_grad)
        return {
            "module": self.kind,
            "input_size": -1 if self.input_size is None else self.input_size,
            "state_size": self.layout.size,
            "num_layers": max(self.layout.layer) + 1,
            "readout": type(self.readout).__name__,
            "encoder": type(self.encoder).__name__ if self.encoder is not None else "none",
            "loss": getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__) if self.loss_fn else "none",
            "step_output": int(self.step_output),
            "theta": "trainable parameters (requires_grad); frozen ones and buffers are constants",
            "frozen_parameters": int(frozen),
        }


class TorchRecurrent(RecurrentSystem):
    """nn.RNN / nn.GRU / nn.LSTM (any layers, batch_first either way) and their cells."""

    def __init__(self, module, readout, loss_fn, encoder=None):
        super().__init__(module, readout, loss_fn, encoder)
        name = type(module).__name__
        self.is_cell = isinstance(module, nn.RNNCellBase)
        self.kind = name
        self.cell = cells.kind_of(module)  # its parts, gates, step, and the fast path's pieces
        self.nonlinearity = getattr(module, "nonlinearity", "tanh")
        self.num_layers = 1 if self.is_cell else module.num_layers
        self.hidden = module.hidden_size
        self.input_size = module.input_size
        self.time_major = not self.is_cell and not module.batch_first
        self.components = self.cell.parts
        if not self.is_cell:
            if module.bidirectional:
                raise InputError(f"bidirectional {name} is not a causal recurrence; use one direction")
            if getattr(module, "proj_size", 0):
                raise InputError("LSTM with proj_size > 0 is not supported yet")
            if module.dropout and module.training:
                raise InputError(
                    f"{name} has dropout={module.dropout} in training mode: call .eval() "
                    "first, biaskit measures the deterministic recurrence"
                )
        self.frozen = {n: q.detach() for n, q in module.named_parameters() if not q.requires_grad}
        first: dict[int, str] = {}  # a tensor under several names (tied weights): each name → its first
        named = list(module.named_parameters(remove_duplicate=False))
        for n, q in named:
            first.setdefault(id(q), n)
        self.aliases = {n: first[id(q)] for n, q in named if first[id(q)] != n}
        blocks = [(layer, comp) for layer in range(self.num_layers) for comp in self.components]
        self.layout = StateLayout([c for _, c in blocks for _ in range(self.hidden)],
                                  [layer for layer, _ in blocks for _ in range(self.hidden)],
                                  [str(u) for _ in blocks for u in range(self.hidden)])

    def suffix(self, layer: int) -> str:
        return "" if self.is_cell else f"_l{layer}"

    def split(self, state):
        """The flat state as [(h, c) or (h,)] per layer."""
        parts = state.split(self.hidden, dim=1)
        n = len(self.components)
        return [parts[layer * n:(layer + 1) * n] for layer in range(self.num_layers)]

    def step(self, params, state, x):
        return self.layers(params, state, self.encode(params, x))[0], None

    def layers(self, params, state, inp):
        """The step from its encoded input ``inp``: the new flat state and, per layer, what its
        weights multiply: (the input and hidden pre-activations, the layer's input, the h it reads)."""
        new, read = [], []
        params = {**self.frozen, **params}
        params.update({n: params[f] for n, f in self.aliases.items()})
        for layer, hs in enumerate(self.split(state)):
            gi, gh = _gates(params, inp, hs[0], self.suffix(layer))
            read.append((gi, gh, inp, hs[0]))
            hs = self.cell.step(gi, gh, hs, self.nonlinearity)
            new += hs
            inp = hs[0]
        return torch.cat(new, dim=1), read

    def run(self, params, state, x):
        """A whole module's chunk by its own fused forward (PyTorch's kernel, in full float32 on cuDNN);
        a cell steps."""
        if self.is_cell:
            return super().run(params, state, x)
        inp = torch.stack([self.encode(params, x[:, t]) for t in range(x.shape[1])], dim=1)
        own = dict(self.module.named_parameters())
        with warnings.catch_warnings(), cells.no_tf32(inp):  # weights swapped in are not one flat buffer
            warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")
            out, last = self.call(self.module, own, {n: p for n, p in params.items() if n in own},
                                  (inp.transpose(0, 1) if self.time_major else inp, self.unflatten(state)))
        return self.flatten(last), out.transpose(0, 1) if self.time_major else out

    def output(self, state):
        return self.split(state)[-1][0]

    def zeros(self, batch):
        shape = (batch, self.hidden) if self.is_cell else (self.num_layers, batch, self.hidden)
        zero = self._like().new_zeros(shape)
        return tuple(zero for _ in self.components) if len(self.components) > 1 else zero

    def flatten(self, native):
        parts = native if isinstance(native, (tuple, list)) else (native,)
        if len(parts) != len(self.components):
            raise InputError(f"a state of {self.kind} has {len(self.components)} part(s) {self.components}, "
                             f"got {len(parts)}")
        expect = 2 if self.is_cell else 3
        for part in parts:
            if not torch.is_tensor(part) or part.dim() != expect or part.shape[-1] != self.hidden or (
                    not self.is_cell and part.shape[0] != self.num_layers):
                got = tuple(part.shape) if torch.is_tensor(part) else type(part).__name__
                want = "(batch, hidden)" if self.is_cell else "(layers, batch, hidden)"
                raise InputError(f"a state part of {self.kind} must be {want} = "
                                 f"{'' if self.is_cell else f'({self.num_layers}, ·, '}{self.hidden}), got {got}")
        if self.is_cell:
            return torch.cat(parts, dim=1)
        return torch.cat([part[layer] for layer in range(self.num_layers) for part in parts], dim=1)

    def unflatten(self, flat):
        layers = self.split(flat)
        parts = [torch.stack([hs[i] for hs in layers]) if not self.is_cell else layers[0][i]
                 for i in range(len(self.components))]
        return tuple(parts) if len(parts) > 1 else parts[0]


class CustomStep(RecurrentSystem):
    """A user module with ``initial_state(batch)`` and ``forward(x_t, state)``: pytree states,
    complex parts, and optionally ``(output, state)`` steps."""

    def __init__(self, module, readout, loss_fn, encoder=None, step_output: bool | None = None):
        super().__init__(module, readout, loss_fn, encoder)
        self.kind = type(module).__name__
        self.input_size = getattr(module, "input_size", None)
        self.time_major = False
        self.step_output = bool(getattr(module, "step_output", False) if step_output is None else step_output)
        zero = module.initial_state(2)
        with_paths, self.spec = pytree.tree_flatten_with_path(zero)
        if not with_paths or not all(torch.is_tensor(leaf) for _, leaf in with_paths):
            raise InputError(f"{self.kind}.initial_state must return a tensor or a tuple, list or dict of "
                             "tensors (batch first)")
        self.shapes, self.complex, names = [], [], []
        for path, leaf in with_paths:
            if leaf.dim() == 0 or leaf.shape[0] != 2:
                raise InputError(f"{self.kind}.initial_state(2) gave a state part {pytree.keystr(path) or 'h'} "
                                 f"of shape {tuple(leaf.shape)}: every part needs the batch first")
            self.shapes.append(tuple(leaf.shape[1:]))
            self.complex.append(leaf.is_complex())
            names.append(pytree.keystr(path) or "h")
        if getattr(module, "state_names", None) and len(module.state_names) == len(names):
            names = list(module.state_names)
        self.sizes = [_numel(s) * (2 if c else 1) for s, c in zip(self.shapes, self.complex)]
        units = [_units(s, c) for s, c in zip(self.shapes, self.complex)]
        self.layout = StateLayout([n for n, u in zip(names, units) for _ in u], [0] * sum(map(len, units)),
                                  [x for u in units for x in u])
        self.output_leaf = 0

    def flatten(self, native):
        leaves, spec = pytree.tree_flatten(native)
        if spec != self.spec or not all(torch.is_tensor(leaf) for leaf in leaves):
            raise InputError(f"{self.kind}'s state has the structure {self.spec}, got {spec}")
        parts = []
        for leaf, shape, complex_, size in zip(leaves, self.shapes, self.complex, self.sizes):
            if tuple(leaf.shape[1:]) != shape:
                raise InputError(f"a state part of {self.kind} has shape {tuple(leaf.shape)}, expected (batch, "
                                 f"{', '.join(map(str, shape))})")
            real = torch.view_as_real(leaf) if complex_ else leaf
            parts.append(real.reshape(leaf.shape[0], size))
        return torch.cat(parts, dim=1)

    def unflatten(self, flat):
        leaves, batch = [], flat.shape[0]
        for part, shape, complex_ in zip(flat.split(self.sizes, dim=1), self.shapes, self.complex):
            if complex_:
                leaves.append(torch.view_as_complex(part.reshape(batch, *shape, 2)))
            else:
                leaves.append(part.reshape(batch, *shape))
        return pytree.tree_unflatten(leaves, self.spec)

    def zeros(self, batch):
        like = self._like()

        def match(t):  # the module's precision and device (a complex part stays complex)
            if t.is_complex() and like.is_floating_point():
                return t.to(device=like.device, dtype=like.dtype.to_complex())
            return t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)

        return pytree.tree_map(match, self.module.initial_state(batch))

    def step(self, params, state, x):
        # Fresh copies of the incoming state's parts: a cell that writes into them in place
        # (a shift register, say) changes its copy, not the graph's state.
        native = pytree.tree_map(torch.clone, self.unflatten(state))
        result = self.call(self.module, self.params(), params, (self.encode(params, x), native))
        if self.step_output:
            if not (isinstance(result, (tuple, list)) and len(result) == 2):
                raise InputError(f"{self.kind} has step_output=True, so forward must return (output, new_state); "
                                 f"got {type(result).__name__}")
            output, new = result
            return self.flatten(new), output
        return self.flatten(result), None

    def output(self, state):
        leaf = pytree.tree_leaves(self.unflatten(state))[self.output_leaf]
        return leaf


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def unreachable(system: RecurrentSystem, state: torch.Tensor, x: torch.Tensor) -> list[str]:
    """The parameters of a custom step that ``functional_call`` cannot substitute (their products
    must then be taken against the module's own tensors, by torch.autograd).

    One step of the module as called (its own parameters as leaves, their
    gradient hooks applied by autograd) against the same step through
    ``system.step`` (θ substituted, the hooks applied by ``hooks.apply``): a
    projection of the new state (and output) must have the same gradient
    either way. A cell that reads its parameters through a container made in
    ``__init__`` (``self._p = {"W": self.W}``) gets zeros from the substituted
    path. Also refuses a step that mixes the windows of a batch. The steps
    run with gradients on, as the measurement runs them (a step may take
    another path under ``torch.no_grad``).
    """
    params = system.params()
    if not params:
        return []
    rows = slice(0, min(4, state.shape[0]))
    state, x = state[rows].detach(), x[rows]
    detached = {n: p.detach() for n, p in params.items()}
    with torch.enable_grad():  # one step in, so that weights multiplying the state (zero at first) show
        state = system.step(detached, state, x)[0].detach()
        substituted = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        new, out = system.step(substituted, state, x)
        gen = torch.Generator(device=new.device).manual_seed(0)
        parts = [new] + ([out] if out is not None else [])
        weights = [torch.randn(p.shape, generator=gen, device=p.device, dtype=p.real.dtype) for p in parts]
        projection = sum((p.real * w).sum() for p, w in zip(parts, weights))
        via_step = torch.autograd.grad(projection, list(substituted.values()), allow_unused=True)
        native = pytree.tree_map(torch.clone, system.unflatten(state))
        x_in = system.encoder(x) if system.encoder is not None else x
        result = system.module(x_in, native)
        if system.step_output:
            out_native, new_native = result
            parts = [system.flatten(new_native), out_native]
        else:
            parts = [system.flatten(result)]
        projection = sum((p.real * w).sum() for p, w in zip(parts, weights))
        as_called = torch.autograd.grad(projection, list(params.values()), allow_unused=True)
    wrong = []
    for name, a, b in zip(params, via_step, as_called):
        a = hooks.apply(params[name], torch.zeros_like(params[name]) if a is None else a)
        b = torch.zeros_like(params[name]) if b is None else b
        scale = float(b.abs().max()) if b.numel() else 0.0
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-5 * max(scale, 1e-30) + 1e-12):
            wrong.append(name)
    with torch.enable_grad():  # windows are independent: a step of one window alone gives its row of the batch's
        together = [t.detach() for t in system.step(detached, state, x) if t is not None]
        alone = [[t.detach() for t in system.step(detached, state[i:i + 1], x[i:i + 1]) if t is not None]
                 for i in range(state.shape[0])]
    for i, row in enumerate(alone):
        for a, b in zip(row, together):
            if not torch.allclose(a, b[i:i + 1], rtol=1e-4, atol=1e-6):
                raise InputError(f"{system.kind}'s step mixes the windows of a batch (window {i} alone steps "
                                 "differently than within the batch: batch statistics, or one window's value read "
                                 "for all): biaskit needs windows that step independently")
    return wrong


def wrap(module: nn.Module, readout: nn.Module | None = None, loss_fn: Callable | None = None,
         encoder: nn.Module | None = None, step_output: bool | None = None) -> RecurrentSystem:
    """The recurrent system of ``module``; ``loss_fn`` must return one loss per sample.

    ``encoder`` (optional) maps each step's raw input before the module sees it.
    ``step_output=True`` says a custom module's forward returns ``(output, new_state)``.
    """
    if isinstance(module, RecurrentSystem):
        return module
    if cells.kind_of(module) is not None:
        if step_output:
            raise InputError(f"step_output applies to custom cells; {type(module).__name__}'s output is its state")
        return TorchRecurrent(module, readout, loss_fn, encoder)
    if isinstance(module, nn.Module) and callable(getattr(module, "initial_state", None)):
        return CustomStep(module, readout, loss_fn, encoder, step_output)
    raise InputError(f"{type(module).__name__} is not a recurrent module: biaskit accepts {ACCEPTED}")
