"""Windows drawn from a stream: what the controller and ``biaskit analyze`` decompose."""
from __future__ import annotations

import torch

from .errors import InputError


def sample_spans(inputs: torch.Tensor, targets: torch.Tensor, length: int, lookahead: int, count: int,
                 generator: torch.Generator):
    """``count`` random windows of ``length`` steps, plus ``lookahead`` steps after each.

    Returns (burn-in (count, length, ...): the ``length`` steps before each
    window, from which a model's state entering it is computed; inputs and
    targets of the window and its lookahead, (count, length + lookahead, ...)).
    """
    if length < 2:
        raise InputError(f"the window length must be at least 2, got {length}")
    span = 2 * length + lookahead
    if inputs.shape[0] < span:
        raise InputError(f"a window of {length} steps (plus as many for burn-in and {lookahead} after) is longer "
                         f"than the data ({inputs.shape[0]} steps): choose a window of at most "
                         f"{(inputs.shape[0] - lookahead) // 2}")
    starts = torch.randint(length, inputs.shape[0] - length - lookahead + 1, (count,), generator=generator)
    idx = starts[:, None] + torch.arange(-length, length + lookahead)[None]
    seqs = inputs[idx]
    return seqs[:, :length], seqs[:, length:], targets[idx[:, length:]]


def sample_windows(inputs: torch.Tensor, targets: torch.Tensor, length: int, count: int,
                   generator: torch.Generator):
    """``count`` random windows of ``length`` steps from one stream (time first).

    Returns (windows (count, length, ...), the targets at each window's last
    step (count, ...), burn-in (count, length, ...)): see ``sample_spans``.
    """
    burn, windows, window_targets = sample_spans(inputs, targets, length, 0, count, generator)
    return windows, window_targets[:, -1], burn
