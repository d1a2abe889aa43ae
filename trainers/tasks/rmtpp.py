"""RMTPP (Du et al. 2016): an LSTM over events, a mark head and an intensity exponential in time.

After event j, with the top layer's state h_j, the next mark has logits
``U h_j + u`` and the next event's intensity at ``t > t_j`` is
``λ(t) = exp(c + w (t − t_j))`` with ``c = vᵀh_j + b``. The time to the next
event, Δ, has the density ``f(Δ) = λ(Δ) exp(−Λ(Δ))`` with the closed-form
compensator ``Λ(Δ) = ∫_0^Δ λ = e^c (e^{wΔ} − 1) / w``, so the per-event loss is

    NLL = CE(mark logits, next mark) − (c + wΔ) + e^c expm1(wΔ) / w.

Time units: the network sees the time features divided by their training
means, and ``c`` and ``w`` are learned in units of the mean gap and converted
back (``c = c' − log unit``, ``w = w' / unit``), so one learning rate suits a
data set in seconds as well as one in days while the loss stays the density in
the data's own units. ``w`` is kept away from 0, where the compensator is 0/0,
by ``w' = r + ε·sign(r)`` (sign(0) = +1) for a free parameter r: |w'| ≥ ε, the
sign is free, and dw'/dr = 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import biaskit

W_FLOOR = 1e-3  # ε: the smallest |w| in units of 1 / mean gap
LOG_Z = (-40.0, 4.5, 0.25)  # the expectation's quadrature grid in log z: first, last, step
CHUNK = 2**14               # positions per block in the expectation (179 doubles each)


class Encoder(nn.Module):
    """One event ``x_t = [mark id, gap since the previous event, time since the first]``
    → [mark embedding, gap / mean gap, time / mean time]."""

    def __init__(self, marks: int, embedding: int, scales: tuple[float, float]):
        super().__init__()
        self.embedding = nn.Embedding(marks, embedding)
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embedding(x[..., 0].long()), x[..., 1:] / self.scales], dim=-1)


class Head(nn.Module):
    """h → [mark logits (marks), c, w], with c and w in the data's time units."""

    def __init__(self, hidden: int, marks: int, unit: float):
        super().__init__()
        self.marks = nn.Linear(hidden, marks)
        self.intensity = nn.Linear(hidden, 1)  # vᵀh + b
        self.w = nn.Parameter(torch.tensor(0.1))  # r; the intensity starts rising slowly
        self.register_buffer("log_unit", torch.tensor(math.log(unit), dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c = self.intensity(h) - self.log_unit
        w = (self.w + W_FLOOR * torch.where(self.w >= 0, 1.0, -1.0)) / self.log_unit.exp()
        return torch.cat([self.marks(h), c, w.expand_as(c)], dim=-1)


def nll(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-event negative log-likelihood; outputs (..., marks + 2), targets (..., 2) = [mark, Δ]."""
    logits, c, w = outputs[..., :-2], outputs[..., -2], outputs[..., -1]
    mark, gap = targets[..., 0].long(), targets[..., 1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mark.reshape(-1), reduction="none")
    return ce.view_as(gap) - (c + w * gap) + c.exp() * torch.expm1(w * gap) / w


def _log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log(log(1 + eˣ)), without underflow for very negative x (where it is x to 1e-13)."""
    return torch.where(x < -30, x, F.softplus(x.clamp_min(-30)).log())


def expected_gap(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """E[Δ | there is a next event] under ``f(Δ) = λ(Δ) exp(−Λ(Δ))``, by quadrature in float64.

    Substituting ``y = Λ(Δ)`` (so ``f dΔ = e^{−y} dy`` and ``Δ(y) = log(1 + w y e^{−c}) / w``)
    turns the mean into ``∫ Δ(y) e^{−y} dy``. For w > 0, Λ grows without bound and
    that is the whole answer. For w < 0 the intensity dies out: Λ(∞) = e^c / |w|
    is finite, f integrates to P = 1 − e^{−Λ(∞)} < 1 and the unconditional mean
    is infinite, so the prediction is the mean given that another event comes,
    ``∫_0^{Λ(∞)} Δ(y) e^{−y} dy / P``, which ``e^{−y} = 1 − P (1 − e^{−z})`` maps to
    ``∫_0^∞ Δ(y(z)) e^{−z} dz`` as well. That integral is taken by the trapezoid rule
    in ``log z``, where the integrand is smooth and decays exponentially on the left
    and doubly exponentially on the right, so the rule converges geometrically
    (relative error below 1e-6 for c in [−10, 10] and |w| in [1e-6, 100]).
    """
    log_z = torch.arange(LOG_Z[0], LOG_Z[1] + LOG_Z[2] / 2, LOG_Z[2], dtype=torch.float64, device=c.device)
    z = log_z.exp()
    weights = LOG_Z[2] * z * (-z).exp()  # e^{−z} dz = z e^{−z} d(log z)
    flat_c, flat_w = c.detach().double().reshape(-1, 1), w.detach().double().reshape(-1, 1)
    means = []
    for cb, wb in zip(flat_c.split(CHUNK), flat_w.split(CHUNK)):
        a = wb.abs()
        rising = torch.log1p(a * z * (-cb).exp()) / a  # w > 0: y = z
        log_total = cb - a.log()  # log Λ(∞), for w < 0
        total = log_total.exp()
        log_p = torch.log(-torch.expm1(-total))
        # w < 0: 1 + w y e^{−c} = (Λ(∞) − y) / Λ(∞), and Λ(∞) − y = softplus(log P + Λ(∞) − z)
        falling = (_log_softplus(log_p + total - z) - log_total) / wb
        means.append((weights * torch.where(wb > 0, rising, falling)).sum(-1))
    return torch.cat(means).view(c.shape)


def metrics(model: nn.Module, outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """RMSE of the expected time to the next event and the 0-1 loss of the most likely mark."""
    gap = targets[..., 1].double()
    rmse = (expected_gap(outputs[..., -2], outputs[..., -1]) - gap).pow(2).mean().sqrt()
    wrong = outputs[..., :-2].argmax(-1) != targets[..., 0].long()
    return {"rmse": float(rmse), "error_rate": float(wrong.double().mean())}


class RMTPP(nn.Module):
    """Mark embedding + time features → fused ``nn.LSTM`` → mark logits and intensity parameters.

    ``scales`` = (mean gap, mean time since the first event) of the training data.
    """

    def __init__(self, marks: int, embedding: int, hidden: int, layers: int, scales: tuple[float, float]):
        super().__init__()
        self.encoder = Encoder(marks, embedding, scales)
        self.lstm = nn.LSTM(embedding + 2, hidden, layers, batch_first=True)
        self.head = Head(hidden, marks, scales[0])

    def forward(self, x: torch.Tensor, state=None):
        out, state = self.lstm(self.encoder(x), state)
        return self.head(out), state

    def advance(self, x: torch.Tensor, state=None):
        """The state ``forward`` would return, without the head (the probes' burn-in)."""
        return self.lstm(self.encoder(x), state)[1]

    @staticmethod
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-event NLL, shaped like the targets without their last dimension."""
        return nll(outputs, targets)

    def system(self) -> biaskit.RecurrentSystem:
        """The recurrence as biaskit sees it: encoder → LSTM step, the event NLL at the last step."""
        return biaskit.wrap(self.lstm, readout=self.head, loss_fn=nll, encoder=self.encoder)
