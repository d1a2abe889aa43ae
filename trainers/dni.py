"""Synthetic gradients at the truncation boundary: DNI modules and the streaming estimator.

Training walks BPTT(K, K) chunks carrying the state. At the end of each chunk
the last state h_T gets a predicted gradient δ̂_T = DNI(h_T) of all later losses
(Jaderberg et al. 2016), so the chunk's update stands in for full BPTT. The DNI
learns from the bootstrapped target of the next chunk,

    δ_T = Σ_{τ=T+1}^{2T} ∂ℓ_τ/∂h_T + δ̂_{2T} · ∂h_{2T}/∂h_T,

which that chunk's backward pass yields as the gradient at its entering state.
Gradients are per sample and of the plain sum of later losses (no 1/K), so
they do not depend on the batch size or K; the chunk objective is its mean loss
plus δ̂_T · h_T, both over S·n.

Three DNI shapes: linear, one zero-initialised linear map of the whole flat
state; layer-wise (Shang & Zhang 2019), one MLP from it; and neuron-wise, one
small LSTM cell shared by every neuron, scalar in and out with a hidden state of
its own per neuron, so its size does not grow with the RNN's width. All follow
biaskit's DNI protocol,
``dni(state, memory) -> (gradient, memory)`` on flat states, so
``biaskit.synthetic_bias`` audits the same module that trains.
"""
from __future__ import annotations

import torch
from torch import nn

from biaskit.probe import evaluating, probing
from biaskit.recurrent import RecurrentSystem
from biaskit.synthetic import synthetic_bias, warm_up

from . import ddp
from .schedule import Schedule
from .tbptt import Stream, core, detach


class LayerDNI(nn.Module):
    """One MLP maps the whole flat state (D) to its gradient (D); stateless."""

    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, size))
        nn.init.zeros_(self.net[-1].weight)  # starts as plain truncation (Jaderberg et al.)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, state: torch.Tensor, memory=None):
        return self.net(state), memory


class LinearDNI(nn.Module):
    """A zero-initialised linear map from the flat state (D) to its gradient (D); stateless. Exact
    where the future gradient is linear in the state (a linear RNN with a quadratic loss)."""

    def __init__(self, size: int):
        super().__init__()
        self.net = nn.Linear(size, size)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def forward(self, state: torch.Tensor, memory=None):
        return self.net(state), memory


class NeuronDNI(nn.Module):
    """One LSTM cell shared by every neuron: each neuron's scalar state goes up to ``hidden``
    dimensions, through the cell with that neuron's own memory, and back down to a scalar."""

    def __init__(self, hidden: int):
        super().__init__()
        self.up = nn.Sequential(nn.Linear(1, hidden), nn.Tanh())
        self.cell = nn.LSTMCell(hidden, hidden)
        self.down = nn.Linear(hidden, 1)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, state: torch.Tensor, memory=None):
        h, c = self.cell(self.up(state.reshape(-1, 1)), memory)  # one row per (sample, neuron)
        return self.down(h).view_as(state), (h, c)


def layer(config: dict) -> LayerDNI:
    """The layer-wise DNI of ``{"size": D, "hidden": m or None (D)}``, registered as ``layer``."""
    return LayerDNI(config["size"], config.get("hidden") or config["size"])


def linear(config: dict) -> LinearDNI:
    """The linear DNI of ``{"size": D}``, registered as ``linear``."""
    return LinearDNI(config["size"])


def neuron(config: dict) -> NeuronDNI:
    """The neuron-wise DNI of ``{"hidden": m or None (8)}``, registered as ``neuron``."""
    return NeuronDNI(config.get("hidden") or 8)


SHAPES = {"layer": layer, "linear": linear, "neuron": neuron}


class SyntheticStream(Stream):
    """Walks BPTT(K, K) chunks, adding the DNI's synthetic gradient at each chunk's end."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, dni: nn.Module, system: RecurrentSystem,
                 discount: float = 1.0):
        super().__init__(inputs, targets)
        self.dni, self.system, self.discount = dni, system, discount
        self.memory = None    # the DNI's memory after the last boundary
        self.boundary = None  # (flat state, DNI memory) at the start of the next chunk
        self.target = None    # the bootstrapped target δ_T at the last chunk's start, per sample

    def chunk_backward(self, model, K: int, synthetic: bool = True):
        """Back-propagate the next chunk into the model's ``.grad`` and advance.

        ``synthetic``: whether the model's gradient includes the DNI's term
        (either way the DNI's target is computed, so it keeps learning).
        Returns (mean loss, positions, the DNI's loss against the bootstrapped target
        ``self.target`` at the chunk's start, None for the first chunk).
        """
        start, end = self.pos, min(self.pos + K, self.length)
        S, n = self.inputs.shape[0], end - start
        entering = None
        if self.boundary is not None:
            entering = self.boundary[0].detach().requires_grad_()
        state = None if entering is None else self.system.unflatten(entering)
        out, state = model(self.inputs[:, start:end], state)
        loss = core(model).loss(out, self.targets[:, start:end]).mean()
        flat = self.system.flatten(state)
        term = flat.new_zeros(())
        memory = self.memory
        if end < self.length:  # no later losses after the stream's end
            with torch.no_grad():
                delta, memory = self.dni(flat.detach(), self.memory)
            term = (delta * flat).sum() / (S * n)
        share = 0.0  # the bootstrapped part of the target, δ̂_2T·∂h_2T/∂h_T, apart when it is weighed apart
        if entering is not None and term.requires_grad and (not synthetic or self.discount != 1):
            (share,) = torch.autograd.grad(term, entering, retain_graph=True)
        (loss + term if synthetic else loss).backward()
        dni_loss = self.target = None
        if entering is not None:
            own = entering.grad - share if synthetic else entering.grad  # the chunk's own losses' part
            self.target = (own + self.discount * share) * (S * n)
            predicted, _ = self.dni(*self.boundary)
            dni_loss = nn.functional.mse_loss(predicted, self.target)
        self.carry, self.carry_pos, self.pos = detach(state), end, end
        self.boundary, self.memory = (flat.detach(), self.memory), memory
        return loss.detach(), n, dni_loss


class SyntheticGradients:
    """A DNI trained beside the model: its module, optimizer and settings, how a step uses it,
    its checkpoint entry and its audit. The training loop's one handle on synthetic gradients."""

    def __init__(self, model: nn.Module, cfg: dict, device, ranks: ddp.Ranks = ddp.ONE):
        self.ranks = ranks  # under torch.distributed the DNI's gradients are averaged over the ranks
        with evaluating(model):  # biaskit refuses a recurrence in training mode with dropout
            self.system = model.system()
        self.shape, self.config = cfg["dni"], {"size": self.system.layout.size, "hidden": cfg["dni_hidden"]}
        self.module = SHAPES[self.shape](self.config).to(device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=cfg["dni_lr"])
        self.discount, self.alternate = cfg["dni_discount"], cfg["alternate"]
        self.schedule = Schedule.parse(cfg["schedule"])
        self._reset()

    def _reset(self):
        self.updates = self.synthetic_updates = 0
        self.dni_loss = 0.0

    def stream(self, inputs: torch.Tensor, targets: torch.Tensor) -> SyntheticStream:
        return SyntheticStream(inputs, targets, self.module, self.system, self.discount)

    def backward(self, stream: SyntheticStream, model: nn.Module, K1: int, K2: int, progress: float):
        """One BPTT(K, K) chunk into the model's ``.grad`` (with the DNI's term in synthetic phases),
        and one Adam step of the DNI on its target. Returns (mean loss, positions)."""
        synthetic = self.schedule.synthetic_phase(self.alternate, progress)
        loss, n, dni_loss = stream.chunk_backward(model, K2, synthetic)
        if dni_loss is not None:
            self.optimizer.zero_grad(set_to_none=True)
            dni_loss.backward()
            ddp.average_gradients(self.module, self.ranks)
            self.optimizer.step()
            self.dni_loss += dni_loss.item()
        self.updates += 1
        self.synthetic_updates += synthetic
        return loss, n

    def epoch_stats(self) -> dict:
        """The epoch's share of synthetic updates and the DNI's mean loss; starts a new count."""
        stats = {"synthetic_share": self.synthetic_updates / max(1, self.updates),
                 "dni_loss": ddp.total(self.dni_loss, self.ranks) / self.ranks.world / max(1, self.updates - 1)}
        self._reset()
        return stats

    def checkpoint_entry(self) -> dict:
        """What a biaskit checkpoint records of the DNI: registered shape, config, weights."""
        return {"shape": self.shape, "config": self.config, "state": self.module.state_dict()}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load(self, entry: dict, state: dict):
        self.module.load_state_dict(entry["state"])
        self.optimizer.load_state_dict(state["optimizer"])

    def measure(self, model: nn.Module, inputs, targets, K1: int, K: int, window: int, windows: int,
                generator: torch.Generator) -> dict:
        """The chunked bias of this model at K (= ``K1``: BPTT(K, K) chunks), with and without the DNI,
        over ``windows`` windows of ``window`` steps (as many again after each for the later losses).
        Every rank measures the same windows, so all keep one generator state."""
        with probing(model, inputs, targets, length=window, count=windows, generator=generator,
                     lookahead=window, every_step=True) as probe:
            start, memory = warm_up(probe.system, self.module, probe.burn, K)
            ds = synthetic_bias(probe.system, probe.inputs, probe.targets, K, self.module, start=start,
                                memory=memory, lookahead=window)
        return {"rel_bias_truncated": float(ds["rel_bias_truncated"]),
                "rel_bias_synthetic": float(ds["rel_bias_synthetic"]),
                "synthetic_error": float(ds["synthetic_error"].median())}
