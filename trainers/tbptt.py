"""Streaming BPTT(K1, K2) over S parallel streams (paper Eq. 15-17).

Each update takes the next K2 positions' losses, back-propagates each over the
K1 steps before it (so K1 - K2 steps of burn-in reach into the previous
subsequence), normalises by 1/K2 and carries the hidden state on: the state at
the start of the next window is kept, detached, from this window's forward
pass. The fused module runs over whole chunks; nothing here is step by step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from biaskit.errors import InputError
from biaskit.probe import probing
from biaskit.synthetic import synthetic_bias

#: Windows on which the loop measures the bias of its own BPTT(K1, K2) at each update.
TRAINED_WINDOWS = 32


def batchify(stream: torch.Tensor, streams: int) -> torch.Tensor:
    """(N, ...) → (streams, N // streams, ...): S contiguous streams, the remainder dropped."""
    length = stream.shape[0] // streams
    if length == 0:
        raise InputError(f"a stream of {stream.shape[0]} positions cannot feed {streams} parallel streams: "
                         "use a smaller --batch-size or more data")
    return stream[: length * streams].reshape(streams, length, *stream.shape[1:])


def core(model: nn.Module) -> nn.Module:
    """The model itself, also when DistributedDataParallel wraps it (its forward syncs gradients)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def detach(state):
    if state is None:
        return None
    return tuple(detach(s) for s in state) if isinstance(state, tuple) else state.detach()


class Stream:
    """Walks BPTT(K1, K2) windows over batchified (inputs, targets), carrying the state.

    ``carry`` is the detached state at position ``carry_pos``; each window starts
    there and ends K2 positions past ``pos``.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        self.inputs, self.targets = inputs, targets
        self.length = inputs.shape[1]
        self.pos = self.carry_pos = 0
        self.carry = None

    @property
    def done(self) -> bool:
        return self.pos >= self.length

    def window_loss(self, model, K1: int, K2: int) -> tuple[torch.Tensor, int]:
        """Mean loss of the next K2 positions, back-propagable over K1 steps; advances the stream.

        Returns (loss, number of loss positions) — fewer than K2 at the end.
        """
        if not 1 <= K2 <= K1:
            raise ValueError(f"BPTT(K1, K2) needs 1 <= K2 <= K1, got K1={K1}, K2={K2}")
        start, end = self.pos, min(self.pos + K2, self.length)
        # The next window starts K1 - K2 positions before the next loss start, never before this one.
        split = min(max(self.carry_pos, end - (K1 - K2)), end)
        state = self.carry
        outputs = []
        if split > self.carry_pos:
            out, state = model(self.inputs[:, self.carry_pos:split], state)
            outputs.append(out)
        next_carry = detach(state)
        if end > split:
            out, _ = model(self.inputs[:, split:end], state)
            outputs.append(out)
        out = torch.cat(outputs, dim=1)[:, start - self.carry_pos:]
        loss = core(model).loss(out, self.targets[:, start:end]).mean()
        self.carry, self.carry_pos, self.pos = next_carry, split, end
        return loss, end - start


class Truncation:
    """Plain BPTT(K1, K2), as the training loop uses it (``dni.SyntheticGradients`` is the other kind)."""

    def stream(self, inputs: torch.Tensor, targets: torch.Tensor) -> Stream:
        return Stream(inputs, targets)

    def backward(self, stream: Stream, model: nn.Module, K1: int, K2: int, progress: float):
        """The next window's gradient into the model's ``.grad``. Returns (mean loss, positions)."""
        loss, n = stream.window_loss(model, K1, K2)
        loss.backward()
        return loss.detach(), n

    def epoch_stats(self) -> dict:
        return {}

    def checkpoint_entry(self) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load(self, entry, state: dict):
        pass

    def measure(self, model: nn.Module, inputs, targets, K1: int, K2: int, window: int, windows: int,
                generator: torch.Generator) -> dict:
        """``rel_bias_trained``: the relative bias of the gradient this loop computes, BPTT(K1, K2) with
        a loss at every step, against full BPTT, over ``windows`` fresh windows of ``window`` steps
        (at most TRAINED_WINDOWS: a point estimate, the exact controller's limits are on its own
        windows; none when K2 > ``window``: a window then holds no whole backward). Every rank measures
        the same windows, so all keep one generator state."""
        if K2 > window:
            return {}
        with probing(model, inputs, targets, length=window, count=min(windows, TRAINED_WINDOWS), generator=generator,
                     every_step=True) as probe:
            ds = synthetic_bias(probe.system, probe.inputs, probe.targets, K2, start=probe.start, K1=K1)
        return {"rel_bias_trained": float(ds["rel_bias_truncated"])}
