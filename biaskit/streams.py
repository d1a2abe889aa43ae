"""Windows drawn from a stream: what the controller and ``biaskit analyze`` decompose."""
from __future__ import annotations

import torch

from .errors import InputError


def sample_windows(inputs: torch.Tensor, targets: torch.Tensor, length: int, count: int,
                   generator: torch.Generator):
    """``count`` random windows of ``length`` steps from one stream (time first).

    Returns (windows (count, length, ...), the targets at each window's last
    step (count, ...), burn-in (count, length, ...)): the ``length`` steps before
    each window, from which a model's state entering the window is computed.
    """
    if length < 2:
        raise InputError(f"the window length must be at least 2, got {length}")
    if inputs.shape[0] < 2 * length:
        raise InputError(f"a window of {length} steps (plus as many for burn-in) is longer than the data "
                         f"({inputs.shape[0]} steps): choose a window of at most {inputs.shape[0] // 2}")
    starts = torch.randint(length, inputs.shape[0] - length + 1, (count,), generator=generator)
    idx = starts[:, None] + torch.arange(-length, length)[None]
    seqs = inputs[idx]
    return seqs[:, length:], targets[starts + length - 1], seqs[:, :length]
